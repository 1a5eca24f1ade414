"""Checkpoints of a stage and exact resume: weights, optimizer, method state, weight average, progress.

A checkpoint holds everything a step depends on besides (seed, step), from which every draw is
derived (the robustness term's perturbation and its optimizer included), so a resumed stage is
bit-identical to an uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..checkpoint import (check_same_config, flatten_optimizer_state, load_latest_checkpoint, restore_optimizer_state,
                          save_checkpoint)
from ..utils import logger
from .running import Progress, Training


def save_state(ckpt_dir: Path, step: int, t: Training, progress: Progress, run: dict) -> Path:
    opt_tensors, opt_meta = flatten_optimizer_state(t.optimizer)
    m_tensors, m_meta = t.algo.state_dict()
    tensors = {"params": t.params, "optimizer": opt_tensors}
    if m_tensors:
        tensors["method"] = m_tensors
    meta = {"run": run, "optimizer": opt_meta, "method": m_meta, "elapsed_s": progress.elapsed,
            "step_times": progress.step_times, "recent": progress.recent, "history": progress.history}
    if t.average is not None:
        tensors["ema"] = dict(zip(t.params, t.average.shadow_params))
        meta["ema_step"] = t.average.optimization_step
    if t.robust is not None:
        r_tensors, meta["robust"] = t.robust.state_dict()
        if r_tensors:
            tensors["robust"] = r_tensors
    return save_checkpoint(ckpt_dir, step, tensors, meta)


def restore_state(ckpt_dir: Path, t: Training, run: dict) -> Progress:
    """The newest readable checkpoint in `ckpt_dir` restored into `t` (a fresh Progress when none);
    one written under other settings is refused."""
    found = load_latest_checkpoint(ckpt_dir)
    if found is None:
        return Progress()
    last, tensors, state = found
    check_same_config(state["run"], run, f"from {last}")
    with torch.no_grad():
        for n, p in t.params.items():
            p.copy_(tensors["params"][n])
    restore_optimizer_state(t.optimizer, tensors["optimizer"], state["optimizer"])
    t.algo.load_state_dict(tensors.get("method", {}), state["method"])
    if t.average is not None:
        device = next(iter(t.params.values())).device
        t.average.load_state_dict({**t.average.state_dict(), "optimization_step": state["ema_step"],
                                   "shadow_params": [tensors["ema"][n].to(device) for n in t.params]})
    if t.robust is not None:
        t.robust.load_state_dict(tensors.get("robust", {}), state.get("robust", {}))
    logger.info("resuming %s from %s (step %d of %d)", t.method.name, last, state["step"], t.config.steps)
    return Progress(state["step"], state["elapsed_s"], state["step_times"], state["recent"], state["history"])
