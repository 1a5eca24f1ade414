"""Output folders: what a command may write over, the marker that says who wrote a folder, and
the check that a model folder is a finished run.

A command writes into `--out` only if it does not exist, is an empty folder, or is an output of
the same kind that this tool wrote (it holds `erase-output.json` naming that kind). Anything else
is refused before any work starts unless `--overwrite` is given, so a typo in `--out` can never
delete a user's files. The marker is written inside the same temporary folder as the rest of the
output and swapped in with it, so a folder that holds the marker holds everything.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Iterable

from .utils import EraseError, read_json, write_json

MARKER = "erase-output.json"
UNLEARN_CONFIG = "erase_config.json"  # the run summary `erase unlearn` writes beside the model
UNLEARN_DELTA = "delta.safetensors"  # the tensors the run changed
CHECKPOINT_NAME = re.compile(r"^\.?step-\d{7}(\..*)?$")  # step-NNNNNNN/ and their temporary folders
# A recipe's stages: stage-N-METHOD/ of checkpoints, with done/ (a finished stage) and its temporary folder
STAGE_NAME = re.compile(r"^stage-\d+-[a-z0-9_]+$")
DONE_NAME = re.compile(r"^\.?done(\..*)?$")


def mark_output(folder: str | Path, kind: str) -> None:
    """Write the marker saying that `folder` is an output of `erase <kind>`."""
    write_json(Path(folder) / MARKER, {"kind": kind})


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
                 checkpoints: bool = False) -> Path:
    """Refuse an `--out` that this command must not write, before any work starts.

    `inputs` are the paths the command reads (model, classifier, prompt files, run folders): the
    output may be none of them, nor a folder inside or around one. `checkpoints`: the command keeps
    resumable checkpoints in the sibling `OUT-checkpoints/`, which must be its own too.
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
