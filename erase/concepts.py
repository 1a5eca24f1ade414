"""Text concepts to erase: forget prompts, the anchor prompt they are mapped to, and retain prompts.

A concept is a folder of plain-text prompt files (one prompt a line, `#` starts a comment):
`forget.txt`, `anchor.txt` (one line; empty means the empty prompt, i.e. the unconditional model)
and `retain.txt`. The shipped ones live in `prompts/` (their provenance is in prompts/README.md);
`$ERASE_PROMPTS` points elsewhere. Anything that is not a concept name or folder is a literal
prompt (`--forget "Van Gogh"`), erased towards the empty prompt while the generic retain prompts
(`prompts/general/retain.txt`) are kept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .resources import shipped
from .utils import EraseError, logger, read_text

PROMPT_FILES = ("forget.txt", "anchor.txt", "retain.txt")
GENERAL_RETAIN = Path("general") / "retain.txt"


@dataclass
class Concept:
    name: str
    forget: list[str]
    anchor: str
    retain: list[str]
    source: str = "literal"  # the folder the prompts came from, or "literal"
    description: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"name": self.name, "forget": self.forget, "anchor": self.anchor, "retain": self.retain,
                "source": self.source}


def prompts_root() -> Path:
    """`$ERASE_PROMPTS`, or the shipped `prompts/` folder."""
    env = os.environ.get("ERASE_PROMPTS")
    return Path(env).expanduser() if env else shipped("prompts")


def read_prompts(path: str | Path, what: str = "prompt file") -> list[str]:
    """Non-empty, non-comment lines of a prompt file, stripped."""
    path = Path(path)
    if not path.is_file():
        raise EraseError(f"{what} not found: {path} (one prompt a line, # for comments)")
    lines = (line.strip() for line in read_text(path, what).splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def _is_dir(path: Path) -> bool:
    """Path.is_dir, but False for a prompt too long to be a file name (it is then taken as a prompt)."""
    try:
        return path.is_dir()
    except OSError:
        return False


def available_concepts(root: str | Path | None = None) -> list[str]:
    root = Path(root) if root else prompts_root()
    return sorted(p.name for p in root.iterdir() if (p / "forget.txt").is_file()) if root.is_dir() else []


def load_concept_folder(folder: str | Path) -> Concept:
    folder = Path(folder)
    missing = [f for f in PROMPT_FILES if not (folder / f).is_file()]
    if missing:
        raise EraseError(f"concept folder {folder} lacks {', '.join(missing)}: a concept needs "
                         f"{', '.join(PROMPT_FILES)} (anchor.txt may hold only comments: the empty prompt)")
    forget = read_prompts(folder / "forget.txt", "forget prompts")
    anchors = read_prompts(folder / "anchor.txt", "anchor prompt")
    retain = read_prompts(folder / "retain.txt", "retain prompts")
    if not forget:
        raise EraseError(f"{folder / 'forget.txt'} holds no prompts")
    if not retain:
        raise EraseError(f"{folder / 'retain.txt'} holds no prompts: give at least one benign prompt")
    if len(anchors) > 1:
        raise EraseError(f"{folder / 'anchor.txt'} holds {len(anchors)} prompts; a concept has one anchor")
    return Concept(folder.name, forget, anchors[0] if anchors else "", retain, source=str(folder))


def load_concept(spec: str, anchor: str | None = None, retain: str | Path | Sequence[str] | None = None,
                 root: str | Path | None = None) -> Concept:
    """A concept from a shipped name (`nudity`), a concept folder, or a literal prompt (`"Van Gogh"`).

    `anchor` overrides the anchor prompt; `retain` overrides the retain prompts (a prompt file or a
    list of prompts).
    """
    if not spec or not spec.strip():
        raise EraseError("give a concept to erase: a name such as nudity, a concept folder, or a prompt")
    root = Path(root) if root else prompts_root()
    path = Path(spec).expanduser()
    if _is_dir(path):
        concept = load_concept_folder(path)
    elif _is_dir(root / spec):
        concept = load_concept_folder(root / spec)
    else:
        logger.info("%r is not a concept in %s (%s): erasing it as a literal prompt", spec, root,
                    ", ".join(available_concepts(root)) or "none")
        general = root / GENERAL_RETAIN
        retain_prompts = read_prompts(general, "generic retain prompts") if retain is None else []
        concept = Concept(spec.strip(), [spec.strip()], "", retain_prompts)
    if anchor is not None:
        concept.anchor = anchor
    if retain is not None:
        concept.retain = (read_prompts(retain, "retain prompt file") if isinstance(retain, (str, Path))
                          else [r for r in retain if r.strip()])
        if not concept.retain:
            raise EraseError("the retain prompts are empty: give at least one benign prompt")
    if concept.anchor.strip() in {p.strip() for p in concept.forget}:
        raise EraseError(f"the anchor prompt {concept.anchor!r} is one of the prompts to forget: remapping a "
                         "prompt to itself trains on a zero loss; give another --anchor")
    return concept
