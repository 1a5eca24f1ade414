"""Dataset loaders: digits, the CIFAR-10 reader (on archives the tests write), folders, bad input."""

import pickle
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from erase.data import load_dataset
from erase.utils import EraseError


def test_digits_split_is_fixed_and_scaled():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert train.images.shape == (1437, 1, 16, 16) and test.images.shape == (360, 1, 16, 16)
    assert len(train) + len(test) == 1797
    assert train.images.min() >= -1 and train.images.max() <= 1
    assert torch.bincount(test.labels).tolist() == [36, 36, 35, 37, 36, 37, 36, 36, 35, 36]
    assert torch.equal(load_dataset("digits", "test").images, test.images)
    assert train.class_names[3] == "three"


def cifar_batch(n: int, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             b"labels": [int(x) for x in rng.integers(0, 10, n)]}
    return pickle.dumps(batch)


def write_cifar_folder(root, n=4):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for i in range(1, 6):
        (folder / f"data_batch_{i}").write_bytes(cifar_batch(n, i))
    (folder / "test_batch").write_bytes(cifar_batch(n, 0))
    return folder


def test_cifar_reader_on_folder_and_archive(tmp_path):
    folder = write_cifar_folder(tmp_path / "a")
    train = load_dataset("cifar10", "train", root=tmp_path / "a")
    assert train.images.shape == (20, 3, 32, 32) and len(train.labels) == 20
    first = pickle.loads(cifar_batch(4, 1))
    expected = torch.from_numpy(first[b"data"].reshape(-1, 3, 32, 32)).float() / 127.5 - 1
    assert torch.equal(train.images[:4], expected)
    assert train.labels[:4].tolist() == first[b"labels"]

    with tarfile.open(tmp_path / "cifar-10-python.tar.gz", "w:gz") as tar:
        tar.add(folder, arcname="cifar-10-batches-py")
    test = load_dataset("cifar10", "test", root=tmp_path)
    assert test.images.shape == (4, 3, 32, 32) and test.class_names[0] == "airplane"


def test_cifar_reader_refuses_code_in_a_pickle(tmp_path):
    folder = write_cifar_folder(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil(), b"labels": []}))
    with pytest.raises(EraseError, match="not a CIFAR-10 python batch.*refusing to load builtins.print"):
        load_dataset("cifar10", "test", root=tmp_path)


def test_missing_cifar_says_what_was_expected(tmp_path):
    with pytest.raises(EraseError, match="CIFAR-10 not found.*cifar-10-python.tar.gz.*--download"):
        load_dataset("cifar10", "train", root=tmp_path)


def save_png(path, value, size=6, mode="L"):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size) if mode == "L" else (size, size, 3), value, dtype=np.uint8)
    Image.fromarray(arr).save(path)


def test_folder_dataset(tmp_path):
    save_png(tmp_path / "cat" / "a.png", 0)
    save_png(tmp_path / "cat" / "b.png", 255)
    save_png(tmp_path / "dog" / "a.png", 128)
    data = load_dataset(f"folder:{tmp_path}")
    assert data.class_names == ["cat", "dog"] and data.labels.tolist() == [0, 0, 1]
    assert data.images.shape == (3, 1, 6, 6)
    assert data.images[0].max() == -1 and data.images[1].min() == 1
    assert load_dataset(f"folder:{tmp_path}", image_size=4).images.shape == (3, 1, 4, 4)


def test_folder_dataset_errors(tmp_path):
    with pytest.raises(EraseError, match="does not exist"):
        load_dataset(f"folder:{tmp_path / 'nope'}")
    with pytest.raises(EraseError, match="no class subfolders"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EraseError, match="holds no images"):
        load_dataset(f"folder:{tmp_path}")
    save_png(tmp_path / "empty" / "a.png", 3, size=6)
    save_png(tmp_path / "other" / "a.png", 3, size=8)
    with pytest.raises(EraseError, match="differ in size.*--image-size"):
        load_dataset(f"folder:{tmp_path}")
    (tmp_path / "other" / "b.png").write_bytes(b"not an image")
    with pytest.raises(EraseError, match="cannot read image"):
        load_dataset(f"folder:{tmp_path}", image_size=6)


def test_unknown_dataset():
    with pytest.raises(EraseError, match="unknown dataset 'mnist'.*folder:PATH"):
        load_dataset("mnist")
