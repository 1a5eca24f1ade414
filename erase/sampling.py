"""Saving class-conditional samples as PNG files with a grid and an index of what made each."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from .outputs import mark_output
from .utils import atomic_dir, derive_seed, write_json


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """(N, C, H, W) in [-1, 1] -> (N, H, W, C) uint8."""
    x = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy()


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def make_grid(images: torch.Tensor, rows: int, pad: int = 2, scale: int = 1) -> Image.Image:
    """Images in row-major order on a dark background, each upscaled `scale` times (nearest)."""
    arr = to_uint8(images)
    n, h, w, c = arr.shape
    cols = max(1, -(-n // rows))
    grid = np.zeros((rows * (h + pad) + pad, cols * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + col * (w + pad): pad + col * (w + pad) + w] = arr[i]
    img = to_pil(grid)
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def class_seeds(seed: int, class_id: int, n: int) -> list[int]:
    """Seeds of images 0..n-1 of a class: independent of which other classes are requested."""
    return [derive_seed(seed, class_id, i) for i in range(n)]


def save_class_samples(model, classes: Sequence[int | str], n: int, out: str | Path, steps: int = 50,
                       guidance: float = 3.0, eta: float = 0.0, seed: int = 0, batch_size: int = 64) -> Path:
    """Sample `n` images per class and write OUT/<class id>/<i>.png, OUT/grid.png and OUT/index.json."""
    ids = [model.class_index(c) for c in classes]
    labels = [c for c in ids for _ in range(n)]
    seeds = [s for c in ids for s in class_seeds(seed, c, n)]
    images = model.sample(labels, seeds, steps=steps, guidance=guidance, eta=eta,
                          batch_size=batch_size, progress=True)
    arr = to_uint8(images)
    with atomic_dir(out) as tmp:
        index = []
        for k, (c, s) in enumerate(zip(labels, seeds)):
            rel = f"{c}/{k % n:05d}.png"
            (tmp / str(c)).mkdir(exist_ok=True)
            to_pil(arr[k]).save(tmp / rel)
            index.append({"file": rel, "class": c, "class_name": model.class_names[c], "seed": s})
        make_grid(images, rows=len(ids), scale=2).save(tmp / "grid.png")
        write_json(tmp / "index.json", {"steps": steps, "guidance": guidance, "eta": eta, "seed": seed,
                                        "batch_size": batch_size, "images": index})
        mark_output(tmp, "sample")
    return Path(out)
