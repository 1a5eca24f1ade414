"""Running one stage: its method, optimizer and terms set up on the model, then the step loop.

The loop owns everything a method should not care about: data draws, the optimizer, mixed
precision, gradient clipping, checkpoints, the NaN/inf guard, the progress bar and the terms
(`erase.unlearning.terms`). Each step's randomness comes from `step_generator(seed, step, rank)`,
so a run resumed from a checkpoint is identical to an uninterrupted one.

Parameter groups: `params` picks one explicitly (an unknown group is an error). Left unset, the
method's preference list for the backbone decides: the first group the backbone offers (ESD trains
`nocondition` on text-conditioned backbones, ESD-u, and `condition` on class-conditional ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..checkpoint import latest_checkpoint
from ..methods import Method, MethodConfig
from ..methods.base import Batch, StepContext
from ..methods.losses import reference_prediction
from ..unlearn_data import UnlearnData, sampling_paths
from ..utils import EraseError, logger, progress_off, step_generator
from .data import draw_shards
from ..lora import LoraTraining
from .terms import Terms, new_average, new_robust

LOSS_WINDOW = 10  # the final losses are averaged over this many last steps
LOG_EVERY = 10  # steps between reads of the losses (NaN guard, progress bar, step times)


def resolve_params(model, requested: str | None, preference: tuple[str, ...]) -> str:
    if requested is not None:
        model.trainable_parameters(requested)  # raises a clear error for a group the backbone lacks
        return requested
    available = model.parameter_groups()
    for group in preference:
        if group in available:
            return group
    raise EraseError(f"none of the preferred parameter groups {preference} exists on this backbone "
                     f"(it has {', '.join(available)}): pass --params")


def select_parameters(model, group: str) -> dict[str, torch.nn.Parameter]:
    """Freeze every weight, then unfreeze `group`: a method cannot move what it should not."""
    for p in model.trainable_parameters("all").values():
        p.requires_grad_(False)
    params = model.trainable_parameters(group)
    for p in params.values():
        p.requires_grad_(True)
    return params


def batch_split(method: type[Method], config: MethodConfig, shards: int) -> tuple[int, int]:
    """(forget, retain) samples of each batch, refused when a batch cannot hold them."""
    forget_share = method.forget_share_for(config)
    n_forget = round(config.batch_size * forget_share)
    n_retain = config.batch_size - n_forget
    if (forget_share > 0 and n_forget < 1) or (forget_share < 1 and n_retain < 1):
        raise EraseError(f"{method.name} draws forget and retain samples in every batch: --batch-size must "
                         f"be at least 2, got {config.batch_size}")
    if shards < 1 or n_forget % shards or n_retain % shards:
        raise EraseError(f"shards={shards} must divide the {n_forget} forget and {n_retain} retain samples of a batch")
    return n_forget, n_retain


def read_logs(pending: list[tuple[int, dict]]) -> list[tuple[int, dict[str, float]]]:
    """The logged values of several steps as floats, read from the device in one transfer."""
    tensors = [v.detach().float().reshape(()) for _, logs in pending for v in logs.values() if torch.is_tensor(v)]
    values = iter(torch.stack(tensors).tolist() if tensors else [])
    return [(step, {k: next(values) if torch.is_tensor(v) else float(v) for k, v in logs.items()})
            for step, logs in pending]


@dataclass
class Progress:
    """How far a stage got: what a checkpoint stores besides tensors, and what its record reports."""

    step: int = 0
    elapsed: float = 0.0
    step_times: list[float] = field(default_factory=list)
    recent: list[dict] = field(default_factory=list)  # the last LOSS_WINDOW steps' losses
    history: list[dict] = field(default_factory=list)  # every logged step's losses


@dataclass
class Training:
    """One stage set up on the model: its method, weights, optimizer and terms."""

    model: Any
    method: type[Method]
    config: MethodConfig
    terms: Terms
    data: UnlearnData
    group: str
    params: dict[str, torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    algo: Method
    ctx: StepContext
    split: tuple[int, int]
    teacher: torch.nn.Module | None = None  # the retain term's frozen teacher
    average: Any = None  # diffusers' EMAModel (the weight-average term)
    robust: Any = None  # erase.robust.AdversarialCondition (the robustness term)
    paths_seconds: float | None = None
    lora: Any = None  # erase.lora.LoraTraining: the adapter trained in place of the group's weights
    adapter: dict | None = None  # its PEFT state dict, taken when it is merged at the end


def set_up(model, method: type[Method], config: MethodConfig, terms: Terms, data: UnlearnData, group: str,
           accelerator, shards: int, teacher: Callable[[], torch.nn.Module] | None) -> Training:
    """Put the stage on the model: data on the device, the retain teacher and its sampling paths, the
    parameter group unfrozen, the optimizer, the method (its `setup` on the stage's first weights)."""
    split = batch_split(method, config, shards)
    if data.concept_names and 0 < split[0] // shards < len(data.concept_names):
        raise EraseError(f"{method.name} draws {split[0] // shards} forget samples a batch but {len(data.concept_names)} "
                         "concepts are erased: raise --batch-size so that each batch holds a forget sample of every concept")
    # The retain term's teacher, frozen before any step; its paths drawn once per stage.
    frozen = teacher() if terms.retain is not None and split[1] else None
    paths_seconds = None
    if frozen is not None and terms.retain.samples == "paths":
        started = time.perf_counter()
        paths = sampling_paths(model, frozen, data.retain_cond, terms.retain.paths, config.seed)
        data = dataclasses.replace(data, retain_paths=paths,  # a copy: a caller's data object stays as given
                                   description={**data.description, "retain_samples": paths.description})
        paths_seconds = round(time.perf_counter() - started, 2)
    data.to(accelerator.device)
    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if config.lr is None:  # a method whose learning rate depends on the parameter group (esd)
        config = dataclasses.replace(config, lr=method.default_lr(group, model))
    params = select_parameters(model, group)
    lora = LoraTraining(model, params, group, config.lora_rank, config.lora_alpha, config.seed) if config.lora_rank else None
    if lora is not None:  # the adapter's parameters are what the method trains
        params = lora.params
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    algo = method(model, config, data, params)
    algo.setup()  # on the stage's first weights: a resume then restores the trained ones
    return Training(model, method, config, terms, data, group, params, optimizer, algo,
                    StepContext(accelerator, optimizer, list(params.values()), config.grad_clip), split,
                    teacher=frozen, paths_seconds=paths_seconds,
                    average=new_average(params, terms.average) if terms.average else None,
                    robust=new_robust(model, terms.robust, config.seed) if terms.robust else None, lora=lora)


def one_step(t: Training, step: int, accelerator, shards: int) -> dict:
    """Draw the step's batch (from (seed, step, process) alone), apply the terms, run the method's step."""
    forget_b, retain_b = draw_shards(t.data, t.model, *t.split, t.config.seed, t.config.antithetic, step,
                                     accelerator.process_index, shards)
    for pg in t.optimizer.param_groups:
        pg["lr"] = t.config.lr * t.algo.lr_scale(step)
    concepts = {}
    if step % LOG_EVERY == 0:  # an extra forward, so only on every LOG_EVERY-th step
        with accelerator.autocast():  # on the plain prompts and the weights the step starts from
            concepts = concept_losses(t, forget_b, step)
    with accelerator.autocast(), t.robust.applied(step, forget_b) if t.robust else contextlib.nullcontext():
        if t.teacher is not None:
            retain_b.target = reference_prediction(t.model, t.teacher, retain_b)
        logs = t.algo.step(Batch(forget_b, retain_b, step), t.ctx)
    if t.average is not None:
        t.average.step(t.params.values())
    return {**logs, **concepts}


CONCEPT_LOG_STREAM = 1 << 44  # the per-concept losses' own draws, for a method that draws no forget samples


@torch.no_grad()
def concept_losses(t: Training, forget_b, step: int) -> dict[str, torch.Tensor]:
    """With several concepts erased at once, each one's loss apart: the denoising loss
    `‖ε − ε_θ(x_t, t, c_f)‖²` of its forget samples in this batch (each batch holds every concept,
    `UnlearnData.draw`). It is the same quantity whatever the method, and it rises as the model stops
    drawing the concept from its prompts; `forget_denoise.<concept>` in the loss history of every
    LOG_EVERY-th step (the first of each interval). A method
    that trains on no forget sample (finetune) gets one of each concept from a stream of their own."""
    if t.data.forget_concept is None:
        return {}
    if forget_b is None:
        forget_b, _ = t.data.draw(t.model, len(t.data.concept_names), 0,
                                  step_generator(t.config.seed, CONCEPT_LOG_STREAM, step))
    pred = t.model.predict(forget_b.x_t, forget_b.t, forget_b.cond).float()
    per_sample = (pred - forget_b.target.float()).pow(2).flatten(1).mean(1)
    return {f"forget_denoise.{name}": per_sample[forget_b.concept == k].mean()
            for k, name in enumerate(t.data.concept_names)}


def run_steps(t: Training, progress: Progress, end: int, accelerator, *, shards: int, ckpt_dir,
              checkpoint: Callable[[int], None], stop_after: int | None, trackers: bool, show: bool,
              checkpoint_minutes: float = 5.0) -> Progress:
    """Steps `progress.step` to `end`; losses read every LOG_EVERY steps, checkpoints every
    `checkpoint_every` steps, after `checkpoint_minutes` of wall time since the last one (so that an
    interrupt loses minutes, whatever the step count) and at `stop_after`."""
    from tqdm.auto import tqdm

    steps = t.config.steps
    bar = tqdm(range(progress.step, end), initial=progress.step, total=steps, desc=t.method.name,
               disable=not (show and accelerator.is_local_main_process) or progress_off())
    # Losses stay on the device and are read every LOG_EVERY steps (and before each checkpoint):
    # reading them every step would make the host wait for the GPU at every step.
    pending: list[tuple[int, dict]] = []
    start, interval_start = progress.step, time.perf_counter()
    last_save = interval_start
    for step in bar:
        pending.append((step, one_step(t, step, accelerator, shards)))
        done = progress.step = step + 1
        checkpoint_now = done == stop_after or (done < steps and (
            done % t.config.checkpoint_every == 0 or time.perf_counter() - last_save >= 60 * checkpoint_minutes))
        # The first step is read on its own: its warm-up (allocation, kernel choice) stays out of the
        # intervals whose times give the median seconds per step.
        if not (checkpoint_now or done % LOG_EVERY == 0 or done == end or done == start + 1):
            continue
        for logged_step, logs in read_logs(pending):
            if bad := {k: v for k, v in logs.items() if not math.isfinite(v)}:
                kept = latest_checkpoint(ckpt_dir)
                where = f"the last good checkpoint is {kept}" if kept else "no checkpoint was written yet"
                raise EraseError(f"{t.method.name}: {', '.join(f'{k} = {v}' for k, v in bad.items())} at step "
                                 f"{logged_step}: the run diverged; {where}. Lower --lr (now {t.config.lr}) or --steps.")
            progress.recent = (progress.recent + [logs])[-LOSS_WINDOW:]
            progress.history.append({"step": logged_step + 1, **logs})
            if trackers:
                accelerator.log(logs, step=logged_step + 1)
        # The losses were just read, so the device has finished these steps: the interval's time is exact.
        per_step = (time.perf_counter() - interval_start) / len(pending)
        progress.step_times += [per_step] * len(pending)
        progress.elapsed += per_step * len(pending)
        pending = []
        bar.set_postfix({k: f"{v:.4g}" for k, v in progress.recent[-1].items()}, refresh=False)
        if accelerator.is_main_process and checkpoint_now:
            checkpoint(done)
            last_save = time.perf_counter()
        interval_start = time.perf_counter()
    bar.close()
    return progress


def check_in_sync(accelerator, params: dict[str, torch.nn.Parameter]) -> None:
    """Data-parallel processes must end with identical weights (they apply the same averaged gradients)."""
    checksum = torch.stack([p.detach().double().sum() for p in params.values()]).sum().reshape(1)
    sums = accelerator.gather(checksum)
    if not torch.all(sums == sums[0]):
        raise EraseError(f"the {accelerator.num_processes} processes ended with different weights "
                         f"(checksums {sums.tolist()}): the data-parallel run is out of sync")


def finish(t: Training, accelerator) -> None:
    """The stage's final weights: the average in place of the trained ones, the method's `finish`, checked."""
    if t.average is not None:  # the average stands in for the trained weights, also in a method's `finish` (mox)
        t.average.copy_to(t.params.values())
    t.algo.finish()
    if accelerator.num_processes > 1:
        check_in_sync(accelerator, t.params)
    if not all(torch.isfinite(p).all() for p in t.params.values()):
        raise EraseError(f"{t.method.name}: the final weights are not finite: the run diverged. "
                         f"Lower --lr (now {t.config.lr}) or --steps.")
    if t.lora is not None:  # merged into the weights: the outputs are a full fine-tuning's, plus the adapter
        t.adapter, t.params = t.lora.merge()
    logger.debug("%s: finished", t.method.name)
