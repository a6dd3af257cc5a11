"""Job configuration files (YAML or TOML) and safe output paths."""
from __future__ import annotations

import argparse
import dataclasses
import os
import typing
import tomllib
from pathlib import Path
from typing import Any, Mapping

import yaml

from .errors import InputError


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


# --------------------------------------------------------------------------- options and their flags

def option(default, help: str = "", choices=None, flag: str | None = "", **kw):
    """A config field: its default, help text, choices, and its flag (``""``: derived from the name;
    None: config file only). Every command's configuration is a dataclass of such fields."""
    meta = {"help": help, "choices": choices, "flag": flag}
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta, **kw)
    return dataclasses.field(default=default, metadata=meta, **kw)


def arg_type(annotation):
    """The argparse type of a field's annotation (``int | None`` -> int)."""
    hint = str(annotation)
    if "bool" in hint:
        return bool
    if "float" in hint:
        return float
    if "int" in hint and "str" not in hint:
        return int
    return str


def add_field_argument(group, f: dataclasses.Field, flag: str, dest: str, annotation) -> None:
    """One flag for one option field; it defaults to None (not given), so that a config file's value
    stands unless the flag overrides it."""
    kind = arg_type(annotation)
    default = f.default if f.default is not dataclasses.MISSING else None
    helptext = (f.metadata.get("help", "") + ("" if default is None else f" (default {default})")).replace("%", "%%")
    if kind is bool:
        group.add_argument(flag, dest=dest, action=argparse.BooleanOptionalAction, default=None, help=helptext)
    else:
        group.add_argument(flag, dest=dest, type=kind, default=None, choices=f.metadata.get("choices"),
                           metavar=None if f.metadata.get("choices") else f.name.upper(), help=helptext)


def flag_of(f: dataclasses.Field, prefix: str = "") -> str | None:
    """The flag of an option field: its own, or ``--<prefix><name>`` with dashes; None: file only."""
    flag = f.metadata.get("flag", "")
    if flag is None or flag:
        return flag
    return "--" + (prefix + f.name).replace("_", "-")


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    """A flag per option field of the dataclass ``cls`` that has one (dest: the field's name)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag = flag_of(f)
        if flag is not None and "flag" in f.metadata:
            add_field_argument(parser, f, flag, f.name, hints[f.name])


def given_options(args: argparse.Namespace, cls) -> dict:
    """The fields of ``cls`` whose flags were given (not None), by name."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls)
            if getattr(args, f.name, None) is not None}
