"""Where derived files are cached: converted Cellpose weights, example data fetched from the package index."""
from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$MICROSNOOP_CACHE``, else ``~/.cache/microsnoop-ray``."""
    return Path(os.environ.get("MICROSNOOP_CACHE", Path.home() / ".cache" / "microsnoop-ray"))
