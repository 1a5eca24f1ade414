"""Several text concepts erased at once: `--forget` lists, files of concepts, and mass-erasure prompt files.

`--forget` takes one concept as before (a shipped name, a concept folder, or a literal prompt), or
several:

- a comma-separated list of shipped concept names or concept folders (`three,nudity`);
- a text file of such names or folders, one a line (`#` starts a comment);
- a prompt file in the mass-erasure layout the field publishes (a CSV with the columns
  `id,type,text,concept,seed`, as MACE's and SPEED's celebrity files): each concept of the `erase`
  rows is erased with its prompts, and the `retain` rows are what is kept.

In a list every item must be a concept name or folder: a literal prompt is refused there, because
a prompt may itself hold a comma (give prompts in the CSV layout instead). The concepts' retain
prompts are merged (order kept, repeats dropped); a prompt one concept retains and another erases
is left out of the retain set. A list that repeats a concept, an unknown concept, and a `--retain`
prompt that is also a forget prompt are each refused in one line before any work starts.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from .concepts import LITERAL_PREFIX, Concept, Vocabulary, available_concepts, load_concept, prompts_root, read_prompts
from .utils import EraseError, logger, read_text

MASS_COLUMNS = ("id", "type", "text", "concept", "seed")


@dataclass
class ConceptSet:
    """Concepts to erase together and the prompts to keep."""

    concepts: list[Concept]
    retain: list[str]
    source: str

    @property
    def forget_prompts(self) -> list[str]:
        return [p for c in self.concepts for p in c.forget]

    def describe(self) -> dict:
        return {"source": self.source, "concepts": [c.name for c in self.concepts],
                "anchors": sorted({c.anchor for c in self.concepts}),
                "forget_prompts": len(self.forget_prompts), "retain_prompts": len(self.retain)}


def read_mass_concepts(path: str | Path) -> tuple[dict[str, list[str]], list[str]]:
    """The prompts of a mass-erasure file (`id,type,text,concept,seed`): {concept: its erase prompts}
    in file order, and the retain prompts. The `seed` column is the image seed of the published
    protocol; the edits draw no images, the evaluation reads it."""
    path = Path(path)
    rows = list(csv.reader(read_text(path, "mass-erasure prompt file").splitlines()))
    if not rows or tuple(c.strip() for c in rows[0]) != MASS_COLUMNS:
        raise EraseError(f"{path} is not a mass-erasure prompt file: its first line must be "
                         f"{','.join(MASS_COLUMNS)}, got {','.join(rows[0]) if rows else '(empty file)'}")
    erase: dict[str, list[str]] = {}
    retain: list[str] = []
    for number, row in enumerate(rows[1:], start=2):
        if not row:
            continue
        if len(row) != len(MASS_COLUMNS):
            raise EraseError(f"{path} line {number} has {len(row)} fields, expected {len(MASS_COLUMNS)} "
                             f"({','.join(MASS_COLUMNS)}); quote a prompt that holds a comma")
        kind, text, concept = row[1].strip(), row[2].strip(), row[3].strip()
        if kind not in ("erase", "retain") or not text or not concept:
            raise EraseError(f"{path} line {number}: type must be erase or retain and text and concept non-empty, "
                             f"got type {kind!r}, text {text!r}, concept {concept!r}")
        if kind == "erase":
            erase.setdefault(concept, []).append(text)
        else:
            retain.append(text)
    if not erase:
        raise EraseError(f"{path} has no erase rows: nothing to erase")
    return erase, retain


def _list_items(forget: str | Sequence[str]) -> tuple[list[str], str]:
    """The items of a `--forget` list (comma list, or a file of names), and where they came from."""
    if not isinstance(forget, str):
        return [str(f).strip() for f in forget], "list"
    path = Path(forget).expanduser()
    if path.is_file():
        return read_prompts(path, "concept list"), str(path)
    return [item.strip() for item in forget.split(",")], "list"


def _check_list(items: list[str]) -> None:
    if any(not item for item in items):
        raise EraseError("--forget has an empty item (two commas in a row, or a trailing comma): list concept "
                         "names or folders separated by single commas")
    seen: set[str] = set()
    for item in items:
        key = Path(item).name.casefold()
        if key in seen:
            raise EraseError(f"--forget names {item!r} twice: list each concept once")
        seen.add(key)


def _load_listed(item: str, anchor: str | None, root: Path, vocabulary: Vocabulary | None) -> Concept:
    if (Path(item).expanduser().is_dir() or (root / item).is_dir()
            or (vocabulary is not None and vocabulary.class_index(item) is not None)):
        return load_concept(item, anchor=anchor, root=root, vocabulary=vocabulary)
    words = f"; this model's class words: {', '.join(vocabulary.class_words)}" if vocabulary else ""
    raise EraseError(f"unknown concept {item!r} in --forget: each item of a list must be a concept name "
                     f"({', '.join(available_concepts(root)) or 'none shipped'}{words}) or a concept folder; give "
                     f"prompts as a CSV file with the columns {','.join(MASS_COLUMNS)}")


def is_concept_list(forget) -> bool:
    """Whether `--forget` names several concepts: a sequence, a comma list, a file of names, or a mass-erasure
    CSV (a `prompt:` literal is one prompt, commas and all)."""
    if not isinstance(forget, str):
        return True
    text = forget.strip()
    if text.lower().startswith(LITERAL_PREFIX):
        return False
    return "," in text or Path(text).expanduser().is_file()


def _merge_retain(concepts: list[Concept], forget: set[str]) -> list[str]:
    merged = list(dict.fromkeys(p for c in concepts for p in c.retain))
    dropped = [p for p in merged if p in forget]
    if dropped:
        logger.info("left %d prompts out of the merged retain set: other concepts of the list erase them (%s)",
                    len(dropped), ", ".join(dropped[:5]) + (" ..." if len(dropped) > 5 else ""))
    return [p for p in merged if p not in forget]


def resolve_concepts(forget: str | Sequence[str], retain: str | Path | Sequence[str] | None = None,
                     anchor: str | None = None, root: str | Path | None = None,
                     vocabulary: Vocabulary | None = None) -> ConceptSet:
    """The concepts `--forget` names (see the module docstring), with the merged retain prompts.

    `retain` (a prompt file or a list of prompts; a comma-separated string is split) replaces the
    merged retain set; `anchor` replaces every concept's anchor prompt. A model's `vocabulary` (the
    miniatures) lets a list name its class words (`three,five,seven`).
    """
    if forget is None or (isinstance(forget, str) and not forget.strip()):
        raise EraseError("give a concept to erase: a name such as nudity, a concept folder, a prompt, a "
                         "comma-separated list of concepts, or a file of them")
    root = Path(root) if root else prompts_root()
    if isinstance(forget, str) and Path(forget).expanduser().suffix.lower() == ".csv":
        if not Path(forget).expanduser().is_file():
            raise EraseError(f"mass-erasure prompt file not found: {forget}")
        erase, kept = read_mass_concepts(Path(forget).expanduser())
        concepts = [Concept(name, prompts, anchor or "", kept, source=str(forget)) for name, prompts in erase.items()]
        source = str(forget)
    else:
        if not is_concept_list(forget):
            concepts, source = [load_concept(forget, anchor=anchor, root=root, vocabulary=vocabulary)], forget
        else:
            items, source = _list_items(forget)
            _check_list(items)
            concepts = [_load_listed(item, anchor, root, vocabulary) for item in items]
            names = [c.name for c in concepts]
            if twice := next((n for i, n in enumerate(names) if n in names[:i]), None):
                raise EraseError(f"--forget names the concept {twice!r} twice (under two names): list each concept once")
    forget_prompts = {p.strip() for c in concepts for p in c.forget}
    if retain is None:
        kept = _merge_retain(concepts, forget_prompts)
    else:
        if isinstance(retain, str) and not Path(retain).expanduser().is_file():
            retain = [p.strip() for p in retain.split(",")]
        kept = (read_prompts(retain, "retain prompt file") if isinstance(retain, (str, Path))
                else [r.strip() for r in retain if r.strip()])
        both = [p for p in kept if p in forget_prompts]
        if both:
            raise EraseError(f"{both[0]!r} is both a prompt to forget and one to retain: take it out of --retain")
    if not kept:
        raise EraseError("the retain prompts are empty: give at least one prompt to keep (--retain)")
    for concept in concepts:
        if concept.anchor.strip() in forget_prompts:
            raise EraseError(f"the anchor prompt {concept.anchor!r} of {concept.name} is a prompt to forget: give "
                             "another --anchor")
        concept.retain = kept
    return ConceptSet(concepts, kept, source)
