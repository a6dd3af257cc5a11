"""``make demo`` and ``make screen``: the plate pipeline end to end on real images.

``make demo`` fetches real fluorescence images with their instance masks (the scellseg
0.1.8 sdist on the package index: seven cell types / imaging styles), writes them as an
NGFF 0.4 OME-Zarr plate (one row per cell type, masks as ``labels/cells``), profiles it on
an embedded Ray and writes a report folder (plate layout with cell counts, PCA of the well
profiles, the table of outputs).

``make screen`` runs the BBBC021 mini-screen from ``../shared/data/bbbc021_chx`` (6 plates,
DMSO on each, cycloheximide at 3 doses) with per-plate sphering fitted on DMSO cells, and
reports DMSO/drug separation before and after sphering on held-out sites.

Weights: ``--weights FILE`` if given, else the default weights shipped in the package;
if neither exists, a randomly initialised network labelled UNTRAINED is used, loudly.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from microsnoop_ray.io.atomic import write_json
from microsnoop_ray.pipeline.layout import WELL, WELL_SPHERED

JUMP_CHANNELS = {"DNA": "ch5", "ER": "ch4", "RNA": "ch3", "AGP": "ch1", "Mito": "ch2"}


def load_jump_field(folder: Path) -> tuple[np.ndarray, pd.DataFrame]:
    """(5, 1080, 1080) uint16 in the order of JUMP_CHANNELS, and the nuclei bounding boxes (inclusive)."""
    import tifffile

    site = folder / "BR00116991" / "A01-1"
    image = np.stack([tifffile.imread(site / f"r01c01f01p01-{ch}sk1fk1fl1.tiff") for ch in JUMP_CHANNELS.values()])
    cols = ["ObjectNumber", "AreaShape_BoundingBoxMinimum_X", "AreaShape_BoundingBoxMinimum_Y",
            "AreaShape_BoundingBoxMaximum_X", "AreaShape_BoundingBoxMaximum_Y", "AreaShape_Area"]
    nuc = pd.read_csv(site / "Nuclei.csv", usecols=cols)
    # CellProfiler's bounding-box maxima are exclusive.
    boxes = pd.DataFrame({"label": nuc["ObjectNumber"], "r0": nuc["AreaShape_BoundingBoxMinimum_Y"],
                          "c0": nuc["AreaShape_BoundingBoxMinimum_X"], "r1": nuc["AreaShape_BoundingBoxMaximum_Y"] - 1,
                          "c1": nuc["AreaShape_BoundingBoxMaximum_X"] - 1, "area": nuc["AreaShape_Area"]})
    return image, boxes


CONTRAST_CHANNELS = ("cyto", "nuclei")
#: where the two stains lie in the scellseg contrast PNGs as OpenCV reads them (BGR order; the third
#: plane is empty in every image)
CONTRAST_PLANES = (1, 2)


def build_contrast_plate(folder: Path, out: Path, per_set: int = 5) -> tuple[Path, Path]:
    """An NGFF 0.4 plate from the scellseg contrast images: one row per cell type, one image per well.

    Only the image sets that carry both stains become rows (Kc167, macrophagocyte, neurocyte, style2):
    the other three have no nuclei image, and an empty channel would give constant features. Columns
    1-``per_set`` are a set's images; the instance masks that ship with them become ``labels/cells``.
    Returns (plate path, plate map CSV).
    """
    import cv2

    from microsnoop_ray.io.zarr_plate import write_plate

    fields, labels, rows = {}, {}, []
    for set_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        images = [(p, cv2.imread(str(p), cv2.IMREAD_UNCHANGED)) for p in sorted(set_dir.glob("*_img.png"))[:per_set]]
        if not all(img[..., plane].any() for _, img in images for plane in CONTRAST_PLANES):
            continue
        row = chr(ord("A") + len({r["Metadata_cell_type"] for r in rows}))
        for j, (img_path, img) in enumerate(images):
            well = f"{row}{j + 1:02d}"
            fields[(well, 1)] = np.stack([img[..., p] for p in CONTRAST_PLANES])
            labels[(well, 1)] = cv2.imread(str(img_path).replace("_img.png", "_masks.png"), cv2.IMREAD_UNCHANGED)
            rows.append({"Metadata_Well": well, "Metadata_cell_type": set_dir.name, "Metadata_Image": img_path.name})
    plate = write_plate(out / "scellseg-contrast.zarr", fields, CONTRAST_CHANNELS, version="0.4", labels=labels)
    pm = out / "platemap.csv"
    pd.DataFrame(rows).to_csv(pm, index=False)
    return plate, pm


def _weights_or_untrained(weights: Path | None, out: Path) -> Path | None:
    from microsnoop_ray.model import default_weights_path, save_random_init

    if weights is None and default_weights_path() is None:
        print("    WARNING: no trained default weights are shipped and no --weights was given: using a RANDOMLY\n"
              "    INITIALISED network (its model card says so); the profiles carry no learned biology.")
        return save_random_init(out / "untrained_random_init.pt")
    return weights


def demo_plate(out: Path, weights: Path | None, max_cells: int, num_cpus: int | None) -> dict:
    """The README's main job: a real plate from the package index through the whole pipeline."""
    from microsnoop_ray.io.datasets import fetch_package_files
    from microsnoop_ray.pipeline.executors import ray_runtime
    from microsnoop_ray.pipeline.plate_job import ProfileConfig, run_profile
    from microsnoop_ray.pipeline.run_report import write_run_report

    t0 = time.perf_counter()
    print("1/3 fetching real fluorescence images with instance masks from the package index (scellseg 0.1.8 sdist)")
    folder = fetch_package_files("scellseg-assets") / "contrast_data"
    plate, platemap = build_contrast_plate(folder, out / "input")
    types = pd.read_csv(platemap)["Metadata_cell_type"]
    print(f"    wrote the OME-Zarr plate {plate} ({types.nunique()} cell types x {len(types) // types.nunique()} "
          "fields, cytoplasm and nuclei stains, masks as NGFF labels)")
    weights = _weights_or_untrained(weights, out)
    cfg = ProfileConfig.from_mapping({
        "inputs": [str(plate)], "out": str(out), "platemap": str(platemap), "batch": "scellseg-contrast",
        "weights": str(weights) if weights else None, "labels": "cells", "max_cells_per_site": max_cells,
        "sphering": {"scope": "none"}, "treatment_keys": ["Metadata_cell_type"]})
    print("2/3 profiling on an embedded Ray: read tasks -> crop actors -> encoder actors -> Parquet")
    with ray_runtime(num_cpus=num_cpus):
        summary = run_profile(cfg)
    print("3/3 writing the report")
    rep = write_run_report(out, summary, color_by="Metadata_cell_type")
    summary["report"] = str(rep)
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(summary, out / "summary.json")
    print(f"done in {summary['total_seconds']} s: {sum(p['cells'] for p in summary['plates'].values())} cells, "
          f"{sum(p['wells'] for p in summary['plates'].values())} wells; report in {rep}/README.md")
    return summary


# ----------------------------------------------------------------------------- BBBC021 mini-screen

def _site_profiles(out: Path, model_id: str, fit_sites=(1, 3)) -> tuple[pd.DataFrame, dict]:
    """Site profiles of every site file, and per plate the DMSO cells of the fitting sites."""
    from microsnoop_ray.profiles.aggregate import SITE_KEYS, aggregate, feature_columns
    rows, fit_cells = [], {}
    for f in sorted((out / "embeddings" / model_id).glob("*/*/*/embeddings.parquet")):
        cells = pd.read_parquet(f)
        rows.append(aggregate(cells[SITE_KEYS + feature_columns(cells)], SITE_KEYS, "mean"))
        site = int(cells["Metadata_Site"].iloc[0])
        if cells["Metadata_Well"].iloc[0] == "B02" and site in fit_sites:  # DMSO is B02 on every plate
            fit_cells.setdefault(cells["Metadata_Plate"].iloc[0], []).append(cells[feature_columns(cells)])
    return pd.concat(rows, ignore_index=True), {k: pd.concat(v) for k, v in fit_cells.items()}


def separation(sites: pd.DataFrame, feats: list[str]) -> dict:
    """DMSO/drug separation of held-out site profiles (DMSO sites not used for fitting).

    ``dmso_cross_plate`` : mean Euclidean distance between DMSO sites of different plates;
    ``drug_to_dmso`` : mean distance between drug sites and the DMSO sites of their own plate;
    ``ratio`` = the first over the second (lower: plate effects removed relative to the drug effect);
    ``nn_accuracy`` : leave-one-out 1-NN (Euclidean) DMSO vs drug over the rows;
    ``dose_spearman`` : rank correlation of concentration and distance to the plate's DMSO mean.
    """
    from scipy.spatial.distance import cdist
    from scipy.stats import spearmanr
    X = sites[feats].to_numpy(np.float64)
    dmso = (sites["Metadata_Compound"] == "DMSO").to_numpy()
    plate = sites["Metadata_Plate"].to_numpy()
    D = cdist(X, X)
    cross = [D[i, j] for i in np.flatnonzero(dmso) for j in np.flatnonzero(dmso) if plate[i] != plate[j]]
    drug = [D[i, j] for i in np.flatnonzero(~dmso) for j in np.flatnonzero(dmso) if plate[i] == plate[j]]
    C = D.copy()  # Euclidean: sphered control profiles can be (near) zero vectors, where cosine is undefined
    np.fill_diagonal(C, np.inf)
    nn = C.argmin(axis=1)
    dist_to_dmso, conc = [], []
    for i in np.flatnonzero(~dmso):
        ref = X[dmso & (plate == plate[i])].mean(axis=0)
        dist_to_dmso.append(float(np.linalg.norm(X[i] - ref)))
        conc.append(float(sites["Metadata_Concentration"].iloc[i]))
    return {"dmso_cross_plate": float(np.mean(cross)), "drug_to_dmso": float(np.mean(drug)),
            "ratio": float(np.mean(cross) / np.mean(drug)), "nn_accuracy": float((dmso[nn] == dmso).mean()),
            "dose_spearman": float(spearmanr(conc, dist_to_dmso).statistic), "sites": int(len(X)),
            "dmso_sites": int(dmso.sum())}


def heldout_separation(out: Path, model_id: str, regularization: str = "faithful", epsilon: float | None = None,
                       fit_on: str = "sites") -> dict:
    """DMSO/drug separation before and after per-plate sphering, on sites the fit did not see.

    Per plate, ZCA-cor is fitted on the DMSO site profiles (``fit_on="sites"``) or DMSO cells
    (``"cells"``) of sites 1 and 3, and applied to the site profiles of DMSO sites 2 and 4 and
    of every drug site (see :func:`separation`).
    """
    from microsnoop_ray.profiles.aggregate import feature_columns
    from microsnoop_ray.profiles.sphering import fit_and_transform

    sites, fit_cells = _site_profiles(out, model_id)
    feats = feature_columns(sites)
    sites = sites.merge(pd.read_csv(out / "platemap.csv"), on=["Metadata_Plate", "Metadata_Well"], how="left")
    held = sites[~((sites["Metadata_Compound"] == "DMSO") & sites["Metadata_Site"].isin([1, 3]))].reset_index(drop=True)
    sphered = held.copy()
    fits = {}
    for plate, idx in held.groupby("Metadata_Plate").groups.items():
        if fit_on == "cells":
            C = fit_cells[plate].to_numpy(np.float64)
        else:
            ctrl = sites[(sites["Metadata_Plate"] == plate) & (sites["Metadata_Compound"] == "DMSO")
                         & sites["Metadata_Site"].isin([1, 3])]
            C = ctrl[feats].to_numpy(np.float64)
        sphered.loc[idx, feats], fits[plate] = fit_and_transform(C, held.loc[idx, feats].to_numpy(), "zca-cor",
                                                                 regularization, epsilon)
    return {"before_sphering": separation(held, feats), "after_per_plate_sphering": separation(sphered, feats),
            "protocol": f"site profiles; per-plate zca-cor ({regularization} regularisation) fitted on the DMSO "
                        f"{fit_on} of sites 1 and 3, evaluated on DMSO sites 2 and 4 and on all drug sites",
            "fits": fits, "model_id": model_id}


def demo_bbbc021(out: Path, weights: Path | None, max_cells: int, num_cpus: int | None,
                 regularization: str = "faithful", epsilon: float | None = None) -> dict:
    """The BBBC021 mini-screen: 6 plates, DMSO in each, cycloheximide at 3 doses (pre-cropped cells)."""
    from microsnoop_ray.pipeline.executors import ray_runtime
    from microsnoop_ray.pipeline.plate_job import ProfileConfig, run_profile
    from microsnoop_ray.pipeline.run_report import write_run_report

    data = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "bbbc021_chx"
    if not (data / "cells.npz").exists():
        data = Path("../shared/data/bbbc021_chx").resolve()
    if not (data / "cells.npz").exists():
        raise SystemExit("the BBBC021 mini-screen needs ../shared/data/bbbc021_chx beside the repository")
    t0 = time.perf_counter()
    meta = pd.read_csv(data / "cells.csv")
    out.mkdir(parents=True, exist_ok=True)
    meta[["Metadata_Plate", "Metadata_Well", "Metadata_Compound", "Metadata_Concentration", "Metadata_moa",
          "Metadata_pert_type"]].drop_duplicates().to_csv(out / "platemap.csv", index=False)
    weights = _weights_or_untrained(weights, out)
    cfg = ProfileConfig.from_mapping({
        "inputs": [str(data / "cells.npz")], "cell_table": str(data / "cells.csv"), "out": str(out),
        "platemap": str(out / "platemap.csv"), "weights": str(weights) if weights else None,
        "channel_names": ["DNA", "ch1", "ch2"], "max_cells_per_site": max_cells, "cells_chunk": 128,
        "sphering": {"scope": "plate", "fit_on": "sites", "regularization": regularization, "epsilon": epsilon},
        "recipe": "sphere"})  # the screen's sphering is fitted on raw DMSO sites: it is the only step
    with ray_runtime(num_cpus=num_cpus):
        summary = run_profile(cfg)
    from microsnoop_ray.profiles.aggregate import feature_columns

    wells = {k: pd.concat([pd.read_parquet(out / o["path"]) for o in summary["outputs"] if o["level"] == level])
             for k, level in (("raw", WELL), ("sphered", WELL_SPHERED))}
    feats = feature_columns(wells["raw"])
    measured = {
        "wells_in_sample": {"before_sphering": separation(wells["raw"], feats),
                            "after_per_plate_sphering": separation(wells["sphered"], feats),
                            "note": "the pipeline's well profiles; each plate's sphering was fitted on its own DMSO "
                                    "sites, so the DMSO wells are the fit data (in-sample)"},
        "sites_held_out": heldout_separation(out, summary["model_id"], regularization, epsilon),
        "max_cells_per_site": max_cells}
    rep = write_run_report(out, summary, color_by="Metadata_Compound", extra=measured)
    summary["mini_screen"] = measured
    summary["report"] = str(rep)
    summary["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_json(summary, out / "summary.json")
    for name, m in (("wells (in-sample)", measured["wells_in_sample"]), ("held-out sites", measured["sites_held_out"])):
        b, a = m["before_sphering"], m["after_per_plate_sphering"]
        print(f"{name}: DMSO cross-plate / drug-to-DMSO distance ratio {b['ratio']:.3f} before, {a['ratio']:.3f} "
              f"after per-plate sphering; 1-NN DMSO-vs-drug accuracy {b['nn_accuracy']:.3f} -> "
              f"{a['nn_accuracy']:.3f}; dose Spearman {b['dose_spearman']:.2f} -> {a['dose_spearman']:.2f}")
    return summary


# ----------------------------------------------------------------------------- Cell Painting fragment

def demo_cellpainting(out: Path, weights: Path | None, max_cells: int, num_cpus: int | None) -> dict:
    """``make cellpainting``: the LINCS Cell Painting fragment (``../shared/data/lincs_cellpainting``) as a
    user runs it: its load_data.csv unchanged, nuclei on DNA and cells on AGP (Cellpose "cyto" from the
    package index), both feature sets in three compartments, JUMP's recipe and the copairs evaluation;
    then each site's nuclei against CellProfiler's own (the locations files)."""
    from microsnoop_ray.io.datasets import fetch_package_files
    from microsnoop_ray.pipeline.executors import ray_runtime
    from microsnoop_ray.pipeline.plate_job import ProfileConfig, run_profile
    from microsnoop_ray.pipeline.run_report import write_run_report

    data = Path(__file__).resolve().parents[2] / "shared" / "data" / "lincs_cellpainting"
    cyto = fetch_package_files("scellseg-assets") / "pretrained_models" / "cellpose"
    weights = _weights_or_untrained(weights, out)
    cfg = ProfileConfig.from_mapping({
        "inputs": [str(data / "load_data.csv")], "out": str(out), "platemap": str(data / "platemap.csv"),
        "weights": str(weights) if weights else None, "nuclei_channel": "DNA", "cell_channel": "AGP",
        "segmenter": "cellpose", "cellpose_model": str(cyto), "features": "microsnoop,cellprofiler",
        "max_cells_per_site": max_cells})
    print(f"profiling {data.name}: load_data.csv as it is, Cellpose nuclei (DNA) and cells (AGP + DNA), "
          f"at most {max_cells} cells a site measured and embedded")
    with ray_runtime(num_cpus=num_cpus):
        summary = run_profile(cfg)
    counts = nuclei_against_cellprofiler(out, summary["model_id"], data)
    rep = write_run_report(out, summary, color_by="Metadata_Compound", extra={"nuclei_vs_cellprofiler": counts})
    print(f"report in {rep}/README.md; nuclei/CellProfiler per site: "
          f"{', '.join(str(c['ratio']) for c in counts)}")
    return summary


def nuclei_against_cellprofiler(out: Path, model_id: str, data: Path) -> list[dict]:
    """Per site: the nuclei the run found (``Metadata_Site_Objects_Found``: after the border rule, before
    the subsample and the matching to cells) against CellProfiler's nuclei of that site."""
    rows = []
    for f in sorted((out / "embeddings" / model_id).glob("*/*/*/embeddings.parquet")):
        cells = pd.read_parquet(f, columns=["Metadata_Well", "Metadata_Site", "Metadata_Site_Objects_Found"])
        well, site = cells["Metadata_Well"].iloc[0], int(cells["Metadata_Site"].iloc[0])
        theirs = len(pd.read_csv(data / "locations" / "SQ00015198" / f"{well}-{site}-Nuclei.csv"))
        ours = int(cells["Metadata_Site_Objects_Found"].iloc[0])
        rows.append({"well": well, "site": site, "ours": ours, "cellprofiler": theirs, "ratio": round(ours / theirs, 3)})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("which", nargs="?", choices=("plate", "bbbc021", "cellpainting"), default="plate",
                    help="plate: the registry example (make demo); bbbc021: the mini-screen (make screen); "
                         "cellpainting: the LINCS Cell Painting fragment (make cellpainting)")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--max-cells-per-site", type=int, default=None)
    ap.add_argument("--num-cpus", type=int, default=None)
    args = ap.parse_args(argv)
    if args.which == "plate":
        demo_plate(args.out or Path("demo_output"), args.weights, args.max_cells_per_site or 24, args.num_cpus)
    elif args.which == "cellpainting":
        demo_cellpainting(args.out or Path("cellpainting_output"), args.weights, args.max_cells_per_site or 32,
                          args.num_cpus)
    else:
        demo_bbbc021(args.out or Path("screen_output"), args.weights, args.max_cells_per_site or 16, args.num_cpus)
    return 0


if __name__ == "__main__":
    sys.exit(main())
