"""Exports of a profiling run for other tools: AnnData ``.h5ad`` and one single-cell Parquet per plate.

``h5ad``
    Written through anndata (the ``eval`` extra; without it ``h5ad`` is a clear error naming
    the extra): only features in ``X`` (float32, n x d), every ``Metadata_`` column in ``obs``
    under its name without the prefix (numbers as numbers, text as categoricals), the feature
    names as ``var`` index, and the run's provenance as a JSON string in ``uns["provenance"]``.
``plate-parquet``
    One CytoTable-style single-cell table per plate (one row per cell, ``Metadata_`` columns
    then features), written from the per-site files one plate at a time.

``pca`` reduces the profiles to ``n`` principal components before export (for multi-modal
tools such as MUSE, whose latent size the Microsnoop paper's Fig. 6 matches), fitted on the
negative controls or on all rows; the fit is recorded in the output.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np
import pandas as pd

from ..errors import InputError
from ..io.atomic import atomic_path
from ..io.write import read_provenance, write_parquet
from ..profiles.aggregate import feature_columns
from ..profiles.controls import negative_controls
from .layout import TREATMENT, WELL

LEVELS = ("cells", "wells", "treatments")
FORMATS = ("h5ad", "plate-parquet")


def _summary(root: Path) -> dict:
    f = root / "summary.json"
    if not f.exists():
        raise InputError(root, "no summary.json: not the output folder of a finished `microsnoop-ray profile` run")
    return json.loads(f.read_text())


def plate_cell_tables(root: str | Path) -> Iterator[tuple[str, pd.DataFrame, Path]]:
    """(plate, all its cells, one of its files) for every plate of a run, one plate in memory at a time."""
    root = Path(root)
    model_id = _summary(root)["model_id"]
    for plate_dir in sorted(p for p in (root / "embeddings" / model_id).glob("*/*") if p.is_dir()):
        files = sorted(plate_dir.glob("*/embeddings.parquet"))
        if files:
            yield plate_dir.name, pd.concat([pd.read_parquet(f) for f in files], ignore_index=True), files[0]


def level_table(root: str | Path, level: str) -> tuple[pd.DataFrame, dict]:
    """The run's profiles at one level, and the provenance of their files."""
    root = Path(root)
    if level not in LEVELS:
        raise ValueError(f"level must be one of {LEVELS}, not {level!r}")
    summary = _summary(root)
    if level == "cells":
        parts = list(plate_cell_tables(root))
        if not parts:
            raise InputError(root, "the run has no per-cell embeddings")
        return pd.concat([p[1] for p in parts], ignore_index=True), read_provenance(parts[0][2])
    want = WELL if level == "wells" else TREATMENT
    paths = [root / o["path"] for o in summary["outputs"] if o["level"] == want]
    if not paths:
        raise InputError(root, f"the run wrote no {want} profiles (see summary.json)")
    return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True), read_provenance(paths[0])


def pca_reduce(df: pd.DataFrame, n: int, fit_on: str = "all") -> tuple[pd.DataFrame, dict]:
    """Replace the features of ``df`` by ``n`` principal components (``PC_001`` ...).

    Parameters
    ----------
    fit_on : {"all", "controls"}
        Fit on every row, or on the negative controls (``Metadata_pert_type`` negcon or control)
        only, so that the axes describe control variation; every row is then projected.
    """
    from sklearn.decomposition import PCA

    feats = feature_columns(df)
    X = df[feats].to_numpy(np.float64)
    if fit_on == "controls":
        if "Metadata_pert_type" not in df:
            raise InputError("--pca-fit controls", "no Metadata_pert_type column: the controls are not known")
        fit = X[negative_controls(df)]
    elif fit_on == "all":
        fit = X
    else:
        raise ValueError(f"fit_on must be 'all' or 'controls', not {fit_on!r}")
    if n < 1 or n > min(fit.shape):
        raise InputError("--pca", f"{n} components asked for, but the fit has {fit.shape[0]} rows of "
                                  f"{fit.shape[1]} features (at most {min(fit.shape)})")
    pca = PCA(n, random_state=0).fit(fit)
    scores = pca.transform(X).astype(np.float32)
    names = [f"PC_{i + 1:03d}" for i in range(n)]
    meta = df[[c for c in df.columns if c not in feats]].reset_index(drop=True)
    out = pd.concat([meta, pd.DataFrame(scores, columns=names)], axis=1)
    return out, {"n_components": n, "fit_on": fit_on, "fit_rows": int(len(fit)), "input_features": len(feats),
                 "explained_variance_ratio": [round(float(v), 6) for v in pca.explained_variance_ratio_]}


def require_anndata():
    """The ``anndata`` module, or a clear error naming the extra that brings it."""
    try:
        import anndata
    except ImportError:
        raise InputError("--format h5ad", "needs anndata, which comes with the eval extra: "
                                          "pip install 'microsnoop-ray[eval]'") from None
    return anndata


def to_anndata(df: pd.DataFrame, uns: dict):
    """Profiles as an ``anndata.AnnData``.

    Parameters
    ----------
    df : DataFrame, (n, m)
        ``Metadata_`` columns and feature columns (``feature_columns``).
    uns : dict
        Stored in ``uns``; each value as a JSON string, because a run's provenance holds ``None`` and
        mixed lists that the h5ad format cannot hold as they are.

    Returns
    -------
    AnnData with ``X`` float32 (n, d) holding only the features, ``obs`` the metadata under their
    names without the prefix (numbers as numbers, text as categoricals) and ``var`` the feature names.
    """
    anndata = require_anndata()
    feats = feature_columns(df)
    meta = [c for c in df.columns if c not in feats]
    names = {c: c.removeprefix("Metadata_") for c in meta}
    if len(set(names.values())) != len(names):
        names = {c: c for c in meta}  # prefix-less names would collide: keep them whole
    obs = pd.DataFrame(index=pd.Index([str(i) for i in range(len(df))]))
    for c in meta:
        s = df[c].reset_index(drop=True)
        if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_bool_dtype(s):
            obs[names[c]] = s.to_numpy()
        else:
            obs[names[c]] = pd.Categorical(s.where(s.isna(), s.astype(str)))
    return anndata.AnnData(X=df[feats].to_numpy(np.float32), obs=obs, var=pd.DataFrame(index=pd.Index(feats)),
                           uns={k: json.dumps(v, default=str) for k, v in uns.items()})


def write_h5ad(df: pd.DataFrame, path: str | Path, uns: dict) -> Path:
    """Write profiles as an AnnData ``.h5ad`` (see :func:`to_anndata`), atomically; returns ``path``."""
    adata = to_anndata(df, uns)
    path = Path(path)
    with atomic_path(path, suffix=".h5ad") as tmp:
        adata.write_h5ad(tmp, compression="gzip")
    return path


def export(root: str | Path, fmt: str, to: str | Path | None = None, level: str = "cells", pca: int | None = None,
           pca_fit: str = "all") -> list[Path]:
    """Export a profiling run (the ``out`` folder of ``profile``); returns the files written.

    ``h5ad`` writes ``<to>/<level>.h5ad``; ``plate-parquet`` writes ``<to>/<plate>.parquet`` per plate
    (cells only). ``to`` defaults to ``<root>/export``.
    """
    root = Path(root)
    to = Path(to) if to is not None else root / "export"
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, not {fmt!r}")
    if fmt == "plate-parquet":
        if level != "cells":
            raise InputError("--level", "plate-parquet holds single cells: use --level cells")
        written = []
        for plate, cells, first in plate_cell_tables(root):
            prov = read_provenance(first)
            if pca:
                cells, prov["pca"] = pca_reduce(cells, pca, pca_fit)
            written.append(write_parquet(cells, to / f"{plate}.parquet", {**prov, "level": "cell", "plate": plate}))
        if not written:
            raise InputError(root, "the run has no per-cell embeddings")
        return written
    df, prov = level_table(root, level)
    uns = {"provenance": prov, "level": level}
    if pca:
        df, uns["pca"] = pca_reduce(df, pca, pca_fit)
    name = f"{level}_pca{pca}.h5ad" if pca else f"{level}.h5ad"
    return [write_h5ad(df, to / name, uns)]
