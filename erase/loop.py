"""`erase unlearn`: one training loop for every method.

The loop owns everything a method should not care about: data draws, the optimizer, mixed
precision, gradient clipping, checkpoints and exact resume, the NaN/inf guard, the progress bar, and
the outputs (a `save_pretrained` folder, `delta.safetensors` with only the tensors that changed,
`erase_config.json`, and `loss_history.jsonl`: every step's losses, one JSON object per line).
`retain_target="reference"` replaces the retain samples' training targets by a frozen copy of the
input model's predictions on them (or of `retain_reference`'s, e.g. the original of a multi-stage
recipe), for every method at once (each retain term reads `Noised.target`).
`retain_samples="trajectories"` draws those retain samples from the reference's own guided sampling
paths (`erase.unlearn_data.SamplingPaths`) instead of noising the retain images.
`ema_decay` keeps an exponential moving average of the trained weights (diffusers' EMAModel,
checkpointed with them) and saves it in their place. `report_to` hands the same losses to
accelerate's trackers (e.g. tensorboard, if installed). Each step's randomness comes from
`step_generator(seed, step, rank)`, so a run resumed from a checkpoint is identical to an
uninterrupted one.

Parameter groups: `--params` picks one explicitly (an unknown group is an error). Left unset, the
method's preference list for the backbone decides: the first group the backbone offers (ESD trains
`nocondition` on text-conditioned backbones, ESD-u, and `condition` on class-conditional ones).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import statistics
import time
from pathlib import Path

import torch

from .backbones.base import Condition
from .checkpoint import (check_same_config, flatten_optimizer_state, latest_checkpoint, load_latest_checkpoint,
                         restore_optimizer_state, save_checkpoint)
from .config import build_config, config_dict
from .methods import Method, MethodConfig, get_method
from .methods.base import Batch, StepContext
from .methods.losses import Noised, reference_prediction
from .robust import AdversarialCondition
from .unlearn_data import UnlearnData, sampling_paths
from .outputs import UNLEARN_CONFIG as CONFIG_FILE, UNLEARN_DELTA as DELTA_FILE, check_output, mark_output
from .utils import (EraseError, atomic_dir, logger, package_versions, peak_memory_mb, reset_peak_memory,
                    resolve_mixed_precision, step_generator, write_json)

LOSS_HISTORY_FILE = "loss_history.jsonl"
LOSS_WINDOW = 10  # the final losses are averaged over this many last steps
LOG_EVERY = 10  # steps between reads of the losses (NaN guard, progress bar, step times)


def frozen_retain_reference(model, path: str | None) -> torch.nn.Module:
    """The frozen denoiser the retain term keeps: the input model's, or the one of the model at `path`,
    which must be the same backbone with the same parameters (names and shapes)."""
    if path is None:
        return model.frozen_copy()
    from .backbones import load_backbone

    other = load_backbone(path)
    if type(other) is not type(model):
        what = f"it is a {type(other).__name__}, not a {type(model).__name__}"
    else:
        mine = {n: p.shape for n, p in model.denoiser.named_parameters()}
        theirs = {n: p.shape for n, p in other.denoiser.named_parameters()}
        differ = sorted(n for n in mine.keys() | theirs.keys() if mine.get(n) != theirs.get(n))
        what = f"{len(differ)} parameters differ in name or shape (first: {differ[0]})" if differ else None
    if what:
        raise EraseError(f"--retain-reference {path} does not match the model being trained: {what}. "
                         f"Give the model this run's input was made from (e.g. the original of a recipe).")
    dtype = next(model.denoiser.parameters()).dtype
    return other.denoiser.to(model.device, dtype).eval().requires_grad_(False)


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


def make_config(method: type[Method], config: MethodConfig | dict | None, **options) -> MethodConfig:
    """The method's config from an instance, a dict (e.g. a JSON file) and keyword overrides."""
    if isinstance(config, MethodConfig):
        if not isinstance(config, method.Config):
            raise EraseError(f"{type(config).__name__} is not the config of {method.name} ({method.Config.__name__})")
        values = config_dict(config)
    else:
        values = dict(config or {})
    # Options go through the same check as a config file, so a misspelt one is refused, not ignored.
    return build_config(method.Config, {**values, **options})


def read_logs(pending: list[tuple[int, dict]]) -> list[tuple[int, dict[str, float]]]:
    """The logged values of several steps as floats, read from the device in one transfer."""
    tensors = [v.detach().float().reshape(()) for _, logs in pending for v in logs.values() if torch.is_tensor(v)]
    values = iter(torch.stack(tensors).tolist() if tensors else [])
    return [(step, {k: next(values) if torch.is_tensor(v) else float(v) for k, v in logs.items()})
            for step, logs in pending]


def draw_shards(data: UnlearnData, model, n_forget: int, n_retain: int, config: MethodConfig, step: int,
                process: int, shards: int):
    """This process's batch of `step`: `shards` draws, each from its own (seed, step, shard) generator.

    Every draw comes from (seed, step, shard) alone, so a resumed run is identical, and one process
    drawing shards 0..N-1 sees what N processes drawing one shard each see.
    """
    parts = [data.draw(model, n_forget // shards, n_retain // shards,
                       step_generator(config.seed, step, process * shards + j), config.antithetic)
             for j in range(shards)]
    if shards == 1:
        return parts[0]

    def cat(values):  # tensors, or conditions (named tensors)
        return Condition.cat(values) if isinstance(values[0], Condition) else torch.cat(values)

    def join(batches):
        if batches[0] is None:
            return None
        return Noised(**{f.name: None if getattr(batches[0], f.name) is None else
                         cat([getattr(b, f.name) for b in batches]) for f in dataclasses.fields(Noised)})

    return join([p[0] for p in parts]), join([p[1] for p in parts])


def new_ema(params: dict[str, torch.nn.Parameter], decay: float):
    """diffusers' EMAModel of the trained weights, with its default warm-up: the first update copies
    the weights, then the decay grows as (1 + n) / (10 + n) up to `decay`."""
    from diffusers.training_utils import EMAModel

    return EMAModel(params.values(), decay=decay)


def tracker_names(report_to: str | None) -> list[str]:
    """accelerate tracker names from a comma-separated list, refused up front when not installed."""
    from accelerate.tracking import get_available_trackers

    names = [n.strip() for n in (report_to or "").split(",") if n.strip()]
    available = {str(t) for t in get_available_trackers()}
    missing = [n for n in names if n not in available]
    if missing:
        raise EraseError(f"--report-to {','.join(missing)}: not installed (pip install {' '.join(missing)}); "
                         f"available here: {', '.join(sorted(available)) or 'none'}")
    return names


def check_in_sync(accelerator, params: dict[str, torch.nn.Parameter]) -> None:
    """Data-parallel processes must end with identical weights (they apply the same averaged gradients)."""
    checksum = torch.stack([p.detach().double().sum() for p in params.values()]).sum().reshape(1)
    sums = accelerator.gather(checksum)
    if not torch.all(sums == sums[0]):
        raise EraseError(f"the {accelerator.num_processes} processes ended with different weights "
                         f"(checksums {sums.tolist()}): the data-parallel run is out of sync")


def unlearn(model, method: str, forget=None, out: str | Path | None = None, *, retain=None, anchor=None,
            dataset: str | None = None, images: int | None = None, image_guidance: float | None = None,
            anchor_in_retain: bool | None = None, data: UnlearnData | None = None,
            config: MethodConfig | dict | None = None, resume: bool = True, keep_checkpoints: bool = False,
            stop_after: int | None = None, progress: bool = True, overwrite: bool = False, shards: int = 1,
            report_to: str | None = None,
            **options) -> Path:
    """Unlearn `forget` from `model` with `method` and write the result to `out`.

    `model` is a model folder or a backbone object (trained in place); `forget`/`retain`/`anchor` are class ids or names
    (or pass a prebuilt `data`); `config` and `**options` (e.g. `steps=100, lr=1e-4`) set the
    method's config. `stop_after=k` stops after step k with a checkpoint and no model, as an
    interruption would (a later call resumes). Returns `out`, or the checkpoint when stopped early.
    `out` must be new, empty or an earlier `erase unlearn` output unless `overwrite` (see `erase.outputs`).
    `report_to` ("tensorboard", or several comma-separated accelerate trackers) logs every step's
    losses under OUT-logs/ as well.

    `shards=k` draws each process's batch as k equal shards, shard j of process p from the
    generator of (seed, step, p·k + j): one process with `shards=N` and N times the batch draws
    exactly the samples that N processes draw, which is how data-parallel exactness is tested.
    """
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from .backbones import load_backbone

    from .edits import EDITS

    if method in EDITS:  # a closed-form edit: no data, no loop (erase/edits/run.py)
        from .edits.run import run_edit

        return run_edit(model, method, forget, out, retain=retain, anchor=anchor, config=config, overwrite=overwrite,
                        loop_options={"dataset": dataset, "images": images, "image_guidance": image_guidance,
                                      "anchor_in_retain": anchor_in_retain, "data": data, "stop_after": stop_after,
                                      "report_to": report_to}, **options)
    if out is None:
        raise EraseError("give an output folder (--out)")
    method_cls = get_method(method)
    config = make_config(method_cls, config, **options)
    if images is not None and images < 1:
        raise EraseError(f"--images must be at least 1, got {images}")
    if image_guidance is not None and not (math.isfinite(image_guidance) and image_guidance > 0):
        raise EraseError(f"--image-guidance must be a positive number (1 is plain conditional sampling), "
                         f"got {image_guidance}")
    inputs = [model] if isinstance(model, (str, Path)) else []
    if config.retain_reference:
        inputs.append(config.retain_reference)  # the output must not overwrite it either
    check_output(out, "unlearn", overwrite, inputs=inputs, checkpoints=True)
    forget_share = method_cls.forget_share_for(config)
    n_forget = round(config.batch_size * forget_share)
    n_retain = config.batch_size - n_forget
    if (forget_share > 0 and n_forget < 1) or (forget_share < 1 and n_retain < 1):
        raise EraseError(f"{method_cls.name} draws forget and retain samples in every batch: --batch-size must "
                         f"be at least 2, got {config.batch_size}")
    if shards < 1 or n_forget % shards or n_retain % shards:
        raise EraseError(f"shards={shards} must divide the {n_forget} forget and {n_retain} retain samples of a batch")
    base_model = str(model) if isinstance(model, (str, Path)) else model.info.get("source", "in-memory model")
    if isinstance(model, (str, Path)):
        model = load_backbone(model)
    out = Path(out)
    ckpt_dir = out.with_name(out.name + "-checkpoints")
    trackers = tracker_names(report_to)

    mixed = resolve_mixed_precision(config.mixed_precision)
    # Without a GPU, processes started by `accelerate launch` join one gloo group only when told to use the CPU.
    accelerator = Accelerator(mixed_precision=mixed, cpu=not torch.cuda.is_available(), log_with=trackers or None,
                              project_dir=out.with_name(out.name + "-logs") if trackers else None)
    device = accelerator.device
    reset_peak_memory(device)
    model.to(device)
    group = resolve_params(model, config.params, method_cls.params_preference_for(model))  # before any data is generated
    # The input model (or --retain-reference), frozen before any step, whose predictions replace the
    # retain images' targets; loaded before the data is generated, so that a mismatch is refused at once.
    retain_reference = (frozen_retain_reference(model, config.retain_reference)
                        if config.retain_target == "reference" and n_retain else None)
    if data is None:
        data = model.unlearn_data(forget, retain, anchor, dataset=dataset, images=images,
                                  image_guidance=image_guidance, anchor_in_retain=anchor_in_retain)
    paths_seconds = None
    if config.retain_samples == "trajectories" and retain_reference is not None:
        started = time.perf_counter()
        paths = sampling_paths(model, retain_reference, data.retain_cond, config.trajectories, config.seed)
        data = dataclasses.replace(data, retain_paths=paths,  # a copy: a caller's data object stays as given
                                   description={**data.description, "retain_samples": paths.description})
        paths_seconds = round(time.perf_counter() - started, 2)
    data.to(device)

    if config.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if config.lr is None:  # a method whose learning rate depends on the parameter group (esd)
        config = dataclasses.replace(config, lr=method_cls.default_lr(group, model))
    params = select_parameters(model, group)
    original = {n: p.detach().cpu().clone() for n, p in params.items()}
    optimizer = torch.optim.AdamW(params.values(), lr=config.lr, weight_decay=config.weight_decay)
    algo = method_cls(model, config, data, params)
    algo.setup()  # on the original weights: a resume then restores the trained ones
    ctx = StepContext(accelerator, optimizer, list(params.values()), config.grad_clip)
    ema = new_ema(params, config.ema_decay) if config.ema_decay else None
    robust = (AdversarialCondition(model, config.adversarial_every, config.adversarial_steps, config.adversarial_lr,
                                   config.seed, config.adversarial_radius) if config.adversarial_every else None)

    run = {"method": method_cls.name, "config": config_dict(config), "params": group,
           "base_model": base_model, "data": data.description}
    start, elapsed, step_times, recent, history = 0, 0.0, [], [], []
    found = load_latest_checkpoint(ckpt_dir) if resume else None
    if found is not None:
        last, tensors, state = found
        check_same_config(state["run"], run, f"from {last}")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(tensors["params"][n])
        restore_optimizer_state(optimizer, tensors["optimizer"], state["optimizer"])
        algo.load_state_dict(tensors.get("method", {}), state["method"])
        if ema is not None:
            ema.load_state_dict({**ema.state_dict(), "optimization_step": state["ema_step"],
                                 "shadow_params": [tensors["ema"][n].to(device) for n in params]})
        start, elapsed, step_times, recent = state["step"], state["elapsed_s"], state["step_times"], state["recent"]
        history = state["history"]
        logger.info("resuming %s from %s (step %d of %d)", method_cls.name, last, start, config.steps)
    elif ckpt_dir.exists() and not resume:
        shutil.rmtree(ckpt_dir)

    def save_state(step: int) -> Path:
        opt_tensors, opt_meta = flatten_optimizer_state(optimizer)
        m_tensors, m_meta = algo.state_dict()
        tensors = {"params": params, "optimizer": opt_tensors}
        if m_tensors:
            tensors["method"] = m_tensors
        meta = {"run": run, "optimizer": opt_meta, "method": m_meta, "elapsed_s": elapsed,
                "step_times": step_times, "recent": recent, "history": history}
        if ema is not None:
            tensors["ema"] = dict(zip(params, ema.shadow_params))
            meta["ema_step"] = ema.optimization_step
        return save_checkpoint(ckpt_dir, step, tensors, meta)

    if trackers:
        # Tracker configs take flat scalars only.
        accelerator.init_trackers(out.name, config={"method": method_cls.name, "params": group, **{
            k: v for k, v in config_dict(config).items() if isinstance(v, (int, float, str, bool))}})
    end = config.steps if stop_after is None else min(stop_after, config.steps)
    bar = tqdm(range(start, end), initial=start, total=config.steps, desc=method_cls.name,
               disable=not (progress and accelerator.is_local_main_process))
    # Losses stay on the device and are read every LOG_EVERY steps (and before each checkpoint):
    # reading them every step would make the host wait for the GPU at every step.
    pending: list[tuple[int, dict]] = []
    interval_start = time.perf_counter()
    for step in bar:
        # Every draw of this step comes from (seed, step, process), so a resumed run is identical.
        forget_b, retain_b = draw_shards(data, model, n_forget, n_retain, config, step,
                                         accelerator.process_index, shards)
        for pg in optimizer.param_groups:
            pg["lr"] = config.lr * algo.lr_scale(step)
        with accelerator.autocast(), robust.applied(step, forget_b) if robust else contextlib.nullcontext():
            if retain_reference is not None:
                retain_b.target = reference_prediction(model, retain_reference, retain_b)
            pending.append((step, algo.step(Batch(forget_b, retain_b, step), ctx)))
        if ema is not None:
            ema.step(params.values())
        done = step + 1
        checkpoint_now = done == stop_after or (done % config.checkpoint_every == 0 and done < config.steps)
        # The first step is read on its own: its warm-up (allocation, kernel choice) stays out of the
        # intervals whose times give the median seconds per step.
        if not (checkpoint_now or done % LOG_EVERY == 0 or done == end or done == start + 1):
            continue
        for bad_step, logs in read_logs(pending):
            if bad := {k: v for k, v in logs.items() if not math.isfinite(v)}:
                kept = latest_checkpoint(ckpt_dir)
                where = f"the last good checkpoint is {kept}" if kept else "no checkpoint was written yet"
                raise EraseError(f"{method_cls.name}: {', '.join(f'{k} = {v}' for k, v in bad.items())} at step "
                                 f"{bad_step}: the run diverged; {where}. Lower --lr (now {config.lr}) or --steps.")
            recent = (recent + [logs])[-LOSS_WINDOW:]
            history.append({"step": bad_step + 1, **logs})
            if trackers:
                accelerator.log(logs, step=bad_step + 1)
        # The losses were just read, so the device has finished these steps: the interval's time is exact.
        per_step = (time.perf_counter() - interval_start) / len(pending)
        step_times += [per_step] * len(pending)
        elapsed += per_step * len(pending)
        pending = []
        bar.set_postfix({k: f"{v:.4g}" for k, v in recent[-1].items()}, refresh=False)
        if accelerator.is_main_process and checkpoint_now:
            save_state(done)
        interval_start = time.perf_counter()
    bar.close()
    if trackers:
        accelerator.end_training()
    if stop_after is not None and stop_after < config.steps:
        return latest_checkpoint(ckpt_dir)

    if ema is not None:  # the average stands in for the trained weights, also in a method's `finish` (mox)
        ema.copy_to(params.values())
    algo.finish()
    if accelerator.num_processes > 1:
        check_in_sync(accelerator, params)
    if not all(torch.isfinite(p).all() for p in params.values()):
        raise EraseError(f"{method_cls.name}: the final weights are not finite: the run diverged. "
                         f"Lower --lr (now {config.lr}) or --steps.")
    changed = {n: p.detach().cpu().contiguous() for n, p in params.items() if not torch.equal(p.detach().cpu(), original[n])}
    final_losses = {k: statistics.fmean(r[k] for r in recent) for k in recent[0]} if recent else {}
    summary = {
        "method": method_cls.name, "paper": method_cls.paper(), "config": config_dict(config),
        "params": group, "trainable_parameters": sum(p.numel() for p in params.values()),
        "changed_tensors": len(changed), "base_model": base_model, "data": data.description,
        "seed": config.seed, "steps": config.steps, "wall_time_s": round(elapsed, 2),
        "seconds_per_step": statistics.median(step_times) if step_times else None,
        "peak_memory_mb": round(peak_memory_mb(device), 1), "device": str(device), "mixed_precision": mixed,
        "processes": accelerator.num_processes, "final_losses": final_losses, "versions": package_versions()}
    if paths_seconds is not None:
        summary["retain_paths_s"] = paths_seconds  # drawing the sampling paths, once per run (not in wall_time_s)
    if ema is not None:
        summary["ema_final_decay"] = ema.get_decay(ema.optimization_step)
    if accelerator.is_main_process:
        # Model, delta, summary, loss history and marker appear together in one folder swap: a run killed
        # or out of disk while saving leaves no folder that loads, and the rerun resumes from the checkpoints.
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, unlearning={k: summary[k] for k in ("method", "config", "params", "base_model",
                                                                           "data", "steps")})
            model.save_delta(tmp / DELTA_FILE, changed, method=method_cls.name)
            write_json(tmp / CONFIG_FILE, summary)
            (tmp / LOSS_HISTORY_FILE).write_text("".join(json.dumps(entry) + "\n" for entry in history))
            mark_output(tmp, "unlearn")
        if not keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        logger.info("%s: saved %s (%d steps, %.1f s, %.3f s/step)", method_cls.name, out, config.steps,
                    elapsed, summary["seconds_per_step"] or 0)
    accelerator.wait_for_everyone()
    return out

