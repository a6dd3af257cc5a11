"""``make demo``: profile a real JUMP Cell Painting field end to end.

Fetches one real field (plate BR00116991, well A01, site 1; five 1080 x 1080
channels, CC0) with its 109 CellProfiler nuclei from the ``deepprofiler``
distribution on the package index, cuts METHOD.md cell-region crops around the
nuclei, embeds all five channels, and writes single-cell and field profiles in
the Cell Painting Gallery layout, plus a picture of the crop windows.

Weights: ``--weights FILE`` if given, else the default weights shipped in the
package. If neither exists, the demo says so loudly and uses a *randomly
initialised* network whose model card says "untrained": the run then checks the
machinery, not the biology.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

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


def untrained_checkpoint(path: Path) -> Path:
    import torch

    from .model import MicrosnoopUNet, ModelCard, save_model

    torch.manual_seed(0)
    save_model(MicrosnoopUNet(), path, ModelCard(
        model_id="microsnoop-UNTRAINED-{hash}", weights_sha256="", training_data="none (random initialisation)",
        epochs=0, notes="Randomly initialised network for a pipeline check only; its profiles carry no learned biology."))
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("demo_output"))
    ap.add_argument("--weights", type=Path, default=None)
    ap.add_argument("--rescale-constant", type=float, default=2.5)
    args = ap.parse_args(argv)

    from .crop import crop_cells
    from .qc import draw_field
    from .encode import Encoder, embed, feature_names
    from .io.registry import fetch_package_files
    from .io.write import profile_table, write_parquet
    from .model import default_weights_path

    t0 = time.perf_counter()
    print("1/4 fetching a real JUMP Cell Painting field from the package index (deepprofiler 0.5.1 sdist) ...")
    folder = fetch_package_files("jump-field")
    image, boxes = load_jump_field(folder)
    print(f"    field {image.shape} {image.dtype}, {len(boxes)} CellProfiler nuclei")

    weights = args.weights
    if weights is None and default_weights_path() is None:
        weights = untrained_checkpoint(args.out / "untrained_random_init.pt")
        print("    WARNING: no trained default weights are shipped in this version and no --weights was given;\n"
              "    using a RANDOMLY INITIALISED network (model card says so). Pass --weights FILE (e.g. the\n"
              "    published Microsnoop .pth) for meaningful profiles.")
    encoder = Encoder(weights, compile=False)
    card = encoder.model_card

    print("2/4 cutting cell-region crops (METHOD.md section 4) ...")
    crops, table, rejected = crop_cells(image, bboxes=boxes, rescale_constant=args.rescale_constant)

    print(f"3/4 embedding {len(crops)} cells x {len(JUMP_CHANNELS)} channels with {card.model_id} ...")
    t1 = time.perf_counter()
    feats = embed(crops, encoder=encoder, batch_size=20, progress=sys.stderr.isatty())
    t_embed = time.perf_counter() - t1

    print("4/4 writing profiles ...")
    key = {"Metadata_Batch": "cpg0000-jump-pilot", "Metadata_Plate": "BR00116991", "Metadata_Well": "A01",
           "Metadata_Site": 1}
    cells = pd.concat([pd.DataFrame({k: [v] * len(table) for k, v in key.items()}), table], axis=1)
    names = feature_names(list(JUMP_CHANNELS))
    prov = {"command": "demo", "model_card": card.to_dict(), "rescale_constant": args.rescale_constant,
            "channels": list(JUMP_CHANNELS), "source": "deepprofiler==0.5.1 tests/data/cpg0000 (CC0)"}
    root = args.out / "embeddings" / card.model_id / key["Metadata_Batch"] / key["Metadata_Plate"] / "A01-1"
    cell_path = write_parquet(profile_table(cells, feats, names), root / "embeddings.parquet", prov)
    field = pd.DataFrame({**{k: [v] for k, v in key.items()}, "Metadata_Object_Count": [len(table)]})
    prof_root = args.out / "profiles" / card.model_id / key["Metadata_Batch"] / key["Metadata_Plate"]
    field_path = write_parquet(profile_table(field, feats.mean(axis=0, keepdims=True), names),
                               prof_root / "BR00116991_fields.parquet", {**prov, "aggregation": "mean"})
    png = draw_field(image[0], args.out / "A01-1_crops.png", windows=table,
                     title=f"BR00116991 A01 site 1: {len(table)} cell-region crops (DNA channel)")
    summary = {"cells_embedded": int(len(table)), "nuclei_rejected": int(len(rejected)),
               "features_per_cell": int(feats.shape[1]), "embed_seconds": round(t_embed, 1),
               "cells_per_second": round(len(table) / t_embed, 2), "model_id": card.model_id,
               "weights_trained": card.training_data != "none (random initialisation)",
               "outputs": [str(cell_path), str(field_path), str(png)],
               "total_seconds": round(time.perf_counter() - t0, 1)}
    (args.out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
