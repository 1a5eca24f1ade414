"""Telling a typo from a new name: "did you mean" suggestions and what counts as a path.

Standard library only, so that the argument parser (which must answer `erase --help` at once) can
use it too.
"""

from __future__ import annotations

import difflib
import os
from pathlib import Path
from typing import Iterable

# Suffixes of the files a command reads: a value ending so is a file name, never a prompt or a Hub id.
FILE_SUFFIXES = (".txt", ".json", ".csv", ".safetensors", ".ckpt", ".pt", ".bin", ".yaml", ".yml")


def nearest(word: str, choices: Iterable[str], cutoff: float = 0.75) -> str | None:
    """The choice closest to `word` (case-insensitive), if one is close enough to be a typo of it."""
    choices = [c for c in choices if c]
    lowered = {c.lower(): c for c in choices}
    found = difflib.get_close_matches(word.lower(), list(lowered), n=1, cutoff=cutoff)
    return lowered[found[0]] if found else None


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.75) -> str:
    """'; did you mean X?' for the nearest choice, or '' when none is near."""
    found = nearest(word, choices, cutoff)
    return f"; did you mean {found}?" if found else ""


def looks_like_path(text: str) -> bool:
    """A value written as a path: one word (a prompt has several) that starts with `.`, `/` or `~`,
    holds a path separator, or ends with the suffix of a file a command reads. Such a value is never
    taken as a prompt or a name."""
    text = text.strip()
    if len(text.split()) != 1:
        return False
    return (text.startswith((".", "/", "~")) or "/" in text or os.sep in text
            or text.lower().endswith(FILE_SUFFIXES))


def near_path(path: str | Path) -> str:
    """'; did you mean P?' for an existing sibling of a missing path (`./models/digit-ddpm` ->
    `models/digits-ddpm`), or '' when the nearest existing folder holds nothing close."""
    path = Path(path).expanduser()
    parent = path.parent
    if not parent.is_dir():
        return ""
    siblings = [p.name for p in parent.iterdir() if not p.name.startswith(".")]
    found = nearest(path.name, siblings, cutoff=0.7)
    return f"; did you mean {parent / found if str(parent) != '.' else found}?" if found else ""
