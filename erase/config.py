"""Command-line options generated from config dataclasses, and `--config FILE` (JSON).

A config is a dataclass whose fields carry their help text in `metadata["help"]` and whose
`__post_init__` validates values. The CLI is derived from it, so the command line, the Python API
and the JSON written next to every output always agree.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any

from .utils import EraseError


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


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls: type, skip: tuple[str, ...] = ()) -> None:
    """Add `--field-name` for each field of `cls` (defaults stay None so that a file can set them)."""
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
        kwargs: dict[str, Any] = {"dest": f.name, "default": None, "help": help_text.replace("%", "%%")}
        if "choices" in f.metadata:
            kwargs["choices"] = f.metadata["choices"]
        if is_seq:
            scalar = _parse_bool if tp is bool else tp
            kwargs["type"] = lambda s, scalar=scalar: tuple(scalar(x) for x in s.split(",") if x)
            kwargs["metavar"] = "A,B,..."
        else:
            kwargs["type"] = _parse_bool if tp is bool else tp
        parser.add_argument("--" + f.name.replace("_", "-"), **kwargs)


def load_config_file(path: str | Path | None) -> dict:
    if path is None:
        return {}
    path = Path(path)
    if not path.is_file():
        raise EraseError(f"config file {path} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise EraseError(f"config file {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise EraseError(f"config file {path} must hold a JSON object of option names to values")
    return data


def build_config(cls: type, file_values: dict, args: argparse.Namespace | None = None, **overrides) -> Any:
    """Defaults < file values < command-line values < overrides; unknown keys are refused."""
    names = {f.name for f in dataclasses.fields(cls)}
    values = {k.replace("-", "_"): v for k, v in file_values.items()}
    unknown = sorted(set(values) - names)
    if unknown:
        raise EraseError(f"unknown option(s) {', '.join(unknown)} for {cls.__name__}; "
                         f"known: {', '.join(sorted(names))}")
    if args is not None:
        values.update({k: v for k, v in vars(args).items() if k in names and v is not None})
    values.update({k: v for k, v in overrides.items() if v is not None})
    hints = typing.get_type_hints(cls)
    for k, v in values.items():  # JSON gives lists where the dataclass wants tuples
        if isinstance(v, list) and _base_type(hints[k])[1]:
            values[k] = tuple(v)
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise EraseError(f"invalid {cls.__name__}: {e}") from None


def config_dict(config: Any) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(config).items()}
