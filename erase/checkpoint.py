"""Training checkpoints without pickle: tensors in safetensors, everything else in JSON.

A checkpoint is a folder `step-NNNNNNN/` with one safetensors file per state (model, EMA, optimizer,
or whatever a loop needs) and `state.json`. It is written to a temporary folder and renamed, so a
run killed while saving leaves the previous checkpoint intact. Randomness in the loops is derived
from (seed, step), so no RNG state needs saving for an exact resume.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .utils import EraseError, atomic_dir, logger, read_json, write_json


def flatten_optimizer_state(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """Split `optimizer.state_dict()` into tensors (for safetensors) and plain JSON."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def restore_optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                            meta: dict) -> None:
    state: dict[int, dict[str, Any]] = {}
    for key, value in list(tensors.items()) + list(meta["scalars"].items()):
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(folder: str | Path, step: int, tensors: dict[str, dict[str, torch.Tensor]],
                    state: dict, keep: int = 2) -> Path:
    """Write `folder/step-<step>/` atomically and keep only the newest `keep` checkpoints."""
    folder = Path(folder)
    target = folder / f"step-{step:07d}"
    with atomic_dir(target) as tmp:
        for name, group in tensors.items():
            save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, tmp / f"{name}.safetensors")
        write_json(tmp / "state.json", {"step": step, **state})
    for old in sorted(folder.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def latest_checkpoint(folder: str | Path) -> Path | None:
    folder = Path(folder)
    done = [p for p in sorted(folder.glob("step-*")) if (p / "state.json").is_file()]
    return done[-1] if done else None


def load_checkpoint(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    path = Path(path)
    state = read_json(path / "state.json", what="checkpoint state")
    tensors = {p.stem: load_file(p) for p in path.glob("*.safetensors")}
    return tensors, state


def load_latest_checkpoint(folder: str | Path) -> tuple[Path, dict[str, dict[str, torch.Tensor]], dict] | None:
    """The newest checkpoint of `folder` that reads back whole, as (path, tensors, state); None if none does.

    A checkpoint damaged after it was written (a truncated file, a disk error) is skipped with a
    warning for the one before it, which `save_checkpoint` keeps for that reason.
    """
    for path in reversed(sorted(p for p in Path(folder).glob("step-*") if (p / "state.json").is_file())):
        try:
            tensors, state = load_checkpoint(path)
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type; any failure means unreadable
            logger.warning("skipping unreadable checkpoint %s (%s: %s)", path, type(e).__name__, e)
            continue
        return path, tensors, state
    return None


def check_same_config(saved: dict, current: dict, what: str) -> None:
    """Refuse to resume a run whose settings differ from the ones it was started with."""
    diff = {k: (saved.get(k), v) for k, v in current.items() if saved.get(k) != v}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise EraseError(f"cannot resume {what}: settings differ from the checkpoint ({lines}). "
                         "Use the original settings, or start over with --no-resume.")
