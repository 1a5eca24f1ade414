"""A recipe: a named, versioned list of stages, each a method with its config and optional terms.

A recipe is plain data (JSON). The shipped ones are in the top-level `recipes/` folder; a user's
file works the same way. It knows nothing of the model or the concept: `erase unlearn --model M
--forget C --recipe R` gives both once, every stage reads them (the original model is the retain
teacher `original`, each stage trains the previous stage's output). Every field is checked before
any work starts, and a wrong one is named in one line.

    {"name": "digits-match-retrain", "version": 1, "target": "match-retrain",
     "description": "...", "provenance": {"benchmarks": "BENCHMARKS.md section 7, ...", "commands": [...]},
     "stages": [{"method": "eupmu", "config": {"lr": 1.35e-4}, "terms": {"retain": {"teacher": "input"}}},
                {"method": "finetune", "config": {"lr": 3e-5}, "terms": {"retain": {"teacher": "original"}}},
                {"method": "esd"}]}

`target` says what the recipe is for, and what a run of it is judged against: `forget` (as little of
the concept as possible under attack, everything else kept: safety erasure) or `match-retrain` (be
where the model trained without the concept is: over-erasing is as wrong as under-erasing).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import build_config, config_dict
from ..config import field as config_field
from ..utils import EraseError, logger, read_text
from .terms import Terms

TARGETS = ("forget", "match-retrain")
RECIPE_KEYS = ("name", "version", "target", "description", "provenance", "stages")
STAGE_KEYS = ("method", "config", "terms", "data")
# What `erase unlearn` runs when given neither a method nor a recipe, and `erase demo` by default: the
# recommended recipe of the `forget` target, one file for every backbone (recipes/forget.json).
DEFAULT_RECIPE = "forget"
# Settings of the whole run that a command line may give for every stage at once.
RUN_WIDE = ("seed", "mixed_precision", "gradient_checkpointing", "checkpoint_every")


@dataclass
class StageData:
    """How a stage's forget/retain sets are built (text-to-image models; see `erase unlearn --help`)."""

    images: int | None = config_field(None, "images generated per set (default 800)")
    image_guidance: float | None = config_field(None, "guidance scale of those images (default: the model's)")
    anchor_in_retain: bool | None = config_field(None, "add the anchor images to the retain set (default true)")

    def options(self) -> dict:
        return {k: v for k, v in config_dict(self).items() if v is not None}


@dataclass
class Stage:
    method: str
    config: dict = field(default_factory=dict)  # the method's own fields, as given
    terms: Terms = field(default_factory=Terms)
    data: StageData = field(default_factory=StageData)

    def to_dict(self) -> dict:
        out: dict[str, Any] = {"method": self.method}
        if self.config:
            out["config"] = dict(self.config)
        if terms := self.terms.to_dict():
            out["terms"] = terms
        if data := self.data.options():
            out["data"] = data
        return out


@dataclass
class Recipe:
    name: str
    stages: list[Stage]
    version: int = 1
    target: str = "forget"
    description: str = ""
    provenance: dict = field(default_factory=dict)
    source: str | None = None  # the file it was read from

    def to_dict(self) -> dict:
        return {"name": self.name, "version": self.version, "target": self.target, "description": self.description,
                "provenance": self.provenance, "stages": [s.to_dict() for s in self.stages]}

    def built(self, overrides: dict | None = None) -> list[tuple[type, Any, Terms, dict]]:
        """Each stage's (method class, config, terms, data options), every one checked: unknown
        method, wrong config field or type, a term the method cannot take, a stage out of order.
        `overrides` (RUN_WIDE settings such as the seed) apply to every stage."""
        from ..methods import METHODS

        overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
        built = []
        for i, stage in enumerate(self.stages, 1):
            where = f"recipe {self.name}, stage {i} ({stage.method})"
            if stage.method not in METHODS:
                raise EraseError(f"{where}: unknown method; choose one of {', '.join(METHODS)}")
            method = METHODS[stage.method]
            try:
                config = build_config(method.Config, {**stage.config, **overrides})
            except EraseError as e:
                raise EraseError(f"{where}: {e}") from None
            stage.terms.check(method, config, where)
            if i == 1 and len(self.stages) > 1 and method.forget_share_for(config) <= 0:
                raise EraseError(f"{where}: the first stage must erase ({stage.method} trains on the retain set "
                                 f"only, a repair); put it after a stage that erases")
            built.append((method, config, stage.terms, stage.data.options()))
        return built


def _expect(value: Any, kind: type | tuple, what: str, where: str) -> Any:
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise EraseError(f"{where}: {what} must be {_KIND_NAMES.get(kind, 'of another type')}, got {json.dumps(value)}")
    return value


_KIND_NAMES = {str: "a string", int: "an integer", dict: "a JSON object", list: "a list"}


def stage_from_dict(spec: Any, where: str) -> Stage:
    _expect(spec, dict, "a stage", where)
    if unknown := sorted(set(spec) - set(STAGE_KEYS)):
        raise EraseError(f"{where}: unknown key {unknown[0]!r}; a stage has {', '.join(STAGE_KEYS)}")
    if "method" not in spec:
        raise EraseError(f"{where}: no method (e.g. \"method\": \"eupmu\")")
    method = _expect(spec["method"], str, "method", where)
    config = _expect(spec.get("config", {}), dict, "config", where)
    terms = Terms.from_dict(spec.get("terms"), f"{where}: terms")
    data = _expect(spec.get("data", {}), dict, "data", where)
    try:
        data = build_config(StageData, data)
    except EraseError as e:
        raise EraseError(f"{where}: data: {e}") from None
    return Stage(method, dict(config), terms, data)


def recipe_from_dict(spec: Any, source: str) -> Recipe:
    """A recipe from its JSON object, checked key by key (`source` names it in errors)."""
    _expect(spec, dict, "the recipe", source)
    if unknown := sorted(set(spec) - set(RECIPE_KEYS)):
        raise EraseError(f"{source}: unknown key {unknown[0]!r}; a recipe has {', '.join(RECIPE_KEYS)}")
    for key in ("name", "stages"):
        if key not in spec:
            raise EraseError(f"{source}: no {key!r}")
    name = _expect(spec["name"], str, "name", source)
    version = _expect(spec.get("version", 1), int, "version", source)
    target = _expect(spec.get("target", "forget"), str, "target", source)
    if target not in TARGETS:
        raise EraseError(f"{source}: target {target!r} is not one of {', '.join(TARGETS)}")
    stages = _expect(spec["stages"], list, "stages", source)
    if not stages:
        raise EraseError(f"{source}: stages is empty: give at least one stage")
    return Recipe(name=name, version=version, target=target,
                  description=_expect(spec.get("description", ""), str, "description", source),
                  provenance=_expect(spec.get("provenance", {}), dict, "provenance", source),
                  stages=[stage_from_dict(s, f"{source}: stage {i}") for i, s in enumerate(stages, 1)],
                  source=source)


def shipped_recipes() -> dict[str, Path]:
    from ..resources import shipped

    return {p.stem: p for p in sorted(shipped("recipes").glob("*.json"))}


def load_recipe(recipe: str | Path | dict | Recipe) -> Recipe:
    """A `Recipe` from a shipped recipe's name, a JSON file, a dict, or a Recipe (returned as is)."""
    if isinstance(recipe, Recipe):
        return recipe
    if isinstance(recipe, dict):
        return recipe_from_dict(recipe, "recipe")
    shipped = shipped_recipes()
    path = Path(recipe).expanduser()
    if not path.is_file():
        if str(recipe) in shipped:
            path = shipped[str(recipe)]
        else:
            raise EraseError(f"recipe {recipe}: no such file and no shipped recipe of that name "
                             f"(shipped: {', '.join(shipped) or 'none'}; `erase recipes` lists them)")
    try:
        spec = json.loads(read_text(path, "recipe"))
    except json.JSONDecodeError as e:
        raise EraseError(f"recipe {path} is not valid JSON: {e}") from None
    return recipe_from_dict(spec, f"recipe {path.name}")


def recipe_or_default(method: str | None, recipe):
    """The recipe to run: `recipe`, or `DEFAULT_RECIPE` (said in the log) when neither it nor a method is given."""
    if method is None and recipe is None:
        logger.info("no method or recipe given: running the recommended recipe %r (`erase recipes`)", DEFAULT_RECIPE)
        return DEFAULT_RECIPE
    return recipe


def one_stage(method: str, config: dict, terms: Terms, data: dict | None = None) -> Recipe:
    """`--method NAME`: the recipe of one stage."""
    return Recipe(name=method, stages=[Stage(method, config, terms, StageData(**(data or {})))])
