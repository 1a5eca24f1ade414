"""The small image classifier used by the evaluation (unlearning accuracy, feature FID).

A plain CNN (three conv stages, global pooling, linear head), saved as safetensors + JSON. Its
pooled features (before the head) are the feature space of the "feature FID" on small benchmarks.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from .config import config_dict, field
from .data import load_dataset
from .outputs import mark_output
from .utils import EraseError, atomic_dir, logger, package_versions, read_json, step_generator, write_json

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

    def _check(self, x: torch.Tensor) -> None:
        expected = (self.arch.in_channels, self.arch.image_size, self.arch.image_size)
        if tuple(x.shape[1:]) != expected:
            raise EraseError(f"classifier expects images of shape {expected}, got {tuple(x.shape[1:])}")

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


@dataclass
class TrainClassifierConfig:
    dataset: str = field("digits", "dataset: digits, cifar10 or folder:PATH")
    data_root: str | None = field(None, "where cifar10 is stored")
    download: bool = field(False, "download cifar10 into data_root if it is not there (needs network)")
    image_size: int | None = field(None, "resize images to this size (must match the generator's)")
    width: int = field(32, "channels of the first stage (then 2x, 4x)")
    epochs: int = field(30, "passes over the training set")
    batch_size: int = field(128, "images per step")
    lr: float = field(2e-3, "AdamW learning rate (cosine decay)")
    shift: int = field(1, "random translation augmentation in pixels")
    seed: int = field(0, "seed of weights and batches")

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.width < 1:
            raise ValueError("epochs, batch_size and width must be at least 1")


def random_shift(x: torch.Tensor, pixels: int, g: torch.Generator) -> torch.Tensor:
    if pixels == 0:
        return x
    padded = F.pad(x, (pixels,) * 4, value=-1.0)
    dx, dy = torch.randint(0, 2 * pixels + 1, (2,), generator=g).tolist()
    return padded[..., dy:dy + x.shape[-2], dx:dx + x.shape[-1]]


@torch.no_grad()
def accuracy(model: SmallClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 512) -> float:
    model.eval()
    preds = torch.cat([model(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])
    return (preds == labels).float().mean().item()


def train_classifier(config: TrainClassifierConfig, out: str | Path) -> SmallClassifier:
    """Train on the dataset's train split, report accuracy on its test split, save to `out`."""
    train = load_dataset(config.dataset, "train", root=config.data_root, image_size=config.image_size,
                         download=config.download)
    test = load_dataset(config.dataset, "test", root=config.data_root, image_size=config.image_size)
    torch.manual_seed(config.seed)
    arch = ClassifierArch(train.images.shape[1], train.images.shape[-1], train.num_classes, config.width)
    model = SmallClassifier(arch, train.class_names)
    steps_per_epoch = -(-len(train) // config.batch_size)
    total = config.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total)
    start = time.perf_counter()
    for epoch in range(config.epochs):
        model.train()
        g = step_generator(config.seed, epoch)
        order = torch.randperm(len(train), generator=g)
        for i in range(0, len(order), config.batch_size):
            idx = order[i:i + config.batch_size]
            x = random_shift(train.images[idx], config.shift, g)
            loss = F.cross_entropy(model(x), train.labels[idx])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        if (epoch + 1) % 10 == 0 or epoch + 1 == config.epochs:
            logger.info("epoch %d: loss %.4f, test accuracy %.4f", epoch + 1, loss.item(),
                        accuracy(model, test.images, test.labels))
    test_acc = accuracy(model, test.images, test.labels)
    model.save_pretrained(out, training={"config": config_dict(config), "test_accuracy": test_acc,
                                         "test_images": len(test), "wall_time_s": round(time.perf_counter() - start, 1),
                                         "versions": package_versions()})
    logger.info("saved %s (test accuracy %.4f)", out, test_acc)
    return model
