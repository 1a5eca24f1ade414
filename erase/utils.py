"""Small shared helpers: errors, logging, atomic writes, seeds and the versions written next to results."""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
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


def progress_off() -> bool:
    """TQDM_DISABLE=1 (tqdm's own switch) turns every progress bar off, also those given `disable=`."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() in ("1", "true", "yes", "on")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


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


def apply_umask(folder: Path) -> None:
    """Give `folder` and everything in it the modes the user's umask gives new files (0644/0755 for 022).

    Temporary folders are made 0700 and safetensors writes 0600 files; a model or report on a
    shared server must be readable by the people the umask lets read it.
    """
    mask = _umask()
    folder.chmod(0o777 & ~mask)
    for root, dirs, files in os.walk(folder):
        for name in dirs:
            os.chmod(os.path.join(root, name), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)


def replace_dir(finished: Path, path: Path) -> None:
    """Put the folder `finished` at `path`, replacing what is there (a folder or a file) with renames only."""
    apply_umask(finished)
    old = None
    if path.exists() or path.is_symlink():
        old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent)) / path.name
        path.rename(old)
    finished.rename(path)
    if old is not None:
        shutil.rmtree(old.parent, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600 files
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def non_finite_paths(data: Any, where: str = "") -> list[str]:
    """Paths (`metrics.fid`, `losses[3]`) of the NaN or infinite floats inside `data`."""
    if isinstance(data, float):
        return [] if math.isfinite(data) else [where or "value"]
    if isinstance(data, dict):
        return [p for k, v in data.items() for p in non_finite_paths(v, f"{where}.{k}" if where else str(k))]
    if isinstance(data, (list, tuple)):
        return [p for i, v in enumerate(data) for p in non_finite_paths(v, f"{where}[{i}]")]
    return []


def write_json(path: str | Path, data: Any) -> None:
    """Strict JSON: a NaN or infinity is refused (a figure that does not exist is written as null with a reason)."""
    if bad := non_finite_paths(data):
        raise EraseError(f"refusing to write {Path(path).name}: {', '.join(bad[:5])} "
                         f"{'is' if len(bad) == 1 else 'are'} not a finite number (the run produced NaN or "
                         "infinity; rerun with -v to see where)")
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")


def read_text(path: str | Path, what: str = "file") -> str:
    """A UTF-8 text file's contents; any other encoding is refused with one line."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise EraseError(f"{what} {path} is not UTF-8 text (byte {e.start}): save it as UTF-8") from None
    except OSError as e:
        raise EraseError(f"cannot read {what} {path}: {e.strerror}") from None


def read_json(path: str | Path, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise EraseError(f"{what} not found: {path}")
    try:
        return json.loads(read_text(path, what))
    except json.JSONDecodeError as e:
        raise EraseError(f"{what} {path} is not valid JSON: {e}") from None


def safe_name(text: str, max_length: int = 40) -> str:
    """A file or folder name made from free text (a prompt): letters, digits, - and _ only, shortened."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:max_length].strip("-")
    return name or "unnamed"


# Images x denoising steps above which a command says how large the request is before it starts.
COSTLY_PASSES = 200_000


def warn_if_costly(command: str, images: int, steps: int) -> None:
    """Say up front that a request will take long (the progress bar then shows the time left)."""
    if images * steps > COSTLY_PASSES:
        logger.warning("erase %s: %s images x %d steps = %s denoising passes: a large request; the progress "
                       "bar shows the time left, Ctrl-C stops it",
                       command, f"{images:,}", steps, f"{images * steps:,}")


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

    from . import __version__

    # This package's version from the code itself: an editable install's metadata keeps the version
    # it was installed at (results measured with 0.2.0's code once recorded 0.1.0 that way).
    versions = {"python": platform.python_version(), "erase": __version__}
    for name in ("torch", "diffusers", "transformers", "accelerate", "torchmetrics",
                 "torch-fidelity", "nudenet", "safetensors", "numpy"):
        try:
            versions[name] = md.version(name)
        except md.PackageNotFoundError:
            pass
    return versions


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor (a step's random draws) on `device` without making the host wait for the GPU.

    A plain copy to a GPU waits until everything queued before it has run (torch synchronises the
    stream after copying from pageable memory), which would stall the loop once per draw; from pinned
    memory the copy is queued like a kernel. Values are the same either way.
    """
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def resolve_device(device: str | None = None) -> torch.device:
    """`device` as a torch.device, refused when this machine does not have it; default cuda if present."""
    if not device:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise EraseError(f"--device {device!r} is not a device name: use cpu, cuda or cuda:N") from None
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise EraseError(f"--device {device}: this machine has no CUDA GPU (use --device cpu)")
        if resolved.index is not None and resolved.index >= count:
            raise EraseError(f"--device {device}: this machine has {count} CUDA GPU(s), cuda:0 to cuda:{count - 1}")
    elif resolved.type not in ("cpu", "mps") or (resolved.type == "mps" and not torch.backends.mps.is_available()):
        raise EraseError(f"--device {device} is not available here: use cpu or cuda")
    return resolved


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

