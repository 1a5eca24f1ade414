"""`attack-class-inversion`: a condition vector learned for the erased class of a class-conditional DDPM."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from erase.config import field
from erase.sampling import class_seeds
from erase.utils import EraseError

from ..protocols.base import _load_classifier
from .base import Attack, ClassifierImageChecks, DigitDetector, _check_shape, _invert


@dataclass
class ClassInversion(Attack):
    """Class-embedding inversion: the UNet frozen, a condition vector learned from real images of the class.

    The vector replaces the class's embedding while sampling; the detector is the classifier.
    `restarts` learns from several starts and keeps the one with the lowest denoising loss on a
    fixed batch (the detector is not consulted while searching).
    """

    name: ClassVar[str] = "attack-class-inversion"
    budget_fields: ClassVar[tuple[str, ...]] = ("attack_steps", "attack_batch", "restarts", "train_images")

    n: int = field(100, "images sampled plainly and with the learned vector")
    steps: int = field(50, "DDIM steps")
    guidance: float | None = field(None, "guidance scale (default: the model's measured sample_defaults)")
    batch_size: int = field(64, "images per UNet call (keep it fixed to reproduce bit for bit)")
    dataset: str = field("digits", "real images of the class: digits, cifar10 or folder:PATH")
    data_root: str | None = field(None, "where cifar10 is stored")
    train_images: int | None = field(None, "use the first K training images of the class (default: all)")
    attack_steps: int = field(200, "Adam steps of the inversion")
    attack_batch: int = field(32, "images per step")
    attack_lr: float = field(0.05, "Adam learning rate (embedding rows have norm ~1)")
    restarts: int = field(1, "independent starts; the one with the lowest denoising loss on a fixed batch is kept")
    init: str = field("null", "start from the null class's embedding, or the (erased) class's own",
                      choices=("null", "class"))

    def prepare(self, model, state):
        if model.condition_kind != "class":
            raise EraseError(f"{self.name} attacks class-conditional models; for a text-to-image model use "
                             "attack-concept-inversion, attack-prefix, attack-ring-a-bell or attack-null-latent")
        self.target = model.class_index(self.forget)
        classifier = _load_classifier(self.classifier, state.device)
        classifier.check_fits(model.image_shape)  # before any image is drawn
        self.detector = DigitDetector(classifier, self.target)
        # the images against the class's real data, as digits-class scores the erased class's
        self.image_checks = ClassifierImageChecks(classifier, self.dataset, self.data_root)

    def units(self, model):
        return [{"class": self.target, "seed": s} for s in class_seeds(self.seed, self.target, self.n)]

    def _sample(self, model, units):
        return model.sample([u["class"] for u in units], [u["seed"] for u in units], steps=self.steps,
                            guidance=self.guidance, batch_size=self.batch_size)

    def plain(self, model, units):
        return self._sample(model, units)

    def _denoising_loss(self, model, vector, x0, g):
        noise = torch.randn(x0.shape, generator=g)
        t = model.draw_timesteps(len(x0), g)
        x_t = model.add_noise(x0, noise, t).to(model.device)
        target = model.training_target(x0, noise, t).to(model.device)
        with model.override_condition(self.target, vector):
            prediction = model.predict(x_t, t.to(model.device), model.encode_conditions([self.target] * len(x0)))
        return torch.nn.functional.mse_loss(prediction, target)

    def search(self, model, units):
        from erase.data import load_dataset

        data = load_dataset(self.dataset, "train", root=self.data_root, image_size=model.image_shape[-1])
        images = data.subset([self.target]).images[:self.train_images]
        if len(images) == 0:
            raise EraseError(f"{self.dataset} has no training images of class {self.target}")
        start = model.condition_vector(model.null_class if self.init == "null" else self.target)
        vector, log = _invert(self, start, images, lambda v, x0, g: self._denoising_loss(model, v, x0, g))
        log["budget"] = {"train_images": len(images)}
        return {"condition": vector[None]}, log

    def attacked(self, model, units, found):
        vector = _check_shape(found, "condition", tuple(model.condition_vector(self.target).shape))[0]
        with model.override_condition(self.target, vector.to(model.device)):
            return self._sample(model, units)
