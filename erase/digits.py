"""What the evaluation and the trainers share about the digits: captions, class words, the classifier's input.

The miniature text-to-image models (`erase.training.mini_sd`, `erase.training.mini_flow`) are trained on these
captions and evaluated with the held-out ones; `erase.eval` reads them here, so that the evaluation
imports no trainer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import DIGITS_NAMES, digit_class  # noqa: F401 - the class words, shared with the datasets

# Captions. `{w}` is the digit's name ("three"), `{d}` its numeral ("3"). The held-out templates use
# only words seen in training, in combinations never seen: they test paraphrase generalisation.
TRAIN_TEMPLATES = (
    "a handwritten digit {w}",
    "the number {d}",
    "a drawing of a {d}",
    "the number {w}",
    "a picture of the digit {w}",
    "an image of a handwritten {d}",
    "{w}",
    "{d}",
)
HELDOUT_TEMPLATES = (
    "a drawing of the number {w}",
    "a picture of a handwritten {w}",
    "the handwritten digit {d}",
)


def captions(label: int, templates=TRAIN_TEMPLATES) -> list[str]:
    return [t.format(w=DIGITS_NAMES[label], d=label) for t in templates]


def digits_classifier_input(images: torch.Tensor, classifier) -> torch.Tensor:
    """RGB images in [-1, 1] as the 1-channel digits classifier takes them (channel mean, its size)."""
    grey = images.mean(dim=1, keepdim=True)
    size = classifier.arch.image_size
    if grey.shape[-1] != size:
        grey = F.interpolate(grey, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return grey.clamp(-1, 1)


def classify_digits(images: torch.Tensor, classifier) -> torch.Tensor:
    """Class ids of RGB images in [-1, 1] by the digits classifier."""
    with torch.no_grad():
        return classifier(digits_classifier_input(images, classifier)).argmax(1)


def default_classifier_path():
    """The shipped digits classifier's folder (from the checkout or the installed wheel)."""
    from .resources import shipped_model

    return shipped_model("digits-classifier")
