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
    """A path under the shared real data; a test that asks for a missing one is skipped, saying which."""
    p = SHARED.joinpath(*parts)
    if not p.exists():
        pytest.skip(f"needs the real data {p} (../shared/data beside the checkout, or MICROSNOOP_SHARED_DATA)")
    return p


def transfluor_images() -> Path:
    """The real Transfluor row of CellProfiler's illumination-correction example (one GFP channel)."""
    return shared("pretrain", "cellprofiler_examples", "ExampleIlluminationCorrection", "images")


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
    from microsnoop_ray.io.datasets import fetch_package_files

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


@pytest.fixture(scope="session")
def ray_session():
    """One small local Ray runtime for the whole test session (2 CPUs, no dashboard)."""
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 2**20, log_to_driver=False,
             configure_logging=False)
    import ray.data
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def untrained_weights(tmp_path_factory):
    """A randomly initialised network in the microsnoop-ray format (fixed seed)."""
    from microsnoop_ray.model import save_random_init

    return save_random_init(tmp_path_factory.mktemp("weights") / "untrained.pt")


TRANSFLUOR_PATTERN = r"AS_\d+_\d+_(?P<well>[A-P]\d{2})f(?P<site>\d{2})d(?P<channel>\d)\.TIF"


@pytest.fixture(scope="session")
def transfluor_plate(tmp_path_factory):
    """The real Transfluor row (wells O01-O08, 3 fields each) as an NGFF 0.4 plate, with a plate map."""
    import shutil

    from microsnoop_ray.io.convert import convert_folder

    src = tmp_path_factory.mktemp("transfluor-src")
    for f in transfluor_images().glob("AS_*_O0[1-8]f*d2.TIF"):
        shutil.copy(f, src / f.name)
    root = tmp_path_factory.mktemp("plates")
    plate = convert_folder(src, TRANSFLUOR_PATTERN, root / "Transfluor.zarr", channel_names={"2": "GFP"},
                           version="0.4")
    wells = [f"O{c:02d}" for c in range(1, 9)]
    pm = pd.DataFrame({"well_position": wells,
                       "pert_type": ["negcon"] * 3 + ["trt"] * 5,
                       "Compound": ["DMSO"] * 3 + ["cpdA", "cpdA", "cpdB", "cpdB", "cpdB"],
                       "Concentration": [0.0] * 3 + [1.0, 1.0, 2.0, 2.0, 2.0]})
    pm.to_csv(root / "platemap.csv", index=False)
    return plate, root / "platemap.csv"


# What each test needs, as markers (`-m "not slow"`, `-m "not network"`, ...): `cluster` for the
# multi-node cluster, `network` for files fetched from the package index, `data` for ../shared/data.
# `slow` is set by hand on the tests that take more than about 20 s here.
_DATA_FIXTURES = {"mlcp_cells", "transfluor_plate", "profiled"}
_NETWORK_FIXTURES = {"registry_example", "stardist_nuclei"}


def pytest_collection_modifyitems(config, items):
    import inspect
    from collections import Counter

    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if "cluster" in fixtures:
            item.add_marker(pytest.mark.cluster)
        if fixtures & _NETWORK_FIXTURES:
            item.add_marker(pytest.mark.network)
        source = inspect.getsource(item.function) if hasattr(item, "function") else ""
        if fixtures & _DATA_FIXTURES or any(s in source for s in ("shared(", "transfluor_images(", "SHARED")):
            item.add_marker(pytest.mark.data)
    # The cluster's tests first, then the modules with the most slow tests: `make test` hands whole
    # modules to two workers (pytest-xdist, --dist loadfile) in this order, and the longest ones
    # started first finish together. Stable sort: a module's tests keep their order.
    slow = Counter(item.module.__name__ for item in items if item.get_closest_marker("slow"))
    items.sort(key=lambda item: (not item.get_closest_marker("cluster"), -slow[item.module.__name__]))
