"""The small image classifier used by the evaluation (unlearning accuracy, feature FID).

A plain CNN (three conv stages, global pooling, linear head), saved as safetensors + JSON. Its
pooled features (before the head) are the feature space of the "feature FID" on small benchmarks.
This module is the model and its loading, which the evaluation imports; `erase train-classifier`
(`erase.training.classifier`) trains it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors.torch import load_file, save_file

from .outputs import mark_output
from .utils import EraseError, atomic_dir, read_json, write_json

CONFIG_FILE = "classifier.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class ClassifierArch:
    in_channels: int
    image_size: int
    num_classes: int
    width: int = 32


class SmallClassifier(nn.Module):
    """Conv(w) -> Conv(2w) -> Conv(4w), each with BatchNorm, ReLU and 2x downsampling."""

    def __init__(self, arch: ClassifierArch, class_names: list[str]):
        super().__init__()
        if len(class_names) != arch.num_classes:
            raise EraseError(f"{len(class_names)} class names for {arch.num_classes} classes")
        self.arch = arch
        self.class_names = list(class_names)
        w = arch.width
        layers, c_in = [], arch.in_channels
        for c_out in (w, 2 * w, 4 * w):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(),
                       nn.Conv2d(c_out, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
            c_in = c_out
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(c_in, arch.num_classes)

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.arch.in_channels, self.arch.image_size, self.arch.image_size)

    def check_fits(self, shape: tuple[int, ...]) -> None:
        """Refuses images of another (channels, height, width) than the classifier was trained on."""
        if tuple(shape) != self.input_shape:
            raise EraseError(f"classifier expects images of shape {self.input_shape}, got {tuple(shape)}")

    def _check(self, x: torch.Tensor) -> None:
        self.check_fits(x.shape[1:])

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled penultimate features; x in [-1, 1]."""
        self._check(x)
        return self.body(x).mean(dim=(2, 3))

    def stage_features(self, x: torch.Tensor) -> torch.Tensor:
        """Every stage's channel means, concatenated (w + 2w + 4w; the last block is `features`); x in [-1, 1].

        The in-distribution score measures distances here rather than in `features` alone: the last
        stage keeps what tells digits apart, and there a blank image sits beside a "one" (the shipped
        classifier calls a blank square "one" at p = 0.999); the earlier stages see strokes and ink."""
        self._check(x)
        pooled = []
        for layer in self.body:
            x = layer(x)
            if isinstance(layer, nn.MaxPool2d):
                pooled.append(x.mean(dim=(2, 3)))
        return torch.cat(pooled, dim=1)

    @property
    def stage_dims(self) -> tuple[int, ...]:
        """The sizes of the blocks of `stage_features`."""
        return tuple(m.out_channels for m in self.body if isinstance(m, nn.Conv2d))[1::2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def save_pretrained(self, path: str | Path, **info) -> None:
        with atomic_dir(path) as tmp:
            save_file({k: v.contiguous() for k, v in self.state_dict().items()}, tmp / WEIGHTS_FILE)
            write_json(tmp / CONFIG_FILE, {"arch": asdict(self.arch), "class_names": self.class_names, **info})
            mark_output(tmp, "train-classifier")

    @classmethod
    def from_pretrained(cls, path: str | Path) -> "SmallClassifier":
        path = Path(path)
        meta = read_json(path / CONFIG_FILE, what="classifier config")
        if not (path / WEIGHTS_FILE).is_file():
            raise EraseError(f"{path} has no {WEIGHTS_FILE}: not a classifier folder")
        try:
            model = cls(ClassifierArch(**meta["arch"]), meta["class_names"])
        except (KeyError, TypeError, ValueError) as e:
            raise EraseError(f"{path / CONFIG_FILE} does not describe a classifier ({type(e).__name__}: {e})") from None
        try:
            weights = load_file(path / WEIGHTS_FILE)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            raise EraseError(f"{path / WEIGHTS_FILE} cannot be read ({e}): the file is damaged or truncated; "
                             "copy or train it again") from None
        try:
            model.load_state_dict(weights)
        except RuntimeError as e:
            raise EraseError(f"{path}: weights do not match the architecture in {CONFIG_FILE} ({e})") from None
        model.info = meta
        return model.eval()
