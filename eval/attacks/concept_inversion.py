"""`attack-concept-inversion` (Pham et al., arXiv 2308.01508): textual inversion of the erased concept."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from erase.config import field
from erase.utils import derive_seed

from .base import TARGET_STREAM, _check_shape, _invert
from .text import TextAttack, _concept_images, _insert_tokens


@dataclass
class ConceptInversion(TextAttack):
    """Concept inversion (Pham et al.): textual inversion of the concept from the original model's images.

    One new token embedding S* is learned with the denoising loss of the attacked model on
    `train_images` images that the original model drew from the concept's prompts, each step in
    one of `templates`; then every unit prompts the attacked model with a template holding S*.
    """

    name: ClassVar[str] = "attack-concept-inversion"
    budget_fields: ClassVar[tuple[str, ...]] = ("attack_steps", "attack_batch", "tokens", "train_images", "restarts")

    templates: tuple[str, ...] = field(("{}", "a picture of {}", "a drawing of a {}", "a photo of {}"),
                                       "prompts holding the learned token at {}")
    train_images: int = field(32, "images of the concept drawn by the original model (seeds apart from the units')")
    tokens: int = field(1, "learned token embeddings (Pham et al.: 1)")
    attack_steps: int = field(300, "Adam steps")
    attack_batch: int = field(16, "images per step")
    attack_lr: float = field(0.02, "Adam learning rate")
    restarts: int = field(1, "independent starts; the one with the lowest denoising loss on a fixed batch is kept")
    init_word: str = field("a", "the token whose embedding S* starts from")

    def __post_init__(self):
        super().__post_init__()
        if not self.templates or any("{}" not in t for t in self.templates):
            raise ValueError("every template needs a {} where the learned token goes")

    def units(self, model):
        forget = self.concept.forget
        return [{"template": self.templates[i % len(self.templates)], "prompt": forget[i % len(forget)],
                 "seed": derive_seed(self.seed, i)} for i in range(self.n)]

    def plain(self, model, units):
        return self._plain_prompts(model, units)

    def _conditions(self, model, templates: list[str], vector: torch.Tensor) -> torch.Tensor:
        parts = [t.split("{}", 1) for t in templates]
        return _insert_tokens(model, [b.strip() for b, _ in parts], [a.strip() for _, a in parts],
                              vector.expand(len(templates), *vector.shape))

    def _loss(self, model, vector, latents, g):
        x_t, t, target = self._noised(model, latents, g)
        picks = torch.randint(len(self.templates), (len(latents),), generator=g).tolist()
        cond = self._conditions(model, [self.templates[p] for p in picks], vector)
        return torch.nn.functional.mse_loss(model.predict(x_t, t, cond), target)

    def search(self, model, units):
        reference = self._reference(model)
        forget = self.concept.forget
        prompts = [forget[j % len(forget)] for j in range(self.train_images)]
        targets = _concept_images(reference, prompts, [derive_seed(self.seed, TARGET_STREAM, j)
                                                       for j in range(self.train_images)],
                                  self.steps, self.guidance, self.batch_size)
        start = model.token_embeddings([self.init_word])[0][0, 1].expand(self.tokens, -1)
        vector, log = _invert(self, start, targets, lambda v, x0, g: self._loss(model, v, x0, g))
        return {"token": vector[None]}, log

    def attacked(self, model, units, found):
        width = model.token_embeddings([""])[0].shape[-1]
        vector = _check_shape(found, "token", (width,))[0]
        with torch.no_grad():
            cond = self._conditions(model, [u["template"] for u in units], vector.to(model.device))
        return self._sample_conditions(model, units, cond)
