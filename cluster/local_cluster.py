"""A multi-node Ray cluster on one machine, on loopback, for tests, benchmarks and laptops.

Starts a head node and worker nodes as separate raylets (``ray start --block``), each with its own
CPUs and custom resources (e.g. a ``cropper`` and an ``encoder`` node), all bound to 127.0.0.1.
Token authentication stays on: the launcher writes a fresh token into the cluster folder and hands
``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH`` to every Ray process it starts and to
:meth:`LocalCluster.env` for clients (``ray job submit``). It stops exactly the processes it
started (by their process groups and recorded descendants), never ``ray stop``, which would end
every Ray process on the machine.

Command line::

    python cluster/local_cluster.py up --workers cropper:2:cropper=2 encoder:2:encoder=1 --root /tmp/msr
    eval "$(python cluster/local_cluster.py env --root /tmp/msr)"   # RAY_ADDRESS, token variables
    ray job submit -- python jobs/profile_plates.py ...
    python cluster/local_cluster.py down --root /tmp/msr
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))


def free_ports(n: int) -> list[int]:
    """``n`` distinct TCP ports that were free on 127.0.0.1 a moment ago."""
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def free_port_range(n: int = 100, taken: set | None = None) -> int:
    """The first port of ``n`` consecutive ports, below the kernel's ephemeral range (where
    :func:`free_ports` and Ray's own random ports land), that were all free a moment ago."""
    import random

    taken = taken if taken is not None else set()
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(11000, 29000 - n, 100)
        if any(b <= base < b + n or base <= b < base + n for b in taken):
            continue
        socks = []
        try:
            for port in range(base, base + n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        taken.add(base)
        return base
    raise RuntimeError(f"no free range of {n} ports between 11000 and 29000")


@dataclass
class Node:
    name: str
    num_cpus: float
    resources: dict
    proc: subprocess.Popen | None = None  # only where this process started the node
    pgid: int | None = None  # the node's process group: its `ray start --block` process
    pids: set = field(default_factory=set)
    log: Path | None = None

    def to_dict(self) -> dict:
        return {"name": self.name, "num_cpus": self.num_cpus, "resources": self.resources, "pgid": self.pgid,
                "pids": sorted(self.pids), "log": str(self.log) if self.log else None}


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None


def _is_ray_process(pid: int) -> bool:
    """Still one of Ray's processes (not a pid the system has reused since it was recorded)."""
    import psutil

    try:
        return "ray" in " ".join(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):  # gone, a zombie, or not ours
        return False


class LocalCluster:
    """Head plus worker raylets on 127.0.0.1.

    Parameters
    ----------
    root : folder for the token, logs, Ray's temp dir and ``cluster.json`` (keep the path short:
        Ray's socket paths must stay under 108 characters)
    head_cpus : logical CPUs of the head (the job driver and the read tasks run there)
    object_store_mb : object store of every node
    dashboard : start the dashboard (needed by ``ray job submit``), bound to 127.0.0.1
    """

    def __init__(self, root: str | Path, head_cpus: float = 1, object_store_mb: int = 200, dashboard: bool = True,
                 head_resources: dict | None = None):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.head_cpus, self.object_store = head_cpus, int(object_store_mb) * 2 ** 20
        self.dashboard, self.head_resources = dashboard, head_resources or {}
        self.nodes: dict[str, Node] = {}
        self.gcs_port = self.dashboard_port = None
        self.token_path = self.root / "auth_token"
        self._worker_ranges: set[int] = set()

    # ------------------------------------------------------------------ environment
    def _write_token(self) -> None:
        from ray._private.authentication.authentication_token_generator import generate_new_authentication_token

        fd = os.open(self.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(generate_new_authentication_token())

    @property
    def address(self) -> str:
        """The GCS address for ``ray.init(address=...)`` and ``ray start --address``."""
        return f"127.0.0.1:{self.gcs_port}"

    @property
    def dashboard_url(self) -> str:
        """The job server address for ``ray job submit --address``."""
        return f"http://127.0.0.1:{self.dashboard_port}"

    def env(self, for_jobs: bool = True) -> dict:
        """Environment for a client process: token variables and ``RAY_ADDRESS`` (the dashboard URL for
        job commands, the GCS address otherwise)."""
        env = dict(os.environ)
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(self.token_path),
                   RAY_ADDRESS=self.dashboard_url if for_jobs else self.address, RAY_USAGE_STATS_ENABLED="0")
        env.pop("RAY_AUTH_TOKEN", None)
        return env

    # ------------------------------------------------------------------ nodes
    def _start(self, node: Node, args: list[str]) -> Node:
        agent, grpc, rtenv, metrics, nm, om = free_ports(6)
        w0 = free_port_range(100, self._worker_ranges)
        if float(node.num_cpus) != int(node.num_cpus):
            raise ValueError(f"node {node.name}: ray start takes whole CPUs, not {node.num_cpus}")
        cmd = [RAY, "start", "--block", "--node-ip-address=127.0.0.1", f"--num-cpus={int(node.num_cpus)}",
               "--num-gpus=0", f"--resources={json.dumps(node.resources)}",
               f"--object-store-memory={self.object_store}", f"--dashboard-agent-listen-port={agent}",
               f"--dashboard-agent-grpc-port={grpc}", f"--runtime-env-agent-port={rtenv}",
               f"--metrics-export-port={metrics}", f"--node-manager-port={nm}", f"--object-manager-port={om}",
               f"--min-worker-port={w0}", f"--max-worker-port={w0 + 99}",
               "--disable-usage-stats", *args]
        node.log = self.root / f"{node.name}.log"
        env = self.env(for_jobs=False)
        env.pop("RAY_ADDRESS")
        # No idle workers started ahead of demand: on a machine this small they start cold all at once
        # (one per logical CPU of every node, per job) and slow the job's real workers to a crawl.
        env.update(RAY_prestart_worker_first_driver="0", RAY_enable_worker_prestart="0")
        with open(node.log, "ab") as log:
            node.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                         cwd=str(self.root))
        node.pgid = node.proc.pid
        self.nodes[node.name] = node
        return node

    def start_head(self) -> "LocalCluster":
        """Start the head node and wait until it accepts clients."""
        self._write_token()
        self.gcs_port, self.dashboard_port, client = free_ports(3)
        args = ["--head", f"--port={self.gcs_port}", f"--ray-client-server-port={client}",
                f"--temp-dir={self.root / 'tmp'}"]
        args += ["--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}"] \
            if self.dashboard else ["--include-dashboard=false"]
        self._start(Node("head", self.head_cpus, {"head": 1, **self.head_resources}), args)
        self.wait_for_nodes(1)
        self._save()
        return self

    def add_worker(self, name: str, num_cpus: float, resources: dict | None = None, wait: bool = True) -> Node:
        """Start a worker raylet with its own CPUs and custom resources."""
        if name in self.nodes and self.nodes[name].proc and self.nodes[name].proc.poll() is None:
            raise ValueError(f"node {name!r} is already running")
        node = self._start(Node(name, num_cpus, dict(resources or {})), [f"--address={self.address}"])
        if wait:
            self.wait_for_nodes(self.alive_count())
        self._save()
        return node

    def alive_count(self) -> int:
        return sum(1 for n in self.nodes.values() if n.proc and n.proc.poll() is None)

    def wait_for_nodes(self, n: int, timeout: float = 180) -> None:
        """Block until ``n`` nodes are alive in the GCS (or raise with the tail of the logs)."""
        deadline = time.time() + timeout
        code = ("import ray,sys; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR'); "
                "print(sum(1 for n in ray.nodes() if n['Alive']))")
        while time.time() < deadline:
            for node in self.nodes.values():
                if node.proc and node.proc.poll() is not None and node.proc.returncode not in (0, -9, -15):
                    raise RuntimeError(f"node {node.name} exited with {node.proc.returncode}:\n{self.tail(node.name)}")
            try:
                r = subprocess.run([sys.executable, "-c", code, self.address], env=self.env(False),
                                   capture_output=True, text=True, timeout=max(5.0, deadline - time.time()))
            except subprocess.TimeoutExpired:
                continue
            if r.returncode == 0 and r.stdout.strip().splitlines() and int(r.stdout.strip().splitlines()[-1]) >= n:
                self._record_pids()
                return
            time.sleep(1.0)
        raise TimeoutError(f"{n} nodes not up after {timeout} s:\n" + "\n".join(self.tail(k) for k in self.nodes))

    def tail(self, name: str, lines: int = 20) -> str:
        log = self.nodes[name].log
        return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log and log.exists() else ""

    def _record_pids(self) -> None:
        import psutil

        for node in self.nodes.values():
            if node.pgid and _is_ray_process(node.pgid):
                try:
                    kids = psutil.Process(node.pgid).children(recursive=True)
                except psutil.NoSuchProcess:
                    continue
                node.pids |= {node.pgid} | {k.pid for k in kids}

    def kill_node(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Kill a node's raylet and everything it started (a machine lost), by default with SIGKILL."""
        self._record_pids()
        node = self.nodes[name]
        self._signal(node, sig)
        self._reap(node, timeout=30)
        self._save()

    def _signal(self, node: Node, sig: int) -> None:
        """Signal the node's process group and every recorded pid that is still a Ray process."""
        if node.pgid and any(_is_ray_process(p) and _pgid(p) == node.pgid for p in {node.pgid} | node.pids):
            try:
                os.killpg(node.pgid, sig)
            except (ProcessLookupError, PermissionError):
                pass
        for pid in sorted(node.pids):
            if _is_ray_process(pid):
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass

    def _reap(self, node: Node, timeout: float = 20) -> None:
        """Wait for every recorded process of the node to be gone; SIGKILL stragglers."""
        import psutil

        deadline = time.time() + timeout
        for pid in sorted(node.pids):
            try:
                p = psutil.Process(pid)
                p.wait(timeout=max(0.1, deadline - time.time()))
            except psutil.NoSuchProcess:
                continue
            except psutil.TimeoutExpired:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass
        if node.proc is not None:
            node.proc.wait(timeout=30)  # our child: collect its exit status

    def stop(self, grace: float = 5.0) -> None:
        """Stop every node of this cluster: the workers together first, then the head (SIGTERM, then SIGKILL
        after ``grace`` seconds: the head's GCS outwaits any longer one, with no job left to finish)."""
        self._record_pids()
        workers = [n for name, n in self.nodes.items() if name != "head"]
        for group in (workers, [self.nodes["head"]] if "head" in self.nodes else []):
            for node in group:
                self._signal(node, signal.SIGTERM)
            for node in group:
                self._reap(node, timeout=grace)
                self._signal(node, signal.SIGKILL)  # anything the group started after the pids were recorded
        self._save()

    @classmethod
    def attach(cls, root: str | Path) -> "LocalCluster":
        """The cluster recorded in ``<root>/cluster.json`` by an earlier process (for ``down``)."""
        state = json.loads((Path(root) / "cluster.json").read_text())
        cluster = cls.__new__(cls)
        cluster.root = Path(root).resolve()
        cluster.token_path = Path(state["token_path"])
        cluster.gcs_port = int(state["address"].rsplit(":", 1)[1])
        cluster.dashboard_port = int(state["dashboard"].rsplit(":", 1)[1])
        cluster.nodes = {n["name"]: Node(n["name"], n["num_cpus"], n["resources"], pgid=n["pgid"], pids=set(n["pids"]),
                                         log=Path(n["log"]) if n["log"] else None) for n in state["nodes"]}
        return cluster

    def pids(self) -> set[int]:
        self._record_pids()
        return set().union(*(n.pids for n in self.nodes.values())) if self.nodes else set()

    def _save(self) -> None:
        (self.root / "cluster.json").write_text(json.dumps({
            "address": self.address, "dashboard": self.dashboard_url, "token_path": str(self.token_path),
            "nodes": [n.to_dict() for n in self.nodes.values()]}, indent=1))

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _parse_worker(spec: str) -> tuple[str, float, dict]:
    """``name:cpus[:res=amount,res=amount]`` -> (name, cpus, resources)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3):
        raise argparse.ArgumentTypeError(f"worker spec {spec!r}: expected name:cpus[:resource=amount,...]")
    res = {}
    if len(parts) == 3 and parts[2]:
        for kv in parts[2].split(","):
            k, v = kv.split("=")
            res[k] = float(v)
    return parts[0], float(parts[1]), res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["up", "down", "env"])
    ap.add_argument("--root", type=Path, default=Path("/tmp/msr-cluster"))
    ap.add_argument("--head-cpus", type=float, default=1)
    ap.add_argument("--workers", nargs="*", type=_parse_worker, default=[],
                    help="name:cpus[:resource=amount,...], e.g. cropper:2:cropper=2 encoder:2:encoder=1")
    args = ap.parse_args(argv)
    state = args.root / "cluster.json"
    if args.action == "env":
        s = json.loads(state.read_text())
        print(f"export RAY_ADDRESS={s['dashboard']} RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH={s['token_path']}")
        return 0
    if args.action == "down":
        cluster = LocalCluster.attach(args.root)
        cluster.stop()
        print(f"stopped {len(cluster.nodes)} node(s) of {args.root}")
        return 0
    cluster = LocalCluster(args.root, head_cpus=args.head_cpus).start_head()
    for name, cpus, res in args.workers:
        cluster.add_worker(name, cpus, res)
    print(f"cluster up: {cluster.address} (jobs: {cluster.dashboard_url}), {cluster.alive_count()} node(s); "
          f"token {cluster.token_path}\nclients: eval \"$({sys.executable} {__file__} env --root {args.root})\"")
    return 0


if __name__ == "__main__":
    sys.exit(main())
