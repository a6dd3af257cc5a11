import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from microsnoop_ray import embed, load_model
from microsnoop_ray.io.write import read_provenance


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "microsnoop_ray.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600)


def test_embed_round_trip_on_real_cells(tmp_path, published_ckpt, mlcp_cells):
    images, table = mlcp_cells
    images = images[:6]
    np.savez(tmp_path / "cells.npz", images=images, Phase=table["Metadata_Phase"].to_numpy()[:6].astype(str))
    table.iloc[:6][["Metadata_Experiment"]].to_csv(tmp_path / "meta.csv", index=False)
    out = tmp_path / "out.parquet"
    r = run_cli("embed", tmp_path / "cells.npz", "--weights", published_ckpt, "--out", out,
                "--channel-names", "BF,DNA,DF", "--metadata", tmp_path / "meta.csv", "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(out)
    assert list(df.columns[:3]) == ["Metadata_ImageIndex", "Metadata_Phase", "Metadata_Experiment"]
    assert df["Metadata_ImageIndex"].tolist() == list(range(6))
    assert df["Metadata_Phase"].tolist() == table["Metadata_Phase"].tolist()[:6]
    feats = [c for c in df.columns if not c.startswith("Metadata_")]
    assert feats[0] == "Microsnoop_BF_000" and feats[256] == "Microsnoop_DNA_000" and feats[-1] == "Microsnoop_DF_255"
    assert all(df[c].dtype == np.float32 for c in feats)
    expected = embed(images, load_model(published_ckpt))
    np.testing.assert_allclose(df[feats].to_numpy(), expected, atol=1e-6)
    prov = read_provenance(out)
    assert prov["channels"] == ["BF", "DNA", "DF"]
    assert prov["input_size"] == 64  # 40-px cells, the input-size study's rule
    assert prov["model_card"]["weights_sha256"] == load_model(published_ckpt).model_card.weights_sha256


def test_embed_input_size_224_is_the_published_pipeline(tmp_path, published_ckpt, published_sd, mlcp_cells):
    from reference import embed_reference

    images = mlcp_cells[0][:3]
    np.save(tmp_path / "cells.npy", images)
    out = tmp_path / "out.parquet"
    r = run_cli("embed", tmp_path / "cells.npy", "--weights", published_ckpt, "--out", out,
                "--input-size", "224", "--precision", "fp32")
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(out)
    feats = [c for c in df.columns if not c.startswith("Metadata_")]
    np.testing.assert_allclose(df[feats].to_numpy(), embed_reference(images, published_sd), atol=1e-5)
    assert read_provenance(out)["input_size"] == 224


def test_embed_folder_of_tiffs(tmp_path, published_ckpt, mlcp_cells):
    import tifffile
    folder = tmp_path / "tiffs"
    folder.mkdir()
    for i in range(2):
        tifffile.imwrite(folder / f"cell_{i}.tif", mlcp_cells[0][i], photometric="minisblack")
    out = tmp_path / "t.parquet"
    r = run_cli("embed", folder, "--weights", published_ckpt, "--out", out)
    assert r.returncode == 0, r.stderr
    df = pd.read_parquet(out)
    assert df["Metadata_FileName"].tolist() == ["cell_0.tif", "cell_1.tif"]
    np.testing.assert_allclose(df.filter(like="Microsnoop_ch2_").to_numpy(),
                               embed(mlcp_cells[0][:2, 2:3], load_model(published_ckpt)), atol=1e-6)


@pytest.mark.parametrize("case,problem", [
    ("missing", "does not exist"),
    ("ndim", "expected 4 (N, C, H, W)"),
    ("dtype", "not numeric"),
    ("nan", "image 1 has NaN"),
    ("large", "larger than 224x224"),
    ("weights", "not a readable PyTorch checkpoint"),
    ("channels", "--channel-names"),
])
def test_embed_errors_are_one_clear_line(tmp_path, published_ckpt, case, problem):
    src = tmp_path / f"{case}.npy"
    weights = published_ckpt
    extra = []
    if case == "ndim":
        np.save(src, np.zeros((3, 40, 40), np.uint16))
    elif case == "dtype":
        np.save(src, np.array([[[["x"]]]]))
    elif case == "nan":
        x = np.ones((2, 1, 8, 8), np.float32)
        x[1, 0, 0, 0] = np.nan
        np.save(src, x)
    elif case == "large":
        np.save(src, np.zeros((1, 1, 300, 300), np.uint16))
    elif case == "weights":
        np.save(src, np.zeros((1, 1, 8, 8), np.uint16))
        weights = tmp_path / "w.pth"
        weights.write_text("nonsense")
    elif case == "channels":
        np.save(src, np.zeros((1, 2, 8, 8), np.uint16))
        extra = ["--channel-names", "DNA"]
    r = run_cli("embed", src, "--weights", weights, "--out", tmp_path / "o.parquet", *extra)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert problem in lines[0]
    named = weights if case == "weights" else src
    assert str(named) in lines[0]
    assert not (tmp_path / "o.parquet").exists()


@pytest.mark.slow
def test_a_plain_profile_prints_only_its_own_lines(transfluor_plate, untrained_weights, tmp_path):
    """A first run on a machine (a fresh HOME: no Ray token yet) prints the job's lines and nothing of Ray:
    no token-authentication notice, no Ray warnings; they go to the log file."""
    import os

    plate, platemap = transfluor_plate
    env = {**os.environ, "HOME": str(tmp_path / "home")}
    env.pop("RAY_ADDRESS", None)
    r = subprocess.run([sys.executable, "-m", "microsnoop_ray.cli", "profile", str(plate), "--platemap", str(platemap),
                        "--out", str(tmp_path / "out"), "--weights", str(untrained_weights), "--segmenter", "classical",
                        "--max-cells-per-site", "2", "--num-cpus", "2"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode in (0, 3), r.stderr[-3000:]  # 3: some site had no cell (listed in skipped.csv)
    lines = [line for line in (r.stdout + r.stderr).splitlines() if line.strip()]
    ours = ("microsnoop-ray profile:", "  Transfluor", "profiles in ")
    assert lines and all(line.startswith(ours) or " WARNING microsnoop_ray." in line for line in lines), lines
    assert (tmp_path / "home" / ".ray" / "auth_token").exists()  # token authentication stayed on
    assert (tmp_path / "out" / "logs" / "profile.log").stat().st_size > 0  # Ray's messages went there
