"""Pretraining: masking, schedule, the pool, Ray Train workers, checkpoint/resume, shipped weights."""
import json
import math
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from conftest import shared
from microsnoop_ray.train.data import TypeAlternatingSampler, batch_stream, build_pool, to_planes
from microsnoop_ray.train.config import TrainConfig
from microsnoop_ray.train.loop import latest_checkpoint, train_local, train_with_ray
from microsnoop_ray.train.masking import learning_rate, mask_patches

def human() -> str:
    return str(shared("pretrain", "cellprofiler_examples", "ExampleHuman"))


def fly() -> str:
    return str(shared("pretrain", "cellprofiler_examples", "ExampleFly"))


def test_exactly_a_quarter_of_the_patches_are_zeroed():
    x = torch.rand(5, 1, 224, 224) + 0.5  # no zero pixels of its own
    masked, mask = mask_patches(x, 16, 0.25, torch.Generator().manual_seed(1))
    grid = mask[:, 0, ::16, ::16]
    assert grid.shape == (5, 14, 14) and (grid.sum(dim=(1, 2)) == 49).all()
    assert (mask.float().mean(dim=(1, 2, 3)) == 0.25).all()
    assert (masked[mask] == 0).all() and torch.equal(masked[~mask], x[~mask])
    blocks = mask[:, 0].reshape(5, 14, 16, 14, 16)  # whole patches, never parts of one
    assert (blocks.all(dim=(2, 4)) == blocks.any(dim=(2, 4))).all()
    assert not torch.equal(mask[0], mask[1])


def test_schedule_values():
    assert learning_rate(0) == 0.0
    assert learning_rate(20) == pytest.approx(5e-4)
    assert learning_rate(40) == pytest.approx(1e-3)
    assert learning_rate(520) == pytest.approx(5e-4)
    assert learning_rate(999) == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * 959 / 960)))
    assert learning_rate(999) < 1e-8


def test_pool_splits_channels_and_batches_alternate_types():
    assert len(to_planes(np.zeros((3, 40, 50)))) == 3
    rgb = np.stack([np.arange(40 * 50).reshape(40, 50)] * 3, axis=-1) * np.array([1, 2, 3])
    assert len(to_planes(rgb)) == 1 and len(to_planes(rgb, "split")) == 3
    pool = build_pool([{"kind": "folder", "path": human(), "type": "human"},
                       {"kind": "folder", "path": fly(), "type": "fly"}])
    assert set(pool.types) == {"human", "fly"}
    sampler = TypeAlternatingSampler(pool, batch_size=4, size=64, seed=0)
    kinds = [sampler.next_batch()[1] for _ in range(6)]
    assert all(a != b for a, b in zip(kinds, kinds[1:]))
    batch, _ = sampler.next_batch()
    assert batch.shape == (4, 1, 64, 64) and batch.dtype == np.float32


def test_loader_processes_give_one_type_per_batch_reproducibly():
    import itertools
    pool = build_pool([{"kind": "folder", "path": human(), "type": "human"},
                       {"kind": "folder", "path": fly(), "type": "fly"}])

    def draw(workers, seed=3):
        return list(itertools.islice(batch_stream(pool, 4, 64, seed=seed, workers=workers), 6))

    two = draw(2)
    assert all(b.shape == (4, 1, 64, 64) and b.dtype == torch.float32 for b, _ in two)
    assert {k for _, k in two} == {"human", "fly"}
    # each loader process alternates types; the stream takes their batches in turn
    assert all(a != b for (_, a), (_, b) in zip(two[::2], two[2::2]))
    again = draw(2)
    assert all(torch.equal(a, b) and ka == kb for (a, ka), (b, kb) in zip(two, again))
    assert not torch.equal(two[0][0], draw(2, seed=4)[0][0])
    inproc = draw(0)  # the in-process stream is the plain sampler
    sampler = TypeAlternatingSampler(pool, 4, 64, seed=3)
    assert all(torch.equal(b, torch.from_numpy(sampler.next_batch()[0])) for b, _ in inproc)


def test_a_source_that_gives_no_image_is_an_error_naming_it(tmp_path):
    from microsnoop_ray.errors import InputError
    bad = tmp_path / "lab-screen"
    bad.mkdir()
    (bad / "field01.tif").write_bytes(b"not a tiff at all")
    with pytest.raises(InputError, match=r"lab-screen.*gave no image \(1 skipped\).*field01\.tif"):
        build_pool([{"kind": "folder", "path": human()}, {"kind": "folder", "path": str(bad)}])
    pool = build_pool([{"kind": "folder", "path": human()}])  # a readable source alone is fine
    assert len(pool) == 3 and pool.skipped == []


def _cfg(tmp_path, **kw):
    base = dict(sources=[{"kind": "folder", "path": human()}], storage_path=str(tmp_path), input_size=64,
                batch_size=8, epoch_size=32, nepoch=4, warmup=0, threads=1, seed=0)
    base.update(kw)
    return TrainConfig.from_mapping(base)


@pytest.mark.slow
def test_two_ray_train_workers_reduce_the_loss(ray_session, tmp_path):
    cfg = _cfg(tmp_path, name="ddp", num_workers=2, nepoch=3, epoch_size=64)
    result = train_with_ray(cfg)
    losses = [h["loss"] for h in result["history"]]
    assert len(losses) == 3 and losses[-1] < losses[0]
    assert result["history"][-1]["images_seen"] == 3 * 64
    card = result["model_card"]
    assert card["images_seen"] == 3 * 64 and card["extra"]["loss_curve"] == [round(x, 5) for x in losses]
    from microsnoop_ray.model.load import load_model, weights_hash
    model = load_model(tmp_path / "ddp" / "microsnoop_pretrained.pt")
    assert weights_hash({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}) \
        == card["weights_sha256"]


@pytest.mark.slow
def test_killed_run_resumes_from_its_last_checkpoint(tmp_path):
    config = _cfg(tmp_path, name="killme", nepoch=40, epoch_size=16).to_dict()
    (tmp_path / "c.json").write_text(json.dumps(config))
    yaml_cfg = tmp_path / "c.yaml"
    import yaml
    yaml_cfg.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "microsnoop_ray.cli", "train", "--config", str(yaml_cfg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    run = tmp_path / "killme"
    deadline = time.time() + 240
    while time.time() < deadline:
        ck = latest_checkpoint(run)
        if ck is not None and int(ck.stem.split("-")[1]) >= 1:
            break
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    saved = torch.load(latest_checkpoint(run), weights_only=True)
    done = int(saved["epoch"])
    assert 1 <= done < 39
    history_before = json.loads(saved["history"])
    cfg = TrainConfig.from_mapping({**config, "stop_epoch": done + 2})
    result = train_local(cfg)
    epochs = [h["epoch"] for h in result["history"]]
    assert epochs == list(range(done + 2))  # continued at done + 1, not from zero
    assert result["history"][:done + 1] == history_before


def test_default_weights_are_the_study_winner_with_card_and_licence():
    """The default is the weights study's winner: encoder only, fp16 on disk, its card naming the source,
    the preprocessing contract and the study; the upstream licence notice and the model card beside it."""
    from microsnoop_ray.model.load import default_weights_path, load_model, weights_hash

    path = default_weights_path()
    assert path is not None, "no default weights shipped in microsnoop_ray/weights/"
    model = load_model()
    card = model.model_card
    raw = torch.load(path, weights_only=True)
    assert weights_hash(raw["state_dict"]) == card.weights_sha256
    assert all(k.startswith("encoder.") for k in raw["state_dict"])
    assert {v.dtype for v in raw["state_dict"].values() if v.is_floating_point()} == {torch.float16}
    assert not model.has_decoder
    assert "scellseg 0.1.8" in card.source and card.input_size == 224
    assert card.extra["weights_study"]["winner"] in card.model_id
    assert {"input_size", "padding", "normalisation"} <= set(card.extra["preprocessing"])
    notice = (path.parent / "microsnoop_default.LICENSE").read_text()
    assert "Zhejiang University" in notice and "Howard Hughes Medical Institute" in notice
    assert card.weights_sha256 in (path.parent / "MODEL_CARD.md").read_text()


def test_mae_weights_stay_loadable_with_their_decoder():
    from microsnoop_ray.model.load import load_model, mae_weights_path, weights_hash

    model = load_model(mae_weights_path())
    card = model.model_card
    assert card.model_id == "microsnoop-ray-gpu-224-0eb2f79e"
    assert weights_hash(torch.load(mae_weights_path(), weights_only=True)["state_dict"]) == card.weights_sha256
    assert card.images_seen and card.images_seen > 0 and card.extra["hardware"]
    assert model.has_decoder  # full network: it can reconstruct and be fine-tuned


def test_pool_reads_plates_and_cell_arrays(transfluor_plate, tmp_path):
    plate, _ = transfluor_plate
    import tifffile
    field = tifffile.imread(shared("pretrain", "cellprofiler_examples", "ExampleHuman", "images",
                                   sorted(p.name for p in (shared("pretrain", "cellprofiler_examples", "ExampleHuman",
                                                                  "images")).glob("*.tif"))[0]))
    cells = np.stack([np.stack([field[:40, :40], field[40:80, :40]]) for _ in range(3)])  # (3, 2, 40, 40)
    np.save(tmp_path / "cells.npy", cells)
    pool = build_pool([{"kind": "plate", "path": str(plate)}, {"kind": "cells", "path": str(tmp_path / "cells.npy"),
                                                               "type": "crops"}])
    summary = pool.summary()
    assert summary["Transfluor"]["planes"] == 24  # 8 wells x 3 fields x 1 channel
    assert summary["crops"]["planes"] == 6  # 3 cells x 2 channels, each its own one-channel image


@pytest.mark.slow
def test_mae_weights_reconstruct_held_out_cells_better_than_random_and_zero():
    """Held-out real cells (BBBC021 crops, never in a pretraining pool), every channel."""
    from microsnoop_ray.model import MicrosnoopUNet
    from microsnoop_ray.model.load import load_model, mae_weights_path
    from microsnoop_ray.train.reconstruct import center_target, reconstruct
    cells = np.load(shared("bbbc021_chx", "cells.npz"))["images"][::997][:5]  # spread over the plates
    targets = np.stack([center_target(plane) for cell in cells for plane in cell])
    trained = reconstruct(load_model(mae_weights_path()), targets, seed=1)
    torch.manual_seed(0)
    random = reconstruct(MicrosnoopUNet(), targets, seed=1)
    mse, zero = trained["mse_masked"].mean(), trained["mse_masked_zero"].mean()
    assert mse < 0.5 * zero and mse < 0.5 * trained["mse_masked_mean"].mean()
    assert mse < 0.2 * random["mse_masked"].mean()


def test_reconstruct_command_writes_the_figure_of_the_busiest_window(tmp_path):
    from microsnoop_ray.io.images import read_field
    from microsnoop_ray.train.reconstruct import busiest_window, center_target
    field = sorted((shared("pretrain", "cellprofiler_examples", "ExampleHuman", "images")).glob("*.tif"))[0]
    plane = read_field(field)[0].astype(np.float32)  # what the command embeds: channel 0
    top, left = busiest_window(plane, 224)
    stds = [plane[t:t + 224, l:l + 224].std() for t in range(0, plane.shape[0] - 223, 56)
            for l in range(0, plane.shape[1] - 223, 56)]
    assert plane[top:top + 224, left:left + 224].std() == pytest.approx(max(stds))
    np.testing.assert_array_equal(center_target(plane, 224, (top, left)),
                                  center_target(plane[top:top + 224, left:left + 224], 224))
    out = tmp_path / "fig2.png"
    r = subprocess.run([sys.executable, "-m", "microsnoop_ray.cli", "reconstruct", str(field), "--window", "busiest",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert out.stat().st_size > 10_000 and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["mse_masked"] < report["mse_masked_zero_prediction"]
