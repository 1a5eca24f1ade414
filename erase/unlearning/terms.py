"""The terms a stage adds to its method: a retain term, a robustness term, a weight average.

A method's config holds its own training fields; what a recipe adds around the method is a term,
validated against the method it is attached to:

- `RetainTerm` (`retain`): every retain sample's training target becomes a frozen teacher's
  prediction on it (the retain term then keeps what the teacher did instead of refitting the data).
  The teacher is the recipe's `original` model or the stage's `input`; the samples are the retain
  `images` noised at random timesteps, or the teacher's own guided sampling `paths`
  (`erase.unlearn_data.SamplingPaths`). It needs a method that draws retain samples.
- `RobustTerm` (`robust`): AdvUnlearn-style robust erasure (`erase.robust`): every other step
  unlearns the forget condition plus an adversarial perturbation. It needs a method with a forget
  condition.
- `AverageTerm` (`average`): diffusers' EMAModel of the trained weights, saved in their place.

Before this split these were fields of every method's config (`--retain-target`, `--ema-decay`,
...); `terms_from_options` turns those old names into terms for one more release.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from ..config import build_config, config_dict, field
from ..utils import EraseError

TEACHERS = ("original", "input")
SAMPLES = ("images", "paths")


@dataclass
class RetainTerm:
    teacher: str = field("original", "whose predictions the retain term keeps: the recipe's original model or "
                                     "the stage's input model", choices=TEACHERS)
    samples: str = field("images", "what the retain term is computed on: the retain images noised at random "
                                   "timesteps, or the states the teacher's guided sampler visits on its way to "
                                   "retain samples (its sampling paths)", choices=SAMPLES)
    paths: int = field(256, "with samples=paths: sampling paths drawn (retain conditions at random), each kept "
                            "at every sampler step")

    def __post_init__(self):
        if self.paths < 1:
            raise ValueError(f"paths must be at least 1, got {self.paths}")


@dataclass
class RobustTerm:
    every: int = field(1, "refresh the adversarial perturbation of the forget condition every this many "
                          "adversarial steps (every other step is adversarial)")
    steps: int = field(5, "inner attack steps (Adam on the perturbation) per refresh")
    lr: float = field(0.05, "the inner attack's learning rate")
    radius: float | None = field(None, "keep the perturbation of each condition row within this fraction of "
                                       "the row's norm (projected after every inner step, as PGD does); "
                                       "default unbounded")

    def __post_init__(self):
        if self.every < 1 or self.steps < 1 or not self.lr > 0:
            raise ValueError("every and steps must be at least 1 and lr positive")
        if self.radius is not None and not self.radius > 0:
            raise ValueError(f"radius must be positive, got {self.radius}")


@dataclass
class AverageTerm:
    decay: float = field(0.999, "largest decay of diffusers' EMAModel (its warm-up: min(decay, (1+n)/(10+n)) "
                                "at step n); the average is saved instead of the last weights")

    def __post_init__(self):
        if not 0 < self.decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {self.decay}")


TERM_TYPES = {"retain": RetainTerm, "robust": RobustTerm, "average": AverageTerm}


@dataclass
class Terms:
    """The optional terms of one stage (None: the term is off)."""

    retain: RetainTerm | None = None
    robust: RobustTerm | None = None
    average: AverageTerm | None = None

    @classmethod
    def from_dict(cls, values: dict | None, where: str = "terms") -> "Terms":
        """Terms from JSON: {"retain": {...}, "robust": {...}, "average": {...}}, checked key by key."""
        values = values or {}
        if not isinstance(values, dict):
            raise EraseError(f"{where} must be a JSON object with keys among {', '.join(TERM_TYPES)}")
        if unknown := sorted(set(values) - set(TERM_TYPES)):
            raise EraseError(f"{where}: unknown term {unknown[0]!r}; terms are {', '.join(TERM_TYPES)}")
        built = {}
        for name, spec in values.items():
            if not isinstance(spec, dict):
                raise EraseError(f"{where}.{name} must be a JSON object of the term's fields ({{}} for its defaults)")
            try:
                built[name] = build_config(TERM_TYPES[name], spec)
            except EraseError as e:
                raise EraseError(f"{where}.{name}: {e}") from None
        return cls(**built)

    def to_dict(self) -> dict:
        return {f.name: config_dict(getattr(self, f.name)) for f in dataclasses.fields(self)
                if getattr(self, f.name) is not None}

    def check(self, method, config, where: str = "") -> None:
        """Refuse a term the method cannot take, with one line naming it."""
        share = method.forget_share_for(config)
        prefix = f"{where}: " if where else ""
        if self.retain is not None and share >= 1:
            extra = " at retain_weight 0 (give it a retain_weight)" if hasattr(config, "retain_weight") else ""
            raise EraseError(f"{prefix}{method.name}{extra} draws no retain samples, so a retain term has nothing "
                             f"to act on: remove the retain term or choose a method with a retain batch")
        if self.robust is not None and share <= 0:
            raise EraseError(f"{prefix}{method.name} trains without the forget condition, so a robustness term "
                             f"has nothing to perturb: remove it or attach it to an erasing stage")


# -- the old per-method options, kept one release as aliases -------------------------------------------
LEGACY_OPTIONS = ("ema_decay", "retain_target", "retain_reference", "retain_samples", "trajectories",
                  "adversarial_every", "adversarial_steps", "adversarial_lr", "adversarial_radius")


def terms_from_options(options: dict[str, Any]) -> tuple[Terms, str | None]:
    """The terms the old option names ask for, and the retain teacher's model path (old `retain_reference`).

    Pops the old names from `options` and warns once that they are deprecated. Refuses combinations
    the old options accepted only to ignore (a retain reference without a reference target).
    """
    old = {k: options.pop(k) for k in LEGACY_OPTIONS if options.get(k) is not None}
    if not old:
        return Terms(), None
    warnings.warn(f"{', '.join('--' + k.replace('_', '-') for k in old)} are deprecated and will be removed in the "
                  f"next release: put the term in a recipe (`erase recipes`, docs/recipes.md)",
                  FutureWarning, stacklevel=3)  # shown by default: the users of the options are end users
    target = old.get("retain_target", "data")
    if target not in ("data", "reference"):
        raise EraseError(f"--retain-target must be data or reference, got {target!r}")
    samples = old.get("retain_samples", "images")
    if samples not in ("images", "trajectories"):
        raise EraseError(f"--retain-samples must be images or trajectories, got {samples!r}")
    if old.get("retain_reference") is not None and target != "reference":
        raise EraseError("--retain-reference names the model the retain term keeps: it needs --retain-target reference")
    if samples == "trajectories" and target != "reference":
        raise EraseError("a sampler state has no data target: --retain-samples trajectories needs "
                         "--retain-target reference")
    terms = Terms()
    if target == "reference":
        retain = {"teacher": "original" if old.get("retain_reference") else "input",
                  "samples": "paths" if samples == "trajectories" else "images"}
        if "trajectories" in old:
            retain["paths"] = old["trajectories"]
        terms.retain = _build("--retain-target reference", RetainTerm, retain)
    if old.get("adversarial_every"):
        terms.robust = _build("--adversarial-every", RobustTerm, {
            "every": old["adversarial_every"], **{k: old[f"adversarial_{k}"] for k in ("steps", "lr", "radius")
                                                  if f"adversarial_{k}" in old}})
    if old.get("ema_decay"):
        terms.average = _build("--ema-decay", AverageTerm, {"decay": old["ema_decay"]})
    return terms, old.get("retain_reference")


def _build(option: str, cls: type, values: dict):
    try:
        return build_config(cls, values)
    except EraseError as e:
        raise EraseError(f"{option}: {e}") from None


# -- what the terms need at run time ----------------------------------------------------------------------
def frozen_teacher(model, path: str | None) -> torch.nn.Module:
    """The frozen denoiser a retain term keeps: a copy of `model`'s, or the one of the model at `path`,
    which must be the same backbone with the same parameters (names and shapes)."""
    if path is None:
        return model.frozen_copy()
    from ..backbones import load_backbone

    other = load_backbone(path)
    if type(other) is not type(model):
        what = f"it is a {type(other).__name__}, not a {type(model).__name__}"
    else:
        mine = {n: p.shape for n, p in model.denoiser.named_parameters()}
        theirs = {n: p.shape for n, p in other.denoiser.named_parameters()}
        differ = sorted(n for n in mine.keys() | theirs.keys() if mine.get(n) != theirs.get(n))
        what = f"{len(differ)} parameters differ in name or shape (first: {differ[0]})" if differ else None
    if what:
        raise EraseError(f"--retain-reference {path} does not match the model being trained: {what}. "
                         f"Give the model this run's input was made from (e.g. the original of a recipe).")
    dtype = next(model.denoiser.parameters()).dtype
    return other.denoiser.to(model.device, dtype).eval().requires_grad_(False)


def new_average(params: dict[str, torch.nn.Parameter], term: AverageTerm):
    """diffusers' EMAModel of the trained weights, with its default warm-up: the first update copies
    the weights, then the decay grows as (1 + n) / (10 + n) up to `decay`."""
    from diffusers.training_utils import EMAModel

    return EMAModel(params.values(), decay=term.decay)


def new_robust(model, term: RobustTerm, seed: int):
    from ..robust import AdversarialCondition

    return AdversarialCondition(model, term.every, term.steps, term.lr, seed, term.radius)
