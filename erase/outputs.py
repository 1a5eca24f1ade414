"""Output folders: what a command may write over, the marker that says who wrote a folder, and
the check that a model folder is a finished run.

A command writes into `--out` only if it does not exist, is an empty folder, or is an output of
the same kind that this tool wrote (it holds `erase-output.json` naming that kind). Anything else
is refused before any work starts unless `--overwrite` is given, so a typo in `--out` can never
delete a user's files. The marker is written inside the same temporary folder as the rest of the
output and swapped in with it, so a folder that holds the marker holds everything.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import tempfile
from pathlib import Path
from typing import Any, Iterable, Iterator

from .utils import EraseError, read_json, write_json

MARKER = "erase-output.json"
UNLEARN_CONFIG = "erase_config.json"  # the run summary `erase unlearn` writes beside the model
UNLEARN_DELTA = "delta.safetensors"  # the tensors the run changed
CHECKPOINT_NAME = re.compile(r"^\.?step-\d{7}(\..*)?$")  # step-NNNNNNN/ and their temporary folders
# A recipe's stages: stage-N-METHOD/ of checkpoints, with done/ (a finished stage) and its temporary folder
STAGE_NAME = re.compile(r"^stage-\d+-[a-z0-9_]+$")
DONE_NAME = re.compile(r"^\.?done(\..*)?$")


# The command being run, per kind of output: {"command": the exact command line, "settings": what
# decides the output}. Set by `recording`; the marker and the output's own JSON carry it.
_RECORDS: dict[str, dict] = {}
_LAST_COMMAND: list[str] = []  # the last command recorded, for the message of an interrupt


def command_line(command: str, options: list[tuple[str, Any]]) -> str:
    """`erase COMMAND --option value ...` from (option, value) pairs: None is left out, True/False
    written as true/false (the parser reads them), lists and tuples comma-joined."""
    words = ["erase", *command.split()]
    for option, value in options:
        if value is None:
            continue
        if isinstance(value, bool):
            value = "true" if value else "false"
        elif isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        words += [option, str(value)] if option else [str(value)]
    return shlex.join(words)


def absolute_if_path(value: Any) -> Any:
    """An existing path as an absolute one (the recorded command then works from any folder); a name,
    a prompt or a Hub id as given."""
    if isinstance(value, (str, os.PathLike)) and str(value) and Path(value).expanduser().exists():
        return str(Path(value).expanduser().resolve())
    return value


@contextlib.contextmanager
def recording(kind: str, command: str, settings: dict) -> Iterator[None]:
    """While the command runs, its outputs of `kind` record `command` and `settings`."""
    _RECORDS[kind] = {"command": command, "settings": settings}
    _LAST_COMMAND[:] = [command]
    try:
        yield
    finally:
        _RECORDS.pop(kind, None)


def recorded_command(kind: str) -> str | None:
    """The command being run that writes an output of `kind`, if one is recording."""
    return _RECORDS.get(kind, {}).get("command")


def last_command() -> str | None:
    return _LAST_COMMAND[0] if _LAST_COMMAND else None


def mark_output(folder: str | Path, kind: str) -> None:
    """Write the marker saying that `folder` is an output of `erase <kind>` (and of which command)."""
    write_json(Path(folder) / MARKER, {"kind": kind, **_RECORDS.get(kind, {})})


def recorded_settings(folder: str | Path) -> dict | None:
    """The settings the marker of `folder` records, or None (no marker, or one from an older version)."""
    marker = Path(folder) / MARKER
    try:
        settings = read_json(marker).get("settings") if marker.is_file() else None
    except (EraseError, AttributeError):
        return None
    return settings if isinstance(settings, dict) else None


def settings_differ(saved: dict, current: dict) -> str:
    """'--steps 100 there, 3 now' for the first few settings that differ."""
    keys = sorted(k for k in saved.keys() | current.keys() if saved.get(k) != current.get(k))
    shown = [f"{k if k.startswith('-') else '--' + k.replace('_', '-')} "
             f"{json.dumps(saved.get(k))} there, {json.dumps(current.get(k))} now" for k in keys[:3]]
    return "; ".join(shown) + (f" (and {len(keys) - 3} more)" if len(keys) > 3 else "")


def output_kind(folder: str | Path) -> str | None:
    """The kind named by the folder's marker, or None where there is no readable marker."""
    marker = Path(folder) / MARKER
    if not marker.is_file():
        return None
    try:
        return read_json(marker).get("kind")
    except (EraseError, AttributeError):
        return None


def _is_within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _is_checkpoint_folder(folder: Path) -> bool:
    return all(CHECKPOINT_NAME.match(p.name) or (STAGE_NAME.match(p.name) and p.is_dir() and all(
        CHECKPOINT_NAME.match(q.name) or DONE_NAME.match(q.name) for q in p.iterdir())) for p in folder.iterdir())


def check_output(out: str | Path, kind: str, overwrite: bool = False, inputs: Iterable[str | Path | None] = (),
                 checkpoints: bool = False, settings: dict | None = None) -> Path:
    """Refuse an `--out` that this command must not write, before any work starts.

    `inputs` are the paths the command reads (model, classifier, prompt files, run folders): the
    output may be none of them, nor a folder inside or around one. `checkpoints`: the command keeps
    resumable checkpoints in the sibling `OUT-checkpoints/`, which must be its own too. `settings`:
    what decides this output; an earlier output of the same kind made with other settings is refused
    (as the Hugging Face tools do with an output folder), so that a rerun with a changed option
    never silently replaces a result.
    """
    given = Path(out)
    if str(out).strip() == "" or given.name in ("", ".", ".."):
        raise EraseError(f"--out {str(out)!r} is not a folder name: give a new folder, e.g. --out runs/my-run")
    path = given.expanduser().resolve()
    if _is_within(Path.cwd().resolve(), path):
        raise EraseError(f"--out {out} holds the current folder: give a new folder, e.g. --out runs/my-run")
    for source in inputs:
        if source is None or not Path(source).expanduser().exists():
            continue
        src = Path(source).expanduser().resolve()
        if _is_within(path, src) or _is_within(src, path):
            raise EraseError(f"--out {out} would overwrite the input {source}: write the output to another folder")
    if path.is_file() or path.is_symlink():
        if not overwrite:
            raise EraseError(f"--out {out} is an existing file: choose a new folder, or pass --overwrite to replace it")
    elif path.is_dir() and any(path.iterdir()) and output_kind(path) != kind:
        if not overwrite:
            found = output_kind(path)
            what = f"an `erase {found}` output" if found else "a folder this tool did not write"
            raise EraseError(f"--out {out} already exists and is {what}, not an `erase {kind}` output; "
                             "choose a new folder, or pass --overwrite to replace everything in it")
    saved = recorded_settings(path) if path.is_dir() and output_kind(path) == kind else None
    if settings is not None and saved is not None and saved != settings and not overwrite:
        raise EraseError(f"--out {out} holds an `erase {kind}` output made with other settings "
                         f"({settings_differ(saved, settings)}): choose a new folder, or pass --overwrite to replace it")
    if checkpoints:
        ckpt = path.with_name(path.name + "-checkpoints")
        if ckpt.exists() and not (ckpt.is_dir() and _is_checkpoint_folder(ckpt)):
            raise EraseError(f"{ckpt} exists and is not a checkpoint folder of this tool (it would be used for "
                             "resuming, then deleted): move it away or choose another --out")
    _check_writable(path, out)
    return path


def _check_writable(path: Path, out: str | Path) -> None:
    """The output's nearest existing ancestor must be a writable folder (outputs are made beside it)."""
    parent = path.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise EraseError(f"--out {out}: {parent} is a file, not a folder")
    try:  # a real write: permission bits say nothing to root, nor about read-only mounts
        os.rmdir(tempfile.mkdtemp(prefix=".erase-write-test.", dir=parent))
    except OSError as e:
        raise EraseError(f"--out {out}: cannot write in {parent} ({e.strerror}): choose a folder you can "
                         "write to") from None


def check_finished(path: str | Path, info: dict | None = None) -> None:
    """Refuse a model that an interrupted `erase unlearn` left unfinished, saying how to finish it.

    `info` is the model's recorded info (`unlearning` is set for an `erase unlearn` output). A run
    writes its model, delta and summary in one folder swap, so a folder lacking one of them was cut
    short by an older version or edited by hand; a missing folder with checkpoints beside it is a
    run that has not reached its end.
    """
    path = Path(path)
    ckpt = path.with_name(path.name + "-checkpoints")
    how = f"rerun the same `erase unlearn` command to finish it (it resumes from {ckpt})"
    if not path.exists() and ckpt.is_dir() and any(ckpt.iterdir()):
        raise EraseError(f"{path} is not finished yet: {how}")
    if info is not None and "unlearning" in info:
        missing = [f for f in (UNLEARN_DELTA, UNLEARN_CONFIG, MARKER) if not (path / f).is_file()]
        if missing:
            raise EraseError(f"{path} is an unfinished `erase unlearn` output (missing {', '.join(missing)}): {how}")


def is_same_output(out: str | Path, kind: str, settings: dict) -> bool:
    """Whether `out` is a finished `erase <kind>` output made with exactly `settings` (then reused)."""
    path = Path(out)
    return path.is_dir() and output_kind(path) == kind and recorded_settings(path) == settings
