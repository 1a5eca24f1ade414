"""What the text-to-image attacks share: the concept's prompts and detector, the original model's images
of the concept as targets, and free token embeddings spliced into a prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from erase.backbones.base import Condition
from erase.config import field
from erase.utils import EraseError, derive_seed

from ..protocols.base import _load_classifier
from .base import Attack, ClassifierImageChecks, ClipImageChecks, DigitDetector, NoImageChecks, NudityDetector


def _insert_tokens(model, before: list[str], after: list[str], vectors: torch.Tensor) -> torch.Tensor:
    """Conditions of prompts `before[i] <vectors[i]> after[i]`: k free token embeddings spliced in
    between the tokens of the two texts (N, k, D), then the text encoder; differentiable in `vectors`.

    CLIP's tokenizer splits on spaces first, so "before after" tokenizes as the two texts'
    tokens one after the other, and the vectors go after the start token and `before`'s tokens.
    """
    joined, lengths = model.token_embeddings([f"{b} {a}".strip() for b, a in zip(before, after)])
    _, before_lengths = model.token_embeddings(before)
    length = joined.shape[1]
    rows = []
    for i in range(len(before)):
        at = int(before_lengths[i]) - 1  # after the start token and before's tokens, without before's end token
        rows.append(torch.cat([joined[i, :at], vectors[i].to(joined), joined[i, at:]])[:length])
    return model.encode_token_embeddings(torch.stack(rows))


def _concept_images(model, prompts: list[str], seeds: list[int], steps: int, guidance: float,
                    batch_size: int) -> torch.Tensor:
    """Latents that `model` (the original) draws for the prompts: the attacks' targets."""
    return model.sample(prompts, seeds, steps=steps, guidance=guidance, batch_size=batch_size, return_latents=True)


@dataclass
class TextAttack(Attack):
    """What the text-to-image attacks share: the concept's prompts, its detector, the original model."""

    n: int = field(40, "attack units: prompts (with their seeds) or images")
    steps: int = field(25, "DDIM steps of every image")
    guidance: float | None = field(None, "guidance scale (default: the pipeline's measured sample_defaults)")
    batch_size: int = field(20, "images per UNet call (keep it fixed to reproduce bit for bit)")
    reference_model: str | None = field(None, "the original model, which draws the concept's target images "
                                              "(default: the model attacked, right for an original model)")
    preset: str = field("unlearndiffatk", "NudeNet preset when the concept is nudity")
    reference: str | None = field(None, "folder of real images (e.g. COCO's) against which a concept judged by "
                                        "NudeNet has its images scored: in-distribution share and FID in CLIP's "
                                        "image embeddings (needs --clip-model; a digit is scored in the digits "
                                        "classifier's features without it)")
    clip_model: str | None = field(None, "local CLIP model folder for --reference")

    def __post_init__(self):
        super().__post_init__()
        if (self.reference is None) != (self.clip_model is None):
            raise ValueError("--reference and --clip-model go together: the reference images are compared with "
                             "the attack's images in the CLIP model's image features")

    def prepare(self, model, state):
        from erase.concepts import Vocabulary, load_concept
        from erase.data import DIGITS_NAMES, digit_class

        if model.condition_kind != "text":
            raise EraseError(f"{self.name} attacks text-to-image models; for a class-conditional DDPM use "
                             "attack-class-inversion")
        model.token_embeddings([""])  # a backbone without the text attack hooks says so here, before any work
        self.concept = load_concept(self.forget, vocabulary=Vocabulary.from_info(getattr(model, "info", None)))
        name = self.concept.name.strip().lower()
        if name in DIGITS_NAMES or name.isdigit():
            if self.reference is not None:
                raise EraseError("--reference (a folder of real images) is for a concept NudeNet judges: a digit's "
                                 "images are scored against the real digits in the classifier's features; leave out "
                                 "--reference and --clip-model (the original model is --reference-model)")
            classifier = _load_classifier(self.classifier, state.device)
            self.detector = DigitDetector(classifier, digit_class(name))
            self.image_checks = ClassifierImageChecks(classifier)  # as digits-prompts scores the erased digit's
        elif name == "nudity":
            self.detector = NudityDetector(self.preset)
            self.image_checks = (NoImageChecks("no --reference folder of real images (with --clip-model) was given")
                                 if self.reference is None else ClipImageChecks(self.clip_model, self.reference))
        else:
            raise EraseError(f"no detector for concept {self.concept.name!r}: the attacks judge a digit (with "
                             "--classifier) or nudity (NudeNet)")

    def _reference(self, model):
        from erase.backbones import load_backbone

        return model if self.reference_model is None else load_backbone(self.reference_model).to(model.device)

    def _prompt_units(self) -> list[dict]:
        forget = self.concept.forget
        return [{"prompt": forget[i % len(forget)], "seed": derive_seed(self.seed, i)} for i in range(self.n)]

    def _plain_prompts(self, model, units):
        return model.sample([u["prompt"] for u in units], [u["seed"] for u in units], steps=self.steps,
                            guidance=self.guidance, batch_size=self.batch_size)

    def _sample_conditions(self, model, units, conditions: Condition) -> torch.Tensor:
        """Images of the units' seeds under given conditions, in batches of `batch_size` (last one padded)."""
        out = []
        with torch.no_grad():
            for start in range(0, len(units), self.batch_size):
                chunk = units[start:start + self.batch_size]
                cond = conditions[start:start + self.batch_size]
                pad = self.batch_size - len(chunk)
                seeds = [u["seed"] for u in chunk] + [chunk[-1]["seed"]] * pad
                cond = Condition.cat([cond] + [cond[-1]] * pad)
                latents = model.denoise(model.initial_noise(seeds), cond, self.steps, self.guidance)
                out.append(model.decode(latents)[:len(chunk)].cpu())
        return torch.cat(out)

    def _noised(self, model, latents: torch.Tensor, g: torch.Generator):
        noise = torch.randn(latents.shape, generator=g)
        t = model.draw_timesteps(len(latents), g)
        return (model.add_noise(latents, noise, t).to(model.device), t.to(model.device),
                model.training_target(latents, noise, t).to(model.device))
