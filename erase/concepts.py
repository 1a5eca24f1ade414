"""Text concepts to erase: forget prompts, the anchor prompt they are mapped to, and retain prompts.

A concept is a folder of plain-text prompt files (one prompt a line, `#` starts a comment):
`forget.txt`, `anchor.txt` (one line; empty means the empty prompt, i.e. the unconditional model)
and `retain.txt`. The shipped ones live in `prompts/` (their provenance is in prompts/README.md);
`$ERASE_PROMPTS` points elsewhere. A model that records its vocabulary (the miniatures: caption
templates and class words) resolves each class word to a concept built from its own captions. A
literal prompt is taken only when it is clearly one (several words, `--forget "Van Gogh"`, or the
`prompt:` prefix); it is erased towards the empty prompt while the generic retain prompts
(`prompts/general/retain.txt`) are kept. A single unknown word, or a path that does not exist, is an
error naming the nearest concept.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from .resources import shipped
from .suggest import did_you_mean, looks_like_path, near_path
from .utils import EraseError, read_text

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


@dataclass
class Vocabulary:
    """What a model learned to draw and the words it learned for it: its training caption templates
    (`{w}` the class word, `{d}` its index) and its class words, as the miniatures record them in
    erase_info.json. A class word then resolves to a concept built from the model's own captions."""

    templates: list[str]
    class_words: list[str]

    @classmethod
    def from_info(cls, info: dict | None) -> "Vocabulary | None":
        training = (info or {}).get("training") or {}
        templates, words = training.get("train_templates"), training.get("class_words")
        return cls(list(templates), list(words)) if templates and words else None

    def class_index(self, word: str) -> int | None:
        """The class a word names: its class word (`five`) or its index (`5`)."""
        word = word.strip().lower()
        if word in self.class_words:
            return self.class_words.index(word)
        return int(word) if word.isdigit() and int(word) < len(self.class_words) else None

    def captions(self, index: int) -> list[str]:
        return [t.format(w=self.class_words[index], d=index) for t in self.templates]

    def concept(self, word: str) -> Concept | None:
        """Forget the class's training captions, anchor to the next class's first caption (the class
        benchmark's (c + 1) mod K), retain every other class's captions: `prompts/three`, for any class."""
        index = self.class_index(word)
        if index is None:
            return None
        others = [c for c in range(len(self.class_words)) if c != index]
        anchor = self.captions((index + 1) % len(self.class_words))[0]
        return Concept(self.class_words[index], self.captions(index), anchor,
                       [p for c in others for p in self.captions(c)], source="model vocabulary (its training captions)")


LITERAL_PREFIX = "prompt:"  # `--forget "prompt:dog"`: a one-word literal prompt, said explicitly
LITERAL_RULE = (f"a literal prompt needs several words (e.g. 'a photo of a dog'), or the prefix "
                f"{LITERAL_PREFIX} for one word ({LITERAL_PREFIX}dog)")


def resolve_concept(spec: str, root: Path, vocabulary: Vocabulary | None = None,
                    known_names: tuple[str, ...] = ()) -> Concept:
    """The concept `spec` names. In order: a concept folder, a shipped concept, a class word of the
    model's vocabulary, then a literal prompt, taken only when it is clearly one (several words, or
    the `prompt:` prefix). A path that does not exist and a single unknown word are errors, with the
    nearest shipped concept, class word or `known_names` (e.g. the methods) as a suggestion."""
    text = spec.strip()
    if text.lower().startswith(LITERAL_PREFIX):
        return _literal(text[len(LITERAL_PREFIX):].strip(), root)
    path = Path(text).expanduser()
    if _is_dir(path):
        return load_concept_folder(path)
    if looks_like_path(text):
        raise EraseError(f"concept folder {text} does not exist{near_path(text)} (a concept folder holds "
                         f"{', '.join(PROMPT_FILES)})")
    if _is_dir(root / text):
        return load_concept_folder(root / text)
    if vocabulary is not None and (concept := vocabulary.concept(text)) is not None:
        return concept
    if len(text.split()) > 1:
        return _literal(text, root)
    names = available_concepts(root) + (vocabulary.class_words if vocabulary else []) + list(known_names)
    hint = did_you_mean(text, names)
    if text.lower() in {n.lower() for n in known_names}:
        raise EraseError(f"{text!r} is a method, not a concept: give it with --method, and the concept with --forget")
    shipped_list = ", ".join(available_concepts(root)) or "none"
    words = f"; this model's class words: {', '.join(vocabulary.class_words)}" if vocabulary else ""
    raise EraseError(f"{text!r} is not a concept{hint} (shipped concepts: {shipped_list}{words}); {LITERAL_RULE}")


def _literal(prompt: str, root: Path) -> Concept:
    """Erased towards the empty prompt; the generic retain prompts are read by `load_concept` unless given."""
    if not prompt:
        raise EraseError(f"{LITERAL_PREFIX} needs a prompt after it, e.g. {LITERAL_PREFIX}dog")
    return Concept(prompt, [prompt], "", [])


def describe_concept(concept: Concept) -> str:
    """One line per set, for the log before any image is generated."""
    def listed(prompts: list[str]) -> str:
        shown = "; ".join(prompts[:4]) + ("; ..." if len(prompts) > 4 else "")
        return f"{len(prompts)} prompt{'s' * (len(prompts) != 1)}: {shown}"

    source = ("a literal prompt (several words, or prompt:), anchored to the empty prompt, with the generic retain prompts"
              if concept.source == "literal" else concept.source)
    return (f"concept {concept.name!r} from {source}\n  forget ({listed(concept.forget)})\n"
            f"  anchor: {concept.anchor!r}\n  retain ({listed(concept.retain)})")


def load_concept(spec: str, anchor: str | None = None, retain: str | Path | Sequence[str] | None = None,
                 root: str | Path | None = None, vocabulary: Vocabulary | None = None,
                 known_names: tuple[str, ...] = ()) -> Concept:
    """A concept from a shipped name (`nudity`), a concept folder, a class word of the model's
    `vocabulary` (`five` on the miniature), or a literal prompt of several words (`"Van Gogh"`):
    see `resolve_concept`.

    `anchor` overrides the anchor prompt; `retain` overrides the retain prompts (a prompt file, which
    must exist when the value looks like a path, or a list of prompts).
    """
    if not spec or not spec.strip():
        raise EraseError("give a concept to erase: a name such as nudity, a concept folder, or a prompt")
    root = Path(root) if root else prompts_root()
    concept = resolve_concept(spec, root, vocabulary, known_names)
    if concept.source == "literal" and retain is None:
        concept.retain = read_prompts(root / GENERAL_RETAIN, "generic retain prompts")
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
