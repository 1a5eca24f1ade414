"""Image datasets for class-conditional models: `digits`, `cifar10` and `folder:PATH`.

Every loader returns an `ImageDataset`: all images in memory as a float tensor in [-1, 1] with shape
(N, C, H, W), integer labels and the class names. The datasets the field uses for class erasure are
small enough for that (CIFAR-10 train is 600 MB as float32).
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .utils import EraseError, logger

DIGITS_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_MD5 = "c58f30108f718f92721af3b95e74349a"
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def digit_class(digit: int | str) -> int:
    """A digit's class id from '3', 3 or 'three'."""
    text = str(digit).strip().lower()
    if text in DIGITS_NAMES:
        return DIGITS_NAMES.index(text)
    if text.isdigit() and int(text) < 10:
        return int(text)
    raise EraseError(f"unknown digit {digit!r}: give 0-9 or a name ({', '.join(DIGITS_NAMES)})")


@dataclass
class ImageDataset:
    images: torch.Tensor  # float32, (N, C, H, W), values in [-1, 1]
    labels: torch.Tensor  # int64, (N,)
    class_names: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def subset(self, classes: list[int]) -> "ImageDataset":
        keep = torch.isin(self.labels, torch.tensor(classes))
        return ImageDataset(self.images[keep], self.labels[keep], self.class_names, self.name)


def load_dataset(spec: str, split: str = "train", root: str | os.PathLike | None = None,
                 image_size: int | None = None, download: bool = False) -> ImageDataset:
    """Load a dataset by name: `digits`, `cifar10` or `folder:PATH`.

    `split` is `train` or `test`; `root` is where CIFAR-10 lives (default `$ERASE_DATA` or
    `~/.cache/erase`); `image_size` resizes every image (the digits default to 16x16).
    """
    if split not in ("train", "test"):
        raise EraseError(f"split must be 'train' or 'test', got {split!r}")
    if spec == "digits":
        data = load_digits(split)
    elif spec == "cifar10":
        data = load_cifar10(split, root, download=download)
    elif spec.startswith("folder:"):
        data = load_folder(spec[len("folder:"):], image_size=image_size)
    else:
        raise EraseError(f"unknown dataset {spec!r}: use 'digits', 'cifar10' or 'folder:PATH' "
                         "(one subfolder of images per class)")
    if image_size is not None and data.images.shape[-1] != image_size:
        data.images = resize(data.images, image_size)
    return data


def resize(images: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False,
                         antialias=True).clamp(-1, 1)


def load_digits(split: str) -> ImageDataset:
    """scikit-learn's bundled 8x8 handwritten digits (1,797 images), upsampled to 16x16.

    The split is fixed: a stratified 80/20 split with `random_state=0` (1,437 train, 360 test).
    """
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    idx_train, idx_test = train_test_split(np.arange(len(bunch.target)), test_size=0.2,
                                           random_state=0, stratify=bunch.target)
    idx = idx_train if split == "train" else idx_test
    # Pixel values are 0..16; map to [-1, 1].
    images = torch.from_numpy(bunch.images[idx]).float().unsqueeze(1) / 8.0 - 1.0
    images = F.interpolate(images, size=(16, 16), mode="bilinear", align_corners=False).clamp(-1, 1)
    labels = torch.from_numpy(bunch.target[idx]).long()
    return ImageDataset(images, labels, list(DIGITS_NAMES), "digits")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles the CIFAR-10 python archive and nothing else.

    The archive is a pickle of a dict of numpy arrays and lists; any other global (the way a
    malicious pickle runs code) is refused.
    """

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"), ("numpy", "dtype"),
        ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
        ("_codecs", "encode"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a CIFAR-10 batch")


def _read_cifar_batch(raw: bytes, source: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = _CifarUnpickler(io.BytesIO(raw), encoding="bytes").load()
        data = np.asarray(batch[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        labels = np.asarray(batch[b"labels"], dtype=np.int64)
    except Exception as e:  # noqa: BLE001 - any failure means the file is not a CIFAR batch
        raise EraseError(f"{source} is not a CIFAR-10 python batch ({e}); expected the files of "
                         f"cifar-10-python.tar.gz (data_batch_1..5, test_batch)") from None
    if len(data) != len(labels):
        raise EraseError(f"{source}: {len(data)} images but {len(labels)} labels")
    return data, labels


def _cifar_files(root: Path, split: str) -> list[tuple[str, bytes]]:
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    folder = root / "cifar-10-batches-py" if (root / "cifar-10-batches-py").is_dir() else root
    if all((folder / n).is_file() for n in names):
        return [(str(folder / n), (folder / n).read_bytes()) for n in names]
    archive = root / "cifar-10-python.tar.gz" if root.is_dir() else root
    if archive.is_file():
        out = []
        with tarfile.open(archive, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for n in names:
                if n not in members:
                    raise EraseError(f"{archive} has no member {n}: expected cifar-10-python.tar.gz")
                out.append((f"{archive}:{n}", tar.extractfile(members[n]).read()))
        return out
    raise EraseError(
        f"CIFAR-10 not found under {root}: expected cifar-10-python.tar.gz or a folder "
        f"cifar-10-batches-py/ with {', '.join(names)}. On a machine with network pass "
        f"--download, or fetch {CIFAR10_URL} yourself and point --data-root at it.")


def download_cifar10(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    target = root / "cifar-10-python.tar.gz"
    if target.is_file():
        return target
    logger.info("downloading %s", CIFAR10_URL)
    tmp = target.with_suffix(".part")
    try:
        urllib.request.urlretrieve(CIFAR10_URL, tmp)
    except OSError as e:
        raise EraseError(f"could not download CIFAR-10 ({e}); copy cifar-10-python.tar.gz "
                         f"into {root} by hand") from None
    digest = hashlib.md5(tmp.read_bytes()).hexdigest()
    if digest != CIFAR10_MD5:
        tmp.unlink()
        raise EraseError(f"downloaded CIFAR-10 has md5 {digest}, expected {CIFAR10_MD5}")
    tmp.rename(target)
    return target


def load_cifar10(split: str, root: str | os.PathLike | None = None, download: bool = False) -> ImageDataset:
    root = Path(root or os.environ.get("ERASE_DATA", Path.home() / ".cache" / "erase")).expanduser()
    if download:
        download_cifar10(root)
    arrays, labels = zip(*(_read_cifar_batch(raw, src) for src, raw in _cifar_files(root, split)))
    images = torch.from_numpy(np.concatenate(arrays)).float() / 127.5 - 1.0
    return ImageDataset(images, torch.from_numpy(np.concatenate(labels)), list(CIFAR10_NAMES), "cifar10")


def load_folder(path: str, image_size: int | None = None) -> ImageDataset:
    """One subfolder per class, named after the class; classes sorted by name."""
    from PIL import Image

    root = Path(path).expanduser()
    if not root.is_dir():
        raise EraseError(f"dataset folder {root} does not exist (folder:PATH expects one subfolder "
                         "of images per class)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise EraseError(f"{root} has no class subfolders: expected {root}/<class name>/*.png")
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise EraseError(f"class folder {root / name} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        for f in files:
            try:
                img = Image.open(f)
                img.load()
            except OSError as e:
                raise EraseError(f"cannot read image {f}: {e}") from None
            mode = "L" if img.mode in ("L", "1", "I", "I;16") else "RGB"
            t = torch.from_numpy(np.asarray(img.convert(mode), dtype=np.uint8).copy()).float()
            t = t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1)
            images.append(t / 127.5 - 1.0)
            labels.append(label)
    shapes = {tuple(t.shape) for t in images}
    if len(shapes) > 1:
        if image_size is None:
            raise EraseError(f"images under {root} differ in size or channels {sorted(shapes)}: "
                             "pass --image-size to resize them")
        channels = max(s[0] for s in shapes)
        images = [resize(t.expand(channels, -1, -1).unsqueeze(0), image_size)[0] for t in images]
    return ImageDataset(torch.stack(images), torch.tensor(labels), classes, f"folder:{root}")
