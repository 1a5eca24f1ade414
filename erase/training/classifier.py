"""`erase train-classifier`: train the small classifier (`erase.classifier.SmallClassifier`) that the
evaluation uses for unlearning accuracy and the feature FID."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..classifier import ClassifierArch, SmallClassifier
from ..config import config_dict, field
from ..data import load_dataset
from ..utils import logger, package_versions, step_generator
from .command import add_training_command


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


# -- command line ---------------------------------------------------------------------------------
def add_commands(subparsers) -> None:
    add_training_command(subparsers, "train-classifier", TrainClassifierConfig,
                         run=lambda c, a: train_classifier(c, a.out), out_help="classifier folder to write")
