"""`attack-prefix` (UnlearnDiffAtk, Zhang et al., arXiv 2310.11868): adversarial prefix token embeddings."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from erase.config import field
from erase.utils import step_generator

from ..generation import quantize
from .base import EVAL_STREAM, INIT_STREAM, STEP_STREAM, _check_shape
from .text import TextAttack, _concept_images, _insert_tokens


@dataclass
class PrefixAttack(TextAttack):
    """UnlearnDiffAtk-style adversarial prompt: k prefix token embeddings per prompt and seed.

    Optimised (continuously; UnlearnDiffAtk projects them to vocabulary tokens) with the attacked
    model's denoising loss on the original model's image for the same prompt and seed; every
    `check_every` steps the unit's image is sampled and the detector checks it, and a unit stops at
    its first success. Units not yet broken start again from new prefixes, up to `restarts` times.
    """

    name: ClassVar[str] = "attack-prefix"
    per_unit: ClassVar[bool] = True
    budget_fields: ClassVar[tuple[str, ...]] = ("attack_steps", "tokens", "check_every", "restarts")

    tokens: int = field(3, "prefix token embeddings (UnlearnDiffAtk: 5 tokens on SD's 77)")
    attack_steps: int = field(40, "Adam steps per start")
    attack_lr: float = field(0.05, "Adam learning rate")
    check_every: int = field(10, "steps between detector checks (early stopping)")
    restarts: int = field(1, "starts for units the detector has not yet passed")
    init_word: str = field("a", "the token whose embedding the prefixes start from (plus noise after the first start)")

    def units(self, model):
        return self._prompt_units()

    def plain(self, model, units):
        return self._plain_prompts(model, units)

    def _conditions(self, model, units, prefixes):
        return _insert_tokens(model, [""] * len(units), [u["prompt"] for u in units], prefixes)

    def search(self, model, units):
        if not units:
            width = model.token_embeddings([""])[0].shape[-1]
            return {"prefix": torch.empty(0, self.tokens, width)}, {}
        reference = self._reference(model)
        targets = _concept_images(reference, [u["prompt"] for u in units], [u["seed"] for u in units],
                                  self.steps, self.guidance, self.batch_size)
        start = model.token_embeddings([self.init_word])[0][0, 1]
        found = start.expand(len(units), self.tokens, -1).clone()
        open_units = list(range(len(units)))
        log = {"steps_to_success": {}}
        for r in range(self.restarts):
            if not open_units:
                break
            g = step_generator(self.seed, INIT_STREAM, r)
            init = start.expand(len(open_units), self.tokens, -1)
            noise = 0 if r == 0 else start.std() * torch.randn(init.shape, generator=g).to(start)
            prefixes = (init + noise).clone().requires_grad_(True)
            optimizer = torch.optim.Adam([prefixes], lr=self.attack_lr)
            live = torch.ones(len(open_units), dtype=torch.bool)
            group = [units[k] for k in open_units]
            if r == 0:
                log["fixed_draw_loss_start"] = self._fixed_draw_loss(model, group, prefixes, targets)
            for step in range(1, self.attack_steps + 1):
                g = step_generator(self.seed, STEP_STREAM, r, step)
                per_unit = self._loss(model, group, prefixes, targets[open_units], g)
                loss = per_unit[live.to(per_unit.device)].sum()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                if step % self.check_every == 0 or step == self.attack_steps:
                    current = prefixes.detach().clone()
                    found[open_units] = torch.where(live[:, None, None], current, found[open_units])
                    with torch.no_grad():
                        images = quantize(self._sample_conditions(model, group, self._conditions(model, group, current)))
                    passed = self.detector(images) & live
                    for i in torch.nonzero(passed).flatten().tolist():
                        log["steps_to_success"][str(units[open_units[i]]["seed"])] = r * self.attack_steps + step
                    live &= ~passed
                    if not live.any():
                        break
            open_units = [k for k, alive in zip(open_units, live.tolist()) if alive]
        log["fixed_draw_loss_end"] = self._fixed_draw_loss(model, units, found, targets)
        log["unbroken_units"] = len(open_units)
        return {"prefix": found}, log

    def _loss(self, model, units, prefixes, targets, g):
        """Per unit: the attacked model's denoising loss on its target under prefix + prompt."""
        x_t, t, target = self._noised(model, targets, g)
        prediction = model.predict(x_t, t, self._conditions(model, units, prefixes))
        return ((prediction - target) ** 2).flatten(1).mean(1)

    def _fixed_draw_loss(self, model, units, prefixes, targets) -> float:
        """The mean loss under one fixed draw of noise and timesteps, comparable between prefixes."""
        with torch.no_grad():
            return float(self._loss(model, units, prefixes, targets, step_generator(self.seed, EVAL_STREAM)).mean())

    def attacked(self, model, units, found):
        width = model.token_embeddings([""])[0].shape[-1]
        prefixes = _check_shape(found, "prefix", (width,))
        with torch.no_grad():
            cond = self._conditions(model, units, prefixes.to(model.device))
        return self._sample_conditions(model, units, cond)
