"""The `erase unlearn` command a run's record holds (`command` in erase_config.json).

Run from the command line, a run records the command as it was given (`erase.outputs.recording`).
Run from Python (`erase.unlearn`, `erase demo`), it records the equivalent command built here from
the call's arguments, with the method's whole config written out, as the command line records it.
Either way the record says how to make the model again, and `erase report` reads it from there
rather than rebuilding it from the method registry.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from ..outputs import absolute_if_path, command_line

# The data options of `erase unlearn`, in the order the command names them.
DATA_OPTIONS = ("retain", "anchor", "dataset", "images", "image_guidance")


def equivalent_command(base_model: str, out: str | Path, forget, request: dict, *, method: str | None = None,
                       config: dict | None = None, recipe=None, run_wide: dict | None = None,
                       has_terms: bool = False) -> str | None:
    """`erase unlearn ...` that makes the same model: `method` with its whole `config`, or `recipe` (a
    shipped recipe's name or a file) with the run-wide options `run_wide`; `request` holds the data
    options (`retain`, `anchor`, ..., as `erase.unlearning.unlearn` takes them).

    None where no command line says the same: a model only in memory, prebuilt data, a recipe given
    as a dict or object, or terms attached to a single method (a recipe file holds those)."""
    if base_model == "in-memory model" or request.get("data") is not None or has_terms or forget is None:
        return None
    if recipe is not None and not isinstance(recipe, (str, Path)):
        return None
    options = [("--model", absolute_if_path(base_model)), ("--forget", _listed(forget))]
    if recipe is not None:
        options.append(("--recipe", absolute_if_path(str(recipe))))
    else:
        options.append(("--method", method))
    data = {**request, **request.get("data_options", {})}
    options += [("--" + name.replace("_", "-"), _listed(data.get(name))) for name in DATA_OPTIONS]
    options += [("--" + name.replace("_", "-"), value) for name, value in {**(config or {}), **(run_wide or {})}.items()]
    no_anchor = " --no-anchor-in-retain" if data.get("anchor_in_retain") is False else ""
    return f"{command_line('unlearn', options)}{no_anchor} --out {shlex.quote(str(Path(out).expanduser().resolve()))}"


def _listed(value):
    """A class, a concept, a file, or a list of them, as the command line takes it (lists comma-joined)."""
    if isinstance(value, (list, tuple)):
        return [absolute_if_path(v) for v in value]
    return absolute_if_path(value)

