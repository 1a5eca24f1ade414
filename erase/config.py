"""Command-line options generated from config dataclasses, and `--config FILE` (JSON).

A config is a dataclass whose fields carry their help text in `metadata["help"]` and whose
`__post_init__` validates values. The CLI is derived from it, so the command line, the Python API
and the JSON written next to every output always agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
import typing
from pathlib import Path
from typing import Any

from .utils import EraseError, read_text


def field(default: Any, help: str, **kwargs) -> Any:  # noqa: A002 - mirrors argparse's name
    """A dataclass field with help text; mutable defaults (tuples are fine) go through here too."""
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def _parse_bool(text: str) -> bool:
    lowered = text.lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(scalar type, is_sequence) for int, float, str, bool, Optional[...] and tuple[X, ...]."""
    origin = typing.get_origin(tp)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _base_type(args[0])
    if origin in (tuple, list):
        return typing.get_args(tp)[0], True
    return tp, False


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = (),
                            hidden: bool = False) -> None:
    """Add `--field-name` for each field of `cls`: booleans as `--name/--no-name`, tuples as `A,B,...`.

    Defaults stay None in the namespace, so that `build_config` can tell what the command line set
    from what a config file or the dataclass provides; the help shows the dataclass default.
    `hidden` options are parsed but left out of the help.
    """
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in skip or not f.init:
            continue
        tp, is_seq = _base_type(hints[f.name])
        default = f.default if f.default is not dataclasses.MISSING else None
        help_text = f.metadata.get("help", "")
        if default is not None:
            help_text += f" (default: {','.join(map(str, default)) if is_seq else default})"
        # argparse %-formats help strings; a literal "10%" must reach it as "10%%".
        kwargs: dict[str, Any] = {"dest": f.name, "default": None,
                                  "help": argparse.SUPPRESS if hidden else help_text.replace("%", "%%")}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if is_seq:
            scalar = _parse_bool if tp is bool else tp
            kwargs["type"] = lambda s, scalar=scalar: tuple(scalar(x) for x in s.split(",") if x)
            kwargs["metavar"] = "A,B,..."
        elif tp is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = tp
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def load_config_file(path: str | Path | None) -> dict:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise EraseError(f"config file {path} does not exist")
    try:
        data = json.loads(read_text(path, "config file"))
    except json.JSONDecodeError as e:
        raise EraseError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise EraseError(f"config file {path} must hold a JSON object of option names to values")
    return data


_TYPE_NAMES = {int: "an integer", float: "a finite number", str: "a string", bool: "true or false"}


def _scalar_ok(value: Any, tp: Any) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    return isinstance(value, tp)


def check_value(name: str, value: Any, hint: Any, metadata: Any, source: str) -> Any:
    """`value` of field `name` checked against its type and choices; returns it (lists as tuples).

    The command line converts text with the same types, so a config file or a Python call can pass
    nothing that the command line would refuse: `{"lr": true}` is an error, not lr 1.0.
    """
    option = "--" + name.replace("_", "-")
    optional = type(None) in typing.get_args(hint)
    tp, is_seq = _base_type(hint)
    if value is None:
        if optional:
            return None
        raise EraseError(f"{option} ({source}) may not be null: give {_TYPE_NAMES.get(tp, tp.__name__)}")
    if tp is str and isinstance(value, os.PathLike):  # a Python caller's Path
        value = os.fspath(value)
    items = value if is_seq else [value]
    if is_seq and not isinstance(value, (list, tuple)):
        raise EraseError(f"{option} ({source}) must be a list (each item {_TYPE_NAMES.get(tp, tp.__name__)}), "
                         f"got {json.dumps(value, default=str)}")
    for item in items:
        if not _scalar_ok(item, tp):
            got = json.dumps(item, default=str) if not isinstance(item, float) else repr(item)
            raise EraseError(f"{option} ({source}) must be {_TYPE_NAMES.get(tp, tp.__name__)}, "
                             f"got {got} ({type(item).__name__})")
        if "choices" in metadata and item not in metadata["choices"]:
            raise EraseError(f"{option} ({source}): {item!r} is not one of {', '.join(map(str, metadata['choices']))}")
    if tp is float:  # 1 from a JSON file means 1.0, as on the command line
        return tuple(float(v) for v in value) if is_seq else float(value)
    return tuple(value) if is_seq else value


def build_config(cls: type, file_values: dict, args: argparse.Namespace | None = None, **overrides) -> Any:
    """Defaults < file values < command-line values < overrides; unknown keys and wrong types are refused."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = {k.replace("-", "_"): v for k, v in file_values.items()}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise EraseError(f"unknown option(s) {', '.join(unknown)} for {cls.__name__}; "
                         f"known: {', '.join(sorted(fields))}")
    hints = typing.get_type_hints(cls)
    # Each source is checked on its own: a wrong value in a file is an error even where the command line overrides it.
    command_line = {k: v for k, v in vars(args).items() if k in fields and v is not None} if args is not None else {}
    given = {k: v for k, v in overrides.items() if v is not None}
    for source, layer in (("config file", values), ("command line", command_line), ("option", given)):
        for k, v in layer.items():
            if k not in fields:
                raise EraseError(f"unknown option {k} for {cls.__name__}; known: {', '.join(sorted(fields))}")
            layer[k] = check_value(k, v, hints[k], fields[k].metadata, source)
    values = {**values, **command_line, **given}
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise EraseError(f"invalid {cls.__name__}: {e}") from None


def make_config(owner: type, config: Any = None, **options) -> Any:
    """`owner.Config` (a method's or an edit's) from an instance, a dict (e.g. a JSON file) and keyword
    overrides; an instance of another config class is refused."""
    if dataclasses.is_dataclass(config) and not isinstance(config, type):
        if not isinstance(config, owner.Config):
            raise EraseError(f"{type(config).__name__} is not the config of {owner.name} ({owner.Config.__name__})")
        values = config_dict(config)
    else:
        values = dict(config or {})
    # Options go through the same check as a config file, so a misspelt one is refused, not ignored.
    return build_config(owner.Config, {**values, **options})


def check_channels(name: str, channels: tuple[int, ...], groups: int) -> None:
    """GroupNorm splits a layer's channels into `groups`: refuse channel counts it cannot divide."""
    if not channels:
        raise ValueError(f"{name} needs at least one level")
    if bad := [c for c in channels if c < 1 or c % groups]:
        raise ValueError(f"{name} {','.join(map(str, channels))}: {','.join(map(str, bad))} is not a positive "
                         f"multiple of {groups} (GroupNorm splits each level's channels into {groups} groups)")


def config_dict(config: Any) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
