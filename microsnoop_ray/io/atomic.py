"""Atomic file writes: a reader (or a resumed job) sees the old file or the whole new one, never a part.

The one helper every writer of this package uses: Parquet sites, JSON notes, ``skipped.csv``,
configuration, illumination functions, checkpoints, exports and the extracted registry examples.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path beside ``path``; when the block ends without error it replaces ``path``.

    The temporary name is hidden (leading dot), unique per writer (two processes writing the same
    file never share it) and ends with ``suffix`` (for writers that insist on an extension, e.g.
    ``np.save`` and ``.npy``). On an error the partial file is removed and the error propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp{suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden folder beside ``path``; when the block ends without error it becomes ``path``.

    For folders filled by several files (an extracted archive): a reader sees no folder or the whole
    one. When two processes fill the same folder at once, the first to finish wins and the other's
    copy is discarded. On an error the partial folder is removed and the error propagates.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        try:
            os.rename(tmp, path)
        except OSError:
            if not path.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(text: str, path: str | os.PathLike) -> Path:
    """Write ``text`` to ``path`` atomically; returns ``path``."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)
    return Path(path)


def write_json(obj: Any, path: str | os.PathLike) -> Path:
    """Write ``obj`` as indented, key-sorted JSON atomically (values JSON cannot hold become strings)."""
    return write_text(json.dumps(obj, indent=1, sort_keys=True, default=str), path)
