"""`attack-null-latent` (in the spirit of TINA): the empty prompt's starting latent, optimised."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from erase.config import field

from ..generation import quantize
from .base import _check_shape
from .text import TextAttack, _concept_images


@dataclass
class NullLatent(TextAttack):
    """A null-prompt image-inversion attack in the spirit of TINA: no text is optimised or used.

    For each unit, the original model's image of the concept (the unit's prompt and seed) is
    DDIM-inverted under the empty prompt on the attacked model, then the starting latent is refined
    with Adam so that the empty prompt's DDIM sample matches the image (gradients through all
    `steps` sampler steps), with the detector checking every `check_every` steps. Pre-attack: the
    empty prompt from the unit's own noise.
    """

    name: ClassVar[str] = "attack-null-latent"
    per_unit: ClassVar[bool] = True
    budget_fields: ClassVar[tuple[str, ...]] = ("attack_steps", "steps", "check_every")

    steps: int = field(10, "DDIM steps of the inversion, of the sampler the latent is optimised through, and "
                           "of every image")
    attack_steps: int = field(10, "Adam steps refining the inverted latents (0: DDIM inversion only)")
    attack_lr: float = field(0.05, "Adam learning rate")
    check_every: int = field(5, "steps between detector checks (early stopping)")

    def units(self, model):
        return self._prompt_units()

    def _null(self, model, n):
        return model.null_condition(n)

    def plain(self, model, units):
        return self._sample_latents(model, model.initial_noise([u["seed"] for u in units]))

    def _sample_latents(self, model, latents):
        with torch.no_grad():
            out = [model.decode(model.denoise(latents[s:s + self.batch_size], self._null(model, len(
                latents[s:s + self.batch_size])), self.steps, 1.0)).cpu() for s in range(0, len(latents), self.batch_size)]
        return torch.cat(out)

    def search(self, model, units):
        if not units:
            return {"latent": torch.empty(0, *model.sample_shape)}, {}
        reference = self._reference(model)
        targets = _concept_images(reference, [u["prompt"] for u in units], [u["seed"] for u in units],
                                  self.steps, self.guidance, self.batch_size).to(model.device)
        with torch.no_grad():
            inverted = model.invert(targets, self._null(model, len(units)), self.steps)
        latents = inverted.clone().requires_grad_(True)
        optimizer = torch.optim.Adam([latents], lr=self.attack_lr)
        found = inverted.detach().clone()
        live = ~self.detector(quantize(self._sample_latents(model, found)))
        log = {"passed_after_inversion": int((~live).sum()), "losses": []}  # losses[0]: the inverted latents
        for step in range(1, self.attack_steps + 1):
            if not live.any():
                break
            sampled = model.denoise(latents, self._null(model, len(units)), self.steps, 1.0)
            per_unit = ((sampled - targets) ** 2).flatten(1).mean(1)
            loss = per_unit[live.to(per_unit.device)].sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            log["losses"].append(float(per_unit.detach().mean()))
            if step % self.check_every == 0 or step == self.attack_steps:
                current = latents.detach().clone()
                found = torch.where(live[:, None, None, None].to(found.device), current, found)
                live &= ~self.detector(quantize(self._sample_latents(model, found)))
        log["unbroken_units"] = int(live.sum())
        return {"latent": found.cpu()}, log

    def attacked(self, model, units, found):
        return self._sample_latents(model, _check_shape(found, "latent", tuple(model.sample_shape)).to(model.device))
