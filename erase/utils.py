"""Small shared helpers: errors, logging, atomic writes, seeds and the versions written next to results."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch

logger = logging.getLogger("erase")


class EraseError(Exception):
    """An error caused by the user's input. The CLI prints its message without a traceback."""


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )


@contextlib.contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """Yield a temporary folder beside `path`; on success it replaces `path` in one rename.

    An interrupted write leaves the old folder (or nothing) in place, never half a folder.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_dir(tmp, path)


def replace_dir(finished: Path, path: Path) -> None:
    """Put the folder `finished` at `path`, replacing what is there with renames only."""
    old = path.with_name(f".{path.name}.old")
    if path.exists():
        shutil.rmtree(old, ignore_errors=True)
        path.rename(old)
    finished.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise EraseError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise EraseError(f"{what} {path} is not valid JSON: {e}") from None


def derive_seed(seed: int, *indices: int) -> int:
    """A 63-bit seed determined by (seed, *indices) alone, e.g. (run seed, class, image index)."""
    mixed = seed & 0xFFFFFFFFFFFFFFFF
    for i in indices:
        # splitmix64 steps keep nearby (seed, index) pairs far apart.
        mixed = (mixed + 0x9E3779B97F4A7C15 * (i + 1)) & 0xFFFFFFFFFFFFFFFF
        mixed = ((mixed ^ (mixed >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        mixed = ((mixed ^ (mixed >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        mixed ^= mixed >> 31
    return mixed & 0x7FFFFFFFFFFFFFFF


def step_generator(seed: int, *indices: int) -> torch.Generator:
    """A CPU generator determined by (seed, *indices) alone.

    Every random draw of a training step or of one image comes from such a generator, so a run
    resumed at step k, an image generated alone or in a batch, or on another process, sees the
    same numbers.
    """
    return torch.Generator().manual_seed(derive_seed(seed, *indices))


def package_versions() -> dict[str, str]:
    """Versions of the packages that decide a result, written next to every output."""
    import importlib.metadata as md
    import platform

    versions = {"python": platform.python_version()}
    for name in ("erase", "torch", "diffusers", "transformers", "accelerate", "torchmetrics",
                 "torch-fidelity", "nudenet", "safetensors", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def resolve_device(device: str | None = None) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_mixed_precision(mode: str) -> str:
    """'auto' becomes bf16 on a GPU that supports it, else 'no' (fp32); other modes pass through."""
    if mode != "auto":
        return mode
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory measurement: torch's GPU counter, or Linux's peak RSS of this process."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # writing 5 to clear_refs resets VmHWM (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass  # then the peak is the process's lifetime peak


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch since the last reset, or on the CPU the process's peak
    resident memory (since the last reset where Linux allows it)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB

