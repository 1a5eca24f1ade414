"""`attack-ring-a-bell` (Tsai et al., arXiv 2310.10012): the concept's direction in text-embedding space."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from erase.backbones.base import Condition
from erase.config import field

from .base import _check_shape
from .text import TextAttack


def _vector_key(tensor: str) -> str:
    """Where Ring-A-Bell saves its shift of one condition tensor: the text embedding's under
    `concept_vector`, others (SDXL's and SD3's pooled text) under `concept_vector.<name>`."""
    return "concept_vector" if tensor == "encoder_hidden_states" else f"concept_vector.{tensor}"


@dataclass
class RingABell(TextAttack):
    """Ring-A-Bell's concept vector: no gradient of the model is taken.

    c = mean text embedding of prompts with the concept − mean of prompts without it (default:
    the concept's forget and retain prompts; on the digits these are the same caption templates
    with the other digits); each unit's prompt embedding + `strength`·c is sampled. Ring-A-Bell
    then searches discrete tokens near that embedding; the embedding itself is the stronger attack.
    """

    name: ClassVar[str] = "attack-ring-a-bell"
    budget_fields: ClassVar[tuple[str, ...]] = ("strength", "with_prompts", "without_prompts")

    strength: float = field(1.0, "η in prompt embedding + η·c")
    with_prompts: str | None = field(None, "prompt file with the concept (default: the concept's forget prompts)")
    without_prompts: str | None = field(None, "prompt file without it (default: the concept's retain prompts)")

    def units(self, model):
        return self._prompt_units()

    def plain(self, model, units):
        return self._plain_prompts(model, units)

    def search(self, model, units):
        from erase.concepts import read_prompts

        with_c = read_prompts(self.with_prompts) if self.with_prompts else self.concept.forget
        without = read_prompts(self.without_prompts) if self.without_prompts else self.concept.retain
        present, absent = model.encode_conditions(with_c).tensors, model.encode_conditions(without).tensors
        # Every part of the condition moves: the text embedding, and the pooled text where the model has
        # one (SDXL's micro-conditions are the same for every prompt, so their shift is zero).
        vectors = {_vector_key(name): (present[name].float().mean(0) - absent[name].float().mean(0))[None].cpu()
                   for name in present}
        return vectors, {"with_prompts": len(with_c), "without_prompts": len(without),
                         "vector_norm": float(vectors["concept_vector"].norm())}

    def attacked(self, model, units, found):
        base = model.encode_conditions([u["prompt"] for u in units]).tensors
        shifted = {name: tensor + self.strength * _check_shape(found, _vector_key(name), tuple(tensor.shape[1:]))[0].to(tensor)
                   for name, tensor in base.items()}
        return self._sample_conditions(model, units, Condition(**shifted))
