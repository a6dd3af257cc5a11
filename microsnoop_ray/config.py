"""Job configuration files (YAML or TOML) and safe output paths."""
from __future__ import annotations

import dataclasses
import os
import tomllib
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import InputError


def cache_dir() -> Path:
    """Where derived files are cached (converted Cellpose weights, fetched example data):
    ``$MICROSNOOP_CACHE``, else ``~/.cache/microsnoop-ray``."""
    return Path(os.environ.get("MICROSNOOP_CACHE", Path.home() / ".cache" / "microsnoop-ray"))


def load_config(path: str | os.PathLike | None) -> dict[str, Any]:
    """Read a YAML (``.yaml``/``.yml``) or TOML (``.toml``) mapping; ``None`` gives ``{}``."""
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "config file does not exist")
    text = path.read_text()
    try:
        data = tomllib.loads(text) if path.suffix.lower() == ".toml" else yaml.safe_load(text)
    except (tomllib.TOMLDecodeError, yaml.YAMLError) as exc:
        raise InputError(path, f"not valid {'TOML' if path.suffix.lower() == '.toml' else 'YAML'}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise InputError(path, "config must be a mapping of option names to values")
    return data


def save_config(config: dict, path: str | os.PathLike) -> Path:
    """Write the resolved configuration as YAML (atomically)."""
    from .io.atomic import write_text

    return write_text(yaml.safe_dump(config, sort_keys=True), path)


def check_options(cls, options: Mapping[str, Any], what: str) -> None:
    """Raise ValueError naming every key of ``options`` that is not a field of the dataclass ``cls``."""
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"unknown {what} option(s): {', '.join(unknown)}")


def inside(root: str | os.PathLike, relative: str | os.PathLike, what: str = "path") -> Path:
    """Resolve ``relative`` under ``root`` and refuse anything that escapes it.

    Absolute paths, ``..`` components and symbolic links that lead out of ``root`` raise
    :class:`~microsnoop_ray.errors.InputError`.
    """
    root = Path(root).resolve()
    target = (root / relative).resolve()
    if target != root and root not in target.parents:
        raise InputError(relative, f"{what} escapes the output root {root}")
    return target
