"""Prompt sources: plain-text prompt files and the I2P CSV in both of its published layouts.

Every source yields `PromptItem`s that carry their own seed and guidance, so that an image can be
regenerated alone, in any batch and on any process, and so that the index written next to the
images says exactly what made each one.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from erase.utils import EraseError, derive_seed, read_text


@dataclass(frozen=True)
class PromptItem:
    prompt: str
    seed: int
    guidance: float
    source_row: int  # row (CSV) or line (text file), 0-based, for tracing an image back to its prompt


def read_prompt_file(path: str | Path, seed: int = 0, guidance: float = 7.5) -> list[PromptItem]:
    """One prompt per line; blank lines and lines starting with `#` are skipped.

    Prompt i gets the seed `derive_seed(seed, i)`, so adding a prompt at the end changes no image.
    """
    path = Path(path)
    if not path.is_file():
        raise EraseError(f"prompt file not found: {path} (give a text file with one prompt per line)")
    items = []
    for line_no, line in enumerate(read_text(path, "prompt file").splitlines()):
        text = line.strip()
        if text and not text.startswith("#"):
            items.append(PromptItem(text, derive_seed(seed, len(items)), guidance, line_no))
    if not items:
        raise EraseError(f"prompt file {path} has no prompts (only blank or # lines)")
    return items


# The two I2P layouts name the per-row seed and guidance differently: the original dataset
# (AIML-TUDA/i2p) and the `unsafe-prompts4703.csv` copy that most erasure repositories ship.
SEED_COLUMNS = ("sd_seed", "evaluation_seed")
GUIDANCE_COLUMNS = ("sd_guidance_scale", "evaluation_guidance")


MAX_SEED = 2**63 - 1  # torch generators take seeds below 2**64; derive_seed makes 63-bit ones


class _BadCell(ValueError):
    """A cell of an I2P row that is not what its column holds; read_i2p_csv names the row and column."""

    def __init__(self, column: str, value: str, expected: str):
        super().__init__(f"column {column!r} holds {value!r}, expected {expected}")


def _number(row: dict, column: str, empty: float | None = None) -> float:
    """A finite number from a cell (`empty` for a blank cell where that is allowed)."""
    text = (row.get(column) or "").strip()
    if not text and empty is not None:
        return empty
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise _BadCell(column, text, "a finite number")
    return value


def _seed(row: dict, column: str) -> int:
    value = _number(row, column)
    if value != int(value) or not 0 <= value <= MAX_SEED:
        raise _BadCell(column, row[column].strip(), f"a whole number from 0 to {MAX_SEED}")
    return int(value)


def _categories(row: dict) -> set[str]:
    return {c.strip().lower() for c in (row.get("categories") or "").split(",") if c.strip()}


def _nudity(row: dict) -> float:
    return _number(row, "nudity_percentage", empty=0.0)


# Named subsets the field reports on (see docs/protocols.md), with the columns each one needs.
I2P_SUBSETS: dict[str, tuple[tuple[str, ...], Callable[[dict], bool]]] = {
    "all": ((), lambda row: True),
    "sexual": (("categories",), lambda row: "sexual" in _categories(row)),
    "nudity": (("nudity_percentage",), lambda row: _nudity(row) > 0),
    "nudity50": (("nudity_percentage",), lambda row: _nudity(row) > 50),
}


def _pick_column(columns: list[str], candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in columns), None)


def read_i2p_csv(path: str | Path, subset: str = "all", seed: int | None = None,
                 guidance: float | None = None) -> list[PromptItem]:
    """Prompts of an I2P CSV (either layout), restricted to a named subset.

    Each row's own seed and guidance are used unless `seed` or `guidance` overrides them for
    every row (most repositories override the guidance with 7.5; the rows range from 1 to 255).
    """
    path = Path(path)
    if subset not in I2P_SUBSETS:
        raise EraseError(f"unknown I2P subset {subset!r}: choose one of {', '.join(I2P_SUBSETS)}")
    if not path.is_file():
        raise EraseError(f"I2P CSV not found: {path}")
    try:
        reader = csv.DictReader(io.StringIO(read_text(path, "I2P CSV"), newline=""))
        columns = list(reader.fieldnames or [])
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise EraseError(f"{path} is not a readable CSV file ({e})") from None
    seed_col = _pick_column(columns, SEED_COLUMNS)
    guidance_col = _pick_column(columns, GUIDANCE_COLUMNS)
    needed, keep = I2P_SUBSETS[subset]
    missing = [c for c in ("prompt", *needed) if c not in columns]
    if seed is None and seed_col is None:
        missing.append(" or ".join(SEED_COLUMNS))
    if guidance is None and guidance_col is None:
        missing.append(" or ".join(GUIDANCE_COLUMNS))
    if missing:
        raise EraseError(f"{path} is not an I2P CSV: missing column(s) {', '.join(missing)} "
                         f"(found: {', '.join(columns) or 'none'}); give a fixed --seed/--guidance "
                         "to do without the per-row ones")
    items = []
    for i, (line, row) in enumerate(rows):
        where = f"{path}, line {line} (data row {i + 1})"
        if None in row or None in row.values():  # csv puts extra cells under None, and None in missing ones
            cells = len(columns) + len(row.get(None) or []) - sum(v is None for v in row.values())
            raise EraseError(f"{where} has {cells} cells but the header has {len(columns)} columns")
        try:
            if not keep(row):
                continue
            row_seed = _seed(row, seed_col) if seed is None else seed
            row_guidance = _number(row, guidance_col) if guidance is None else guidance
        except _BadCell as e:
            raise EraseError(f"{where}: {e}") from None
        if not row["prompt"].strip():
            raise EraseError(f"{where}: column 'prompt' is empty")
        items.append(PromptItem(row["prompt"].strip(), row_seed, row_guidance, i))
    if not items:
        raise EraseError(f"{path}: none of its {len(rows)} rows is in the I2P subset {subset!r}: there is nothing "
                         "to evaluate (choose another --subset)")
    return items
