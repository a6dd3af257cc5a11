"""The report folder of a profiling run: plate layout with cell counts, PCA of well profiles,
and the table of outputs (pure functions on DataFrames; matplotlib, no display)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from .profiles.aggregate import feature_columns
from .qc import new_figure, save_figure


def plate_layout_png(wells: pd.DataFrame, path: str | Path, title: str = "",
                     skipped: Sequence[str] = ()) -> Path:
    """A plate heat map of ``Metadata_Object_Count`` per well, counts written in the wells.

    ``skipped`` wells (no profile) are drawn hatched.
    """
    from matplotlib.patches import Rectangle

    rows = sorted(set(wells["Metadata_Row"]) | {w[0] for w in skipped}, key=lambda r: (len(r), r))
    cols = sorted(set(int(c) for c in wells["Metadata_Column"]) | {int(w[1:]) for w in skipped})
    grid = np.full((len(rows), len(cols)), np.nan)
    for r in wells.itertuples():
        grid[rows.index(r.Metadata_Row), cols.index(int(r.Metadata_Column))] = r.Metadata_Object_Count
    fig = new_figure(figsize=(1.0 + 0.55 * len(cols), 1.0 + 0.5 * len(rows)))
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="viridis")
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = grid[i, j]
            ax.text(j, i, "-" if np.isnan(v) else f"{int(v)}", ha="center", va="center", fontsize=7,
                    color="white" if np.isnan(v) or v < np.nanmax(grid) * 0.6 else "black")
    for w in skipped:
        if w[0] in rows and int(w[1:]) in cols:
            ax.add_patch(Rectangle((cols.index(int(w[1:])) - 0.5, rows.index(w[0]) - 0.5), 1, 1, fill=False,
                                       hatch="///", edgecolor="red"))
    ax.set_xticks(range(len(cols)), [f"{c:02d}" for c in cols], fontsize=7)
    ax.set_yticks(range(len(rows)), rows, fontsize=7)
    ax.set_title(title or "cells per well", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8, label="cells")
    return save_figure(fig, path, dpi=110)


def pca(X: np.ndarray, k: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """Principal components of standardised features: (scores (n, k), explained variance ratios (k,))."""
    X = np.asarray(X, np.float64)
    sd = X.std(axis=0)
    Z = (X - X.mean(axis=0)) / np.where(sd > 0, sd, 1.0)
    U, S, _ = np.linalg.svd(Z, full_matrices=False)
    var = S ** 2 / max(1e-12, (S ** 2).sum())
    return U[:, :k] * S[:k], var[:k]


def pca_png(profiles: pd.DataFrame, color_by: str, path: str | Path, title: str = "") -> Path:
    """Scatter of the first two principal components of the profiles, coloured by a metadata column."""
    import matplotlib

    scores, var = pca(profiles[feature_columns(profiles)].to_numpy())
    labels = profiles[color_by].astype(str).to_numpy()
    fig = new_figure(figsize=(5.5, 4.5))
    ax = fig.subplots()
    for i, lab in enumerate(sorted(set(labels))):
        m = labels == lab
        ax.scatter(scores[m, 0], scores[m, 1], s=28, label=lab, color=matplotlib.colormaps["tab10"](i % 10))
    ax.set_xlabel(f"PC1 ({var[0]:.0%})")
    ax.set_ylabel(f"PC2 ({var[1]:.0%})" if len(var) > 1 else "PC2")
    ax.legend(fontsize=7, title=color_by.removeprefix("Metadata_"), title_fontsize=7)
    ax.set_title(title or "well profiles", fontsize=9)
    return save_figure(fig, path)


def _num(v, fmt: str = ".3g") -> str:
    return "singular" if v is None else format(v, fmt)


def sphering_lines(sph: dict | None) -> list[str]:
    """Markdown for the sphering section: one row of diagnostics per fit, then its warnings."""
    if not sph:
        return ["Sphering: none.", ""]
    if not sph.get("applied"):
        return [f"Sphering: not applied ({sph.get('reason', 'not requested')}).", ""]
    lines = ["## Sphering", "", f"Requested scope {sph['scope_requested']}, fitted on control {sph['fit_on']}.", "",
             "| scope | group | controls | features | rank | effective rank | condition before | condition after "
             "| regularisation | epsilon |", "|---|---|---|---|---|---|---|---|---|---|"]
    for f in sph["fits"]:
        lines.append(f"| {f['scope']} | {f['group'] or 'all'} | {f['n_controls']} | {f['n_features']} | {f['rank']} | "
                     f"{f['effective_rank']:.1f} | {_num(f['condition_number_before'])} | "
                     f"{_num(f['condition_number_after'])} | {f['regularization']} | "
                     f"{_num(f['epsilon']) if f['epsilon'] is not None else f['floor_rule']} |")
    warnings = [f["warning"] for f in sph["fits"] if f.get("warning")]
    if warnings:
        lines += ["", "Warnings:", ""] + [f"- {w}" for w in warnings]
    return lines + [""]


def write_report(out: str | Path, summary: dict, color_by: str | None = None, extra: dict | None = None) -> Path:
    """``report/``: one layout PNG per plate, a PCA PNG of all well profiles, ``README.md`` with the tables."""
    out = Path(out)
    rep = out / "report"
    rep.mkdir(parents=True, exist_ok=True)
    lines = ["# Profiling report", "", f"model: `{summary['model_id']}`", ""]
    wells_all = []
    skipped = pd.read_csv(out / "skipped.csv") if (out / "skipped.csv").exists() else pd.DataFrame()
    for o in summary["outputs"]:
        if o["level"] == "well":
            wells = pd.read_parquet(out / o["path"])
            wells_all.append(wells)
            skip_wells = sorted(set(skipped.loc[skipped["Metadata_Plate"] == o["plate"], "Metadata_Well"])
                                - set(wells["Metadata_Well"])) if len(skipped) else []
            png = plate_layout_png(wells, rep / f"{o['plate']}_layout.png", f"{o['plate']}: cells per well",
                                   skip_wells)
            lines += [f"![{o['plate']} layout]({png.name})", ""]
    if wells_all and color_by:
        wells = pd.concat(wells_all, ignore_index=True)
        if color_by in wells and len(wells) >= 3:
            png = pca_png(wells, color_by, rep / "wells_pca.png",
                          f"PCA of {len(wells)} well profiles ({summary['model_id']})")
            lines += [f"![PCA of well profiles]({png.name})", ""]
    lines += ["## Plates", "", "| plate | batch | wells | sites | cells | sites skipped |", "|---|---|---|---|---|---|"]
    for p, s in summary["plates"].items():
        lines.append(f"| {p} | {s.get('batch', '')} | {s['wells']} | {s['sites']} | {s['cells']} | "
                     f"{s['sites_skipped']} |")
    lines += ["", "## Outputs", "", "| level | plate | rows | path |", "|---|---|---|---|"]
    for o in summary["outputs"]:
        lines.append(f"| {o['level']} | {o['plate']} | {o['rows']} | `{o['path']}` |")
    sph = summary.get("sphering")
    lines += ["", f"Aggregation: {summary['aggregation']}.", ""]
    for plate, c in (summary.get("constant_features") or {}).items():
        lines += [f"Constant features on plate {plate}: {c['n_features']}"
                  + (f" (empty channels: {', '.join(c['channels'])})" if c["channels"] else "")
                  + (" - dropped." if summary.get("dropped_constant_features") else
                     " - kept; `--drop-constant` removes them (pycytominer's spherize divides by their variance)."),
                  ""]
    lines += sphering_lines(sph)
    if len(skipped):
        lines += ["## Skipped", "", f"{len(skipped)} input(s); see `skipped.csv`.", ""]
    if extra:
        lines += ["## Measured", "", "```json", json.dumps(extra, indent=1), "```", ""]
    (rep / "README.md").write_text("\n".join(lines))
    return rep
