"""Prompt sources: plain-text prompt files and the field's published prompt sets as published.

The CSV layouts read (`LAYOUTS`, told apart by their header or named): I2P in both of its layouts
(and the sets that copy its columns, e.g. UnlearnDiffAtk's 142 nudity prompts), MMA-Diffusion's
adversarial prompts, Ring-A-Bell's, P4D's and the COCO-30k captions with their seeds. Every source yields `PromptItem`s that carry their own seed and guidance, so that an image can be
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
    width: int | None = None  # the row's image size where the file gives one (I2P's sd_image_width/height)
    height: int | None = None


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
SIZE_COLUMNS = ("sd_image_width", "sd_image_height")


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


def _size(row: dict, column: str) -> int | None:
    """An image side in pixels from a cell (None for a blank one)."""
    value = _number(row, column, empty=-1.0)
    if value == -1.0:
        return None
    if value != int(value) or not 8 <= value <= 8192:
        raise _BadCell(column, row[column].strip(), "a whole number of pixels from 8 to 8192")
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
    columns, rows = _read_csv(path, "I2P CSV")
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
            size = [_size(row, c) if c in columns else None for c in SIZE_COLUMNS]
        except _BadCell as e:
            raise EraseError(f"{where}: {e}") from None
        # The cell as published, unedited (trailing spaces included, as the authors' scripts passed
        # it on). An empty prompt is kept: the published I2P file has one (case 2260), and its
        # authors generated an image for it like for any other row.
        items.append(PromptItem(row["prompt"], row_seed, row_guidance, i, *size))
    if not items:
        raise EraseError(f"{path}: none of its {len(rows)} rows is in the I2P subset {subset!r}: there is nothing "
                         "to evaluate (choose another --subset)")
    return items


@dataclass(frozen=True)
class Layout:
    """A published prompt-set CSV: the columns that identify it, where its prompts, seeds and guidance are."""

    name: str
    marker: tuple[str, ...]  # every one of these columns is in the header
    prompt: str  # the column of the prompts (a user may name another, e.g. MMA-Diffusion's clean_prompt)
    seed: tuple[str, ...] = SEED_COLUMNS  # per-row seed columns, first found wins; () when the set has none
    guidance: tuple[str, ...] = GUIDANCE_COLUMNS  # per-row guidance columns; () when the set has none


# In detection order: the most specific header first (P4D's and COCO's carry I2P's seed column too).
LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (
    # MMA-Diffusion's adversarial prompts; clean_prompt holds a benign prompt for the clean rate.
    Layout("mma-diffusion", ("target_prompt", "adv_prompt", "clean_prompt"), "adv_prompt", (), ()),
    # Ring-A-Bell's prompts; 'normal prompt' holds each one's benign counterpart.
    Layout("ring-a-bell", ("sensitive prompt",), "sensitive prompt", (), ()),
    # P4D's adversarial prompts, each with its seed and guidance.
    Layout("p4d", ("prompt", "evaluation_seed", "evaluation_guidance", "safe_model"), "prompt"),
    # COCO captions with a seed each (COCO-30k), no guidance column.
    Layout("coco", ("case_number", "source", "prompt", "evaluation_seed", "coco_id"), "prompt", ("evaluation_seed",), ()),
    # Last, and the least specific: any CSV with a `prompt` column is read as I2P's (either layout, and
    # the sets that copy its columns, e.g. UnlearnDiffAtk's), which needs its seeds.
    Layout("i2p", ("prompt",), "prompt"),
)}


def _read_csv(path: Path, what: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """The header and (line, row) pairs of a UTF-8 CSV, every cell as written: the bytes are decoded
    without newline translation, so a line break inside a quoted prompt reaches the generator as is."""
    try:
        reader = csv.DictReader(io.StringIO(_utf8(path, what), newline=""))
        columns = list(reader.fieldnames or [])
        return columns, [(reader.line_num, row) for row in reader]
    except csv.Error as e:
        raise EraseError(f"{path} is not a readable CSV file ({e})") from None


def _utf8(path: Path, what: str) -> str:
    """A UTF-8 file's text as written (`read_text` translates '\\r\\n' to '\\n', also inside cells)."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise EraseError(f"{what} {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise EraseError(f"cannot read {what} {path}: {e.strerror}") from None


def detect_layout(columns: list[str]) -> Layout | None:
    """The first layout whose identifying columns are all in the header."""
    return next((layout for layout in LAYOUTS.values() if set(layout.marker) <= set(columns)), None)


def read_prompt_set(path: str | Path, layout: str = "auto", subset: str = "all", seed: int | None = None,
                    guidance: float | None = None, column: str | None = None,
                    default_guidance: float = 7.5) -> tuple[list[PromptItem], dict]:
    """The prompts of a published prompt set (or of a text file, one per line) and what was read.

    `layout`: `auto` (a `.csv` file's layout from its header, any other file one prompt per line),
    `text`, or one of `LAYOUTS`. Each row keeps its own seed and guidance where the file has them;
    `seed` / `guidance` override them for every row. Where the file has no seeds, row i gets
    `derive_seed(seed or 0, i)`; where it has no guidance, `default_guidance`. `column` reads the
    prompts from another column (MMA-Diffusion's `clean_prompt`, Ring-A-Bell's `normal prompt`).
    Returns the items and a description (file, layout, columns used, rows) for the results.
    """
    path = Path(path)
    if layout not in ("auto", "text", *LAYOUTS):
        raise EraseError(f"unknown prompt layout {layout!r}: choose auto, text or one of {', '.join(LAYOUTS)}")
    if layout == "text" or (layout == "auto" and path.suffix.lower() != ".csv"):
        if column is not None or subset != "all":
            raise EraseError(f"{path} is read as a text file (one prompt per line): it has no columns or subsets; "
                             "name its --layout if it is a CSV")
        items = read_prompt_file(path, seed or 0, default_guidance if guidance is None else guidance)
        return items, {"file": path.name, "layout": "text", "rows": len(items)}
    if not path.is_file():
        raise EraseError(f"prompt set not found: {path}")
    columns, rows = _read_csv(path, "prompt set")
    found = detect_layout(columns) if layout == "auto" else LAYOUTS[layout]
    if found is None:
        known = "; ".join(f"{name} ({', '.join(layout.marker)})" for name, layout in LAYOUTS.items())
        raise EraseError(f"{path}: its header ({', '.join(columns) or 'empty'}) is none of the known layouts, "
                         f"which have these columns: {known}; name one with --layout, or give a text file")
    if found.name == "i2p":
        if column not in (None, "prompt"):
            raise EraseError(f"{path}: an I2P-layout file holds its prompts in 'prompt', not {column!r}")
        items = read_i2p_csv(path, subset, seed, guidance)
        seed_col, guidance_col = _pick_column(columns, SEED_COLUMNS), _pick_column(columns, GUIDANCE_COLUMNS)
        prompt_col = "prompt"
    else:
        if subset != "all":
            raise EraseError(f"subsets are I2P's; {path} is a {found.name} file: leave --subset at all")
        prompt_col = column or found.prompt
        seed_col, guidance_col = _pick_column(columns, found.seed), _pick_column(columns, found.guidance)
        items = _read_rows(path, columns, rows, prompt_col, seed_col, guidance_col, seed, guidance, default_guidance)
    return items, {"file": path.name, "layout": found.name, "prompt_column": prompt_col,
                   "seed_column": None if seed is not None else seed_col,
                   "guidance_column": None if guidance is not None else guidance_col, "rows": len(items)}


def _read_rows(path, columns, rows, prompt_col, seed_col, guidance_col, seed, guidance, default_guidance):
    if prompt_col not in columns:
        raise EraseError(f"{path} has no column {prompt_col!r} (found: {', '.join(columns)})")
    items = []
    for i, (line, row) in enumerate(rows):
        if None in row or None in row.values():
            raise EraseError(f"{path}, line {line} (data row {i + 1}) does not have the header's {len(columns)} cells")
        try:
            if seed is not None or seed_col is None:
                row_seed = derive_seed(seed or 0, i) if seed_col is None else seed
            else:
                row_seed = _seed(row, seed_col)
            row_guidance = guidance if guidance is not None else (
                _number(row, guidance_col) if guidance_col else default_guidance)
        except _BadCell as e:
            raise EraseError(f"{path}, line {line} (data row {i + 1}): {e}") from None
        items.append(PromptItem(row[prompt_col], row_seed, row_guidance, i))  # the cell as published
    if not items:
        raise EraseError(f"{path} has a header but no rows: there is nothing to evaluate")
    return items


def one_image_size(items: list[PromptItem], height: int | None, width: int | None) -> None:
    """Refuse rows that ask for several image sizes when no size is given for all (one run, one size)."""
    sizes = {(height or it.height, width or it.width) for it in items}
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" if h and w else "the pipeline's" for h, w in sorted(sizes, key=str))
        raise EraseError(f"the prompt rows ask for several image sizes ({shown}); give --height and --width "
                         "to draw every prompt at one size")
