"""What a method unlearns from: forget samples with their anchors, and retain samples.

`UnlearnData` holds tensors and `Condition`s and indexes only their rows, so a condition can be
anything a backbone encodes (a class id, a text embedding, SDXL's embeddings with pooled embeddings
and time ids); `x0` are pixels or VAE latents. `class_erasure_data` builds it from a labelled dataset.
`SamplingPaths` replaces the noised retain samples by the states a teacher's sampler visits
(a retain term on `paths`, `erase.unlearning.terms`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .backbones.base import Condition
from .data import load_dataset
from .noising import Noised, noised
from .utils import EraseError, derive_seed, logger, step_generator, to_device


@dataclass
class SamplingPaths:
    """Retain samples taken from sampling: the states `x_t` a teacher model's guided sampler fed its
    denoiser (`Backbone.sampling_path`) on the way to K retain samples, S steps each.

    A state has no clean sample and no noise of its own, so it has no data target: the retain term
    distils the teacher's prediction there (the retain term's teacher). Half of each drawn batch
    asks for the state under its retain condition and half under the null condition, the two
    predictions guided sampling combines.
    """

    states: torch.Tensor  # (K, S, *sample_shape)
    timesteps: torch.Tensor  # (K, S)
    cond: Condition  # (K) the retain condition of each path
    null: Condition  # (1) the null condition
    description: dict = field(default_factory=dict)

    def to(self, device: torch.device | str) -> "SamplingPaths":
        for name in ("states", "timesteps", "cond", "null"):
            setattr(self, name, getattr(self, name).to(device))
        return self

    def draw(self, n: int, g: torch.Generator) -> Noised:
        """n states with replacement (path and step uniform), the first half conditioned, the rest null;
        `target` is left for the teacher's prediction."""
        k, s = (to_device(torch.randint(m, (n,), generator=g), self.states.device) for m in self.states.shape[:2])
        conditioned = (n + 1) // 2
        cond = Condition.cat([self.cond[k[:conditioned]], self.null[[0] * (n - conditioned)]])
        return Noised(x0=None, cond=cond, noise=None, t=self.timesteps[k, s], x_t=self.states[k, s], target=None)


PATH_STREAM = 1 << 43  # the sampling paths' own random stream, apart from every training step's draws


def sampling_paths(model, teacher, retain_cond: Condition, count: int, seed: int, batch_size: int = 64) -> SamplingPaths:
    """`count` guided sampling paths of `teacher` (a frozen denoiser of `model`'s architecture) at the
    model's sampling steps and guidance: retain conditions drawn from `retain_cond` (without
    replacement while they last), initial noise seeded by (seed, path). On the CPU, float32."""
    g = step_generator(seed, PATH_STREAM)
    rows = (torch.randperm(len(retain_cond), generator=g)[:count] if count <= len(retain_cond)
            else torch.randint(len(retain_cond), (count,), generator=g))
    cond = retain_cond[rows]
    steps, guidance = model.sample_defaults["steps"], model.sample_defaults["guidance"]
    logger.info("drawing %d sampling paths of the retain reference (%d steps, guidance %g)", count, steps, guidance)
    initial = model.initial_noise([derive_seed(seed, PATH_STREAM, i) for i in range(count)])
    states, times = [], []
    for b in range(0, count, batch_size):
        x, t = model.sampling_path(initial[b:b + batch_size], cond[b:b + batch_size].to(model.device), steps,
                                   guidance, teacher)
        states.append(x.transpose(0, 1).float().cpu())
        times.append(t.transpose(0, 1).cpu())
    return SamplingPaths(torch.cat(states).contiguous(), torch.cat(times).contiguous(), cond.to("cpu"),
                         model.null_condition(1).to("cpu"),
                         description={"paths": count, "steps": steps, "guidance": guidance, "seed": seed})


@dataclass
class UnlearnData:
    forget_x0: torch.Tensor
    forget_cond: Condition
    anchor_cond: Condition  # one anchor condition per forget sample
    retain_x0: torch.Tensor
    retain_cond: Condition
    description: dict = field(default_factory=dict)  # written to erase_config.json
    retain_paths: SamplingPaths | None = None  # when set, retain batches are drawn from these states instead
    # Several concepts (or classes) erased at once: each forget sample's concept (an index into
    # `concept_names`). Each batch then holds every concept in equal shares, and the loop logs each
    # concept's loss apart (`erase.unlearning.running.concept_losses`).
    forget_concept: torch.Tensor | None = None
    concept_names: list[str] = field(default_factory=list)

    def __post_init__(self):
        if len(self.forget_x0) == 0:
            raise EraseError("the forget set is empty: nothing to unlearn")
        if len(self.retain_x0) == 0:
            raise EraseError("the retain set is empty: give at least one retained class or prompt")
        if not len(self.forget_x0) == len(self.forget_cond) == len(self.anchor_cond):
            raise EraseError(f"forget set: {len(self.forget_x0)} samples, {len(self.forget_cond)} conditions "
                             f"and {len(self.anchor_cond)} anchors; they must match one to one")
        if len(self.retain_x0) != len(self.retain_cond):
            raise EraseError(f"retain set: {len(self.retain_x0)} samples but {len(self.retain_cond)} conditions")
        if self.forget_concept is not None:
            counts = torch.bincount(self.forget_concept.cpu(), minlength=len(self.concept_names))
            if len(self.forget_concept) != len(self.forget_x0) or len(counts) != len(self.concept_names):
                raise EraseError(f"forget set: {len(self.forget_x0)} samples but {len(self.forget_concept)} concept "
                                 f"labels over {len(self.concept_names)} concepts; they must match one to one")
            if empty := [n for n, c in zip(self.concept_names, counts.tolist()) if c == 0]:
                raise EraseError(f"the forget set holds no sample of {', '.join(empty)}: nothing to unlearn for it")

    @classmethod
    def joined(cls, parts: dict[str, "UnlearnData"], description: dict) -> "UnlearnData":
        """Several concepts' data as one run's: their forget sets, each labelled with its concept, and
        their retain sets one after another."""
        names = list(parts)
        labels = torch.cat([torch.full((len(p.forget_x0),), i, dtype=torch.long) for i, p in enumerate(parts.values())])
        return cls(forget_x0=torch.cat([p.forget_x0 for p in parts.values()]),
                   forget_cond=Condition.cat([p.forget_cond for p in parts.values()]),
                   anchor_cond=Condition.cat([p.anchor_cond for p in parts.values()]),
                   retain_x0=torch.cat([p.retain_x0 for p in parts.values()]),
                   retain_cond=Condition.cat([p.retain_cond for p in parts.values()]), description=description,
                   forget_concept=labels, concept_names=names)

    @property
    def forget_fraction(self) -> float:
        """Share of the forget samples in all the data (∇τ's α_0 depends on it)."""
        return len(self.forget_x0) / (len(self.forget_x0) + len(self.retain_x0))

    def to(self, device: torch.device | str) -> "UnlearnData":
        for name in ("forget_x0", "forget_cond", "anchor_cond", "retain_x0", "retain_cond"):
            setattr(self, name, getattr(self, name).to(device))
        if self.forget_concept is not None:
            self.forget_concept = self.forget_concept.to(device)
        if self.retain_paths is not None:
            self.retain_paths.to(device)
        return self

    def draw(self, model, n_forget: int, n_retain: int, g: torch.Generator,
             antithetic: bool = False) -> tuple[Noised | None, Noised | None]:
        """Noised forget and retain batches (with replacement), every draw taken from `g`."""
        forget = retain = None
        if n_forget:
            i = to_device(self._forget_rows(n_forget, g), self.forget_x0.device)
            forget = noised(model, self.forget_x0[i], self.forget_cond[i], g, antithetic, anchor=self.anchor_cond[i])
            if self.forget_concept is not None:
                forget.concept = self.forget_concept[i]
        if n_retain and self.retain_paths is not None:
            retain = self.retain_paths.draw(n_retain, g)
        elif n_retain:
            i = to_device(torch.randint(len(self.retain_x0), (n_retain,), generator=g), self.retain_x0.device)
            retain = noised(model, self.retain_x0[i], self.retain_cond[i], g, antithetic)
        return forget, retain

    def _forget_rows(self, n: int, g: torch.Generator) -> torch.Tensor:
        """n forget rows with replacement; with several concepts, n / K of each concept's rows (the first
        n mod K concepts one more), so that every batch trains on, and logs, every concept."""
        if self.forget_concept is None:
            return torch.randint(len(self.forget_x0), (n,), generator=g)
        k = len(self.concept_names)  # `set_up` refused a batch too small for one sample of each
        labels = self.forget_concept.cpu()
        rows = []
        for c in range(k):
            members = torch.nonzero(labels == c).flatten()
            rows.append(members[torch.randint(len(members), (n // k + (c < n % k),), generator=g)])
        return torch.cat(rows)


def parse_class_list(value: str | int | Sequence[str | int] | None) -> list[str | int] | None:
    """'3', '3,5', 3, [3, 'five'] -> a list of ids or names; None stays None."""
    if value is None:
        return None
    if isinstance(value, (int, str)):
        value = [v.strip() for v in str(value).split(",") if v.strip()]
    return list(value)


def default_anchor(c: int, forget: set[int], k: int) -> int:
    """`(c + 1) mod K`, skipping classes that are being forgotten themselves."""
    for step in range(1, k):
        if (c + step) % k not in forget:
            return (c + step) % k
    raise EraseError("every class is being forgotten: there is no class left to anchor to")


def class_erasure_data(model, forget, retain=None, anchor=None, dataset: str | None = None,
                       data_root: str | None = None) -> UnlearnData:
    """Real training images of the forget classes and of the retained ones.

    `forget`, `retain`, `anchor`: class ids or names (a comma list or a sequence). `retain` defaults
    to every other class; `anchor` to `(c + 1) mod K` for each forget class `c`, or give one class
    for all of them, or one per forget class. `dataset` defaults to the one the model was trained on.
    """
    forget_ids = [model.class_index(c) for c in parse_class_list(forget) or []]
    if not forget_ids:
        raise EraseError("give at least one class to forget, e.g. --forget 3 or --forget three")
    if len(set(forget_ids)) != len(forget_ids):
        raise EraseError(f"--forget {forget} names a class twice: list each class once")
    k = model.num_classes
    retain_list = parse_class_list(retain)
    retain_ids = ([model.class_index(c) for c in retain_list] if retain_list
                  else [c for c in range(k) if c not in forget_ids])
    if overlap := sorted(set(retain_ids) & set(forget_ids)):
        raise EraseError(f"classes {overlap} are both forgotten and retained: remove them from --retain")
    anchor_list = parse_class_list(anchor)
    if not anchor_list:
        anchors = {c: default_anchor(c, set(forget_ids), k) for c in forget_ids}
    elif len(anchor_list) in (1, len(forget_ids)):
        ids = [model.class_index(a) for a in anchor_list] * (len(forget_ids) if len(anchor_list) == 1 else 1)
        anchors = dict(zip(forget_ids, ids))
    else:
        raise EraseError(f"give one anchor for all forget classes or one per forget class "
                         f"({len(forget_ids)}), got {len(anchor_list)}")
    if forgotten_anchors := sorted({a for a in anchors.values() if a in forget_ids}):
        raise EraseError(f"anchor class(es) {forgotten_anchors} are being forgotten themselves (the anchor equal to "
                         "the forgotten class trains on a zero loss): give an --anchor that is not in --forget")

    name = dataset or model.info.get("training", {}).get("config", {}).get("dataset", "digits")
    data = load_dataset(name, "train", root=data_root, image_size=model.image_shape[-1])
    if data.class_names != model.class_names:
        raise EraseError(f"dataset {name!r} has classes {data.class_names} but the model has "
                         f"{model.class_names}: pass the dataset the model was trained on with --dataset")
    f_mask = torch.isin(data.labels, torch.tensor(forget_ids))
    r_mask = torch.isin(data.labels, torch.tensor(retain_ids))
    f_labels = data.labels[f_mask]
    names = model.class_names
    several = len(forget_ids) > 1  # each class's loss is then logged apart
    return UnlearnData(
        forget_x0=data.images[f_mask],
        forget_cond=model.encode_conditions(f_labels.tolist()).to("cpu"),
        anchor_cond=model.encode_conditions([anchors[int(c)] for c in f_labels]).to("cpu"),
        retain_x0=data.images[r_mask],
        retain_cond=model.encode_conditions(data.labels[r_mask].tolist()).to("cpu"),
        description={"kind": "class", "dataset": data.name,
                     "forget": [names[c] for c in forget_ids], "forget_ids": forget_ids,
                     "retain": [names[c] for c in retain_ids], "retain_ids": retain_ids,
                     "anchor": {names[c]: names[a] for c, a in anchors.items()},
                     "forget_images": int(f_mask.sum()), "retain_images": int(r_mask.sum())},
        forget_concept=torch.tensor([forget_ids.index(int(c)) for c in f_labels]) if several else None,
        concept_names=[names[c] for c in forget_ids] if several else [])
