"""A real multi-node Ray cluster on loopback (cluster/local_cluster.py): jobs submitted with
``ray job submit``, a worker node killed in the middle of a plate, a job stopped and resumed.

The cluster is this module's own Ray runtime (a head and two worker raylets); the in-process
``ray_session`` of the other tests is not used here.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import psutil
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "cluster"))
from local_cluster import LocalCluster  # noqa: E402

RAY = str(Path(sys.executable).with_name("ray"))
WORKER = {"cropper": 2, "encoder": 2}  # room for the whole pool on one node after the other is lost
N_SITES = 24  # the Transfluor plate: 8 wells x 3 fields


@pytest.fixture(scope="module")
def cluster():
    root = Path(tempfile.mkdtemp(prefix="msr-", dir="/tmp"))  # short: Ray's socket paths are limited
    c = LocalCluster(root, head_cpus=1, object_store_mb=200)
    try:
        c.start_head()
        c.add_worker("node-a", 3, WORKER)
        c.add_worker("node-b", 3, WORKER)
        yield c
    finally:
        pids = c.pids()
        c.stop()
        left = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
        shutil.rmtree(root, ignore_errors=True)
        assert not left, f"processes left running: {left}"


def _config(tmp: Path, name: str, plate, platemap, weights) -> Path:
    cfg = {"inputs": [str(plate)], "out": str(tmp / name), "platemap": str(platemap), "weights": str(weights),
           "segmenter": "classical", "max_cells_per_site": 3, "batch": "cluster", "progress": False,
           "batch_size": 8, "crop_actors": 2, "encoder_actors": 2, "encoder_threads": 1,
           "crop_resources": {"cropper": 1}, "encode_resources": {"encoder": 1}}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _submit(cluster, config: Path, job_id: str, wait: bool = True):
    cmd = [RAY, "job", "submit", "--submission-id", job_id, "--", sys.executable,
           str(ROOT / "jobs" / "profile_plates.py"), "--config", str(config), "--quiet"]
    if wait:
        return subprocess.run(cmd, env=cluster.env(), capture_output=True, text=True, timeout=600)
    return subprocess.Popen(cmd, env=cluster.env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _job_ok(r) -> bool:
    """The job ran to its end: exit 0, or the profile command's 3 (some sites had no cells and are listed
    in skipped.csv), which Ray reports as a failed job."""
    text = (r.stdout or "") + (r.stderr or "")
    return r.returncode == 0 or "failed with exit code 3" in text


def _sites(out: Path) -> list[Path]:
    return sorted(out.glob("embeddings/*/cluster/Transfluor/*/embeddings.parquet"))


def _wait_for_sites(out: Path, n: int, proc, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while len(_sites(out)) < n:
        assert proc.poll() is None, f"job ended before {n} sites were written:\n{proc.stdout.read()[-3000:]}"
        assert time.time() < deadline, "no progress"
        time.sleep(0.2)


def _assert_same_output(a: Path, b: Path) -> None:
    sa, sb = _sites(a), _sites(b)
    assert [p.relative_to(a) for p in sa] == [p.relative_to(b) for p in sb]
    for fa, fb in zip(sa, sb):
        ca, cb = pd.read_parquet(fa), pd.read_parquet(fb)
        assert cb["Metadata_ObjectNumber"].is_unique  # nothing written twice
        assert ca["Metadata_ObjectNumber"].tolist() == cb["Metadata_ObjectNumber"].tolist()
        feats = [c for c in ca if not c.startswith("Metadata_")]
        np.testing.assert_allclose(ca[feats].to_numpy(), cb[feats].to_numpy(), atol=1e-5)
    wa = pd.read_parquet(next(a.glob("profiles/*/cluster/Transfluor/Transfluor.parquet")))
    wb = pd.read_parquet(next(b.glob("profiles/*/cluster/Transfluor/Transfluor.parquet")))
    assert wa["Metadata_Well"].tolist() == wb["Metadata_Well"].tolist()
    feats = [c for c in wa if not c.startswith("Metadata_")]
    np.testing.assert_allclose(wa[feats].to_numpy(), wb[feats].to_numpy(), atol=1e-5)
    assert pd.read_csv(a / "skipped.csv").equals(pd.read_csv(b / "skipped.csv"))


def _busy_processes(node) -> list[str]:
    names = []
    for pid in node.pids:
        try:
            names.append(" ".join(psutil.Process(pid).cmdline()))
        except psutil.NoSuchProcess:
            pass
    return [n for n in names if "ray::" in n]


@pytest.mark.slow
def test_token_is_required(cluster):
    env = {k: v for k, v in cluster.env().items() if not k.startswith("RAY_AUTH")}
    r = subprocess.run([RAY, "job", "list"], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "token" in (r.stdout + r.stderr).lower()
    r = subprocess.run([RAY, "job", "list"], env=cluster.env(), capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]


def _accounted_for(out: Path) -> dict:
    """Every site of the plate has its embeddings or its skip note, once; the summary agrees."""
    dirs = sorted(out.glob("embeddings/*/cluster/Transfluor/*"))
    assert len(dirs) == N_SITES, [d.name for d in dirs]
    written = [d for d in dirs if (d / "embeddings.parquet").exists()]
    skipped = [d for d in dirs if (d / "skipped.json").exists()]
    assert len(written) + len(skipped) == N_SITES and not set(written) & set(skipped)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["plates"]["Transfluor"]["sites"] == len(written)
    return summary


@pytest.mark.slow
def test_lost_node_and_stopped_job_give_the_same_complete_output(cluster, transfluor_plate, untrained_weights,
                                                                 tmp_path):
    """Two runs disturbed in different ways (a node lost; a job stopped and resumed) must each account for
    every site exactly once and agree cell for cell: a site lost, written twice or written wrong by
    either disturbance shows."""
    plate, platemap = transfluor_plate
    # 1. the whole worker node-b is killed (SIGKILL to its raylet and workers) in the middle of the plate
    lost = tmp_path / "lost"
    proc = _submit(cluster, _config(tmp_path, "lost", plate, platemap, untrained_weights), "lost", wait=False)
    _wait_for_sites(lost, 3, proc)
    cluster._record_pids()
    assert _busy_processes(cluster.nodes["node-b"]), "node-b ran no actor or task: the kill would prove nothing"
    cluster.kill_node("node-b")
    written_at_kill = len(_sites(lost))
    log = proc.communicate(timeout=600)[0]
    assert _job_ok(subprocess.CompletedProcess(proc.args, proc.returncode, log, "")), log[-4000:]
    _accounted_for(lost)
    n_sites = len(_sites(lost))
    assert n_sites >= 12 and written_at_kill < n_sites, "the plate was already finished when the node was killed"
    cluster.add_worker("node-b", 3, WORKER)

    # 2. `ray job stop` in the middle, then the same command again: only the missing sites are done
    config = _config(tmp_path, "stopped", plate, platemap, untrained_weights)
    proc = _submit(cluster, config, "stopped-1", wait=False)
    _wait_for_sites(tmp_path / "stopped", 3, proc)
    stop = subprocess.run([RAY, "job", "stop", "stopped-1"], env=cluster.env(), capture_output=True, text=True,
                          timeout=180)
    assert stop.returncode == 0, stop.stderr[-2000:]
    proc.communicate(timeout=300)
    before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in _sites(tmp_path / "stopped")}
    assert 3 <= len(before) < n_sites
    r = _submit(cluster, config, "stopped-2")
    assert _job_ok(r), (r.stdout + r.stderr)[-4000:]
    for p, stamp in before.items():
        assert (p.stat().st_ino, p.stat().st_mtime_ns) == stamp, f"{p} was written again"
    summary = _accounted_for(tmp_path / "stopped")
    assert summary["this_run"]["sites_written"] + len(before) == n_sites
    _assert_same_output(lost, tmp_path / "stopped")


def test_cloud_and_kuberay_configs_keep_token_auth_and_match_the_stack():
    import ray

    from microsnoop_ray.pipeline.plate_job import ProfileConfig

    aws = yaml.safe_load((ROOT / "cluster" / "aws-screen.yaml").read_text())
    types = aws["available_node_types"]
    assert types["encoder"]["resources"]["GPU"] == 1 and "cropper" in types["cropper"]["resources"]
    starts = " ".join(aws["head_start_ray_commands"] + aws["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2 and "disabled" not in starts
    assert "--dashboard-host=127.0.0.1" in starts
    job = yaml.safe_load((ROOT / "cluster" / "kuberay-profile-job.yaml").read_text())
    assert job["kind"] == "RayJob" and job["spec"]["rayClusterSpec"]["rayVersion"] == ray.__version__
    head = job["spec"]["rayClusterSpec"]["headGroupSpec"]
    assert {"name": "RAY_AUTH_MODE", "value": "token"} in head["template"]["spec"]["containers"][0]["env"]
    groups = {g["groupName"]: g for g in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}
    assert "encoder" in groups["encoder"]["rayStartParams"]["resources"]
    cfg = ProfileConfig.from_mapping(yaml.safe_load((ROOT / "cluster" / "screen-profile.example.yaml").read_text()))
    assert cfg.crop.resources == {"cropper": 1} and cfg.encode.resources == {"encoder": 1}


def test_worker_specs_and_whole_cpus():
    from local_cluster import Node, _parse_worker

    assert _parse_worker("encoder:2:encoder=1,gpu_slot=0.5") == ("encoder", 2.0, {"encoder": 1.0, "gpu_slot": 0.5})
    assert _parse_worker("plain:3") == ("plain", 3.0, {})
    c = LocalCluster(Path(tempfile.mkdtemp(prefix="msr-", dir="/tmp")))
    with pytest.raises(ValueError, match="whole CPUs"):
        c._start(Node("half", 1.5, {}), [])
    shutil.rmtree(c.root)
