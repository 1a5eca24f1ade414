"""`erase train-base`: train a class-conditional DDPM from scratch.

One readable loop on accelerate: data parallel across processes, mixed precision on GPUs,
checkpoints every `checkpoint_every` steps, exact resume, an EMA of the weights (diffusers'
`EMAModel` with warm-up), and `exclude` to train the "retrained reference" of class unlearning: the
same recipe and class table without the forgotten classes' images.
"""

from __future__ import annotations

import copy
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..backbones import ClassConditionalDDPM
from ..checkpoint import (check_same_config, flatten_optimizer_state, load_latest_checkpoint,
                         restore_optimizer_state, save_checkpoint)
from ..config import check_channels, config_dict, field
from ..data import load_dataset
from ..outputs import mark_output
from ..utils import EraseError, atomic_dir, logger, package_versions, progress_off, step_generator
from .command import add_training_command

NORM_GROUPS = 8  # GroupNorm groups of the UNet (ClassConditionalDDPM.create's default)


@dataclass
class TrainBaseConfig:
    dataset: str = field("digits", "dataset: digits, cifar10 or folder:PATH")
    data_root: str | None = field(None, "where cifar10 is stored (default $ERASE_DATA or ~/.cache/erase)")
    download: bool = field(False, "download cifar10 into data_root if it is not there (needs network)")
    image_size: int | None = field(None, "resize images to this size (digits: 16 already)")
    steps: int = field(4000, "optimizer steps")
    batch_size: int = field(128, "images per step and process")
    lr: float = field(2e-3, "peak AdamW learning rate (linear warm-up, then cosine decay to 10%)")
    warmup_steps: int = field(200, "linear learning-rate warm-up steps")
    weight_decay: float = field(0.0, "AdamW weight decay")
    grad_clip: float = field(1.0, "clip the gradient norm to this value (0 disables)")
    ema_decay: float = field(0.9999, "largest decay of the EMA of the weights; the EMA weights are saved (0 disables)")
    ema_power: float = field(0.75, "EMA warm-up: the decay at step n is 1 - (1 + n / ema_inv_gamma) ** -ema_power, "
                                   "capped at ema_decay (so no trace of the random init survives)")
    ema_inv_gamma: float = field(1.0, "EMA warm-up time scale (see ema_power)")
    class_dropout: float = field(0.1, "probability of replacing the label by the null class (classifier-free guidance)")
    block_out_channels: tuple[int, ...] = field((32, 64, 64), "UNet channels per resolution level")
    layers_per_block: int = field(1, "ResNet blocks per UNet level")
    attention_levels: tuple[bool, ...] = field((False, True, False), "self-attention at each level")
    num_train_timesteps: int = field(1000, "diffusion steps T (linear betas 1e-4 to 0.02)")
    checkpoint_every: int = field(500, "write a resumable checkpoint every this many steps")
    seed: int = field(0, "seed of the initial weights and of every batch, noise and timestep draw")
    exclude: tuple[str, ...] = field((), "class ids or names whose images are left out (the class table stays "
                                         "whole: the model is the retrained reference for unlearning them)")
    mixed_precision: str = field("no", "no, fp16 or bf16 (GPU only)", choices=("no", "fp16", "bf16"))

    def __post_init__(self):
        for name in ("steps", "batch_size", "checkpoint_every", "num_train_timesteps", "layers_per_block"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.class_dropout < 1:
            raise ValueError(f"class_dropout must be in [0, 1), got {self.class_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        check_channels("block_out_channels", self.block_out_channels, NORM_GROUPS)
        if len(self.attention_levels) != len(self.block_out_channels):
            raise ValueError(f"attention_levels needs one entry per level of block_out_channels "
                             f"({len(self.block_out_channels)}), got {len(self.attention_levels)}")
        if self.image_size is not None and (self.image_size < 1 or self.image_size % 2 ** (len(self.block_out_channels) - 1)):
            raise ValueError(f"image_size {self.image_size} must be a positive multiple of "
                             f"{2 ** (len(self.block_out_channels) - 1)} (the UNet halves it at each of its "
                             f"{len(self.block_out_channels) - 1} downsamplings)")
        if self.ema_power <= 0 or self.ema_inv_gamma <= 0:
            raise ValueError(f"ema_power and ema_inv_gamma must be positive, got {self.ema_power}, {self.ema_inv_gamma}")


def learning_rate(config, step: int) -> float:
    """Linear warm-up to `config.lr`, then cosine decay to 10% at `config.steps` (any config with
    `lr`, `warmup_steps` and `steps`: also the miniature SD's)."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - config.warmup_steps)
    return config.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def new_ema(parameters, config: TrainBaseConfig):
    """diffusers' EMAModel with its warm-up: the first update copies the weights (decay 0), then the
    decay grows towards `ema_decay`, so the average forgets the random initialisation."""
    from diffusers.training_utils import EMAModel

    return EMAModel(parameters, decay=config.ema_decay, use_ema_warmup=True, inv_gamma=config.ema_inv_gamma,
                    power=config.ema_power)


def _data_and_model(config: TrainBaseConfig, accelerator):
    """The training images (without the excluded classes) and the untrained model."""
    with accelerator.main_process_first():  # one process downloads, the others then read
        data = load_dataset(config.dataset, "train", root=config.data_root, image_size=config.image_size,
                            download=config.download)
    torch.manual_seed(config.seed)
    model = ClassConditionalDDPM.create(
        data.class_names, image_size=data.images.shape[-1], channels=data.images.shape[1],
        block_out_channels=config.block_out_channels, layers_per_block=config.layers_per_block,
        attention_levels=config.attention_levels, num_train_timesteps=config.num_train_timesteps)
    excluded = sorted({model.class_index(c) for c in config.exclude})
    if excluded:
        if len(excluded) == model.num_classes:
            raise EraseError("train-base: --exclude leaves no class to train on")
        data = data.subset([c for c in range(model.num_classes) if c not in excluded])
        logger.info("training without classes %s: %d images left", excluded, len(data))
    return data, model, excluded


def _draw_batch(images, labels, alphas, null: int, config: TrainBaseConfig, g: torch.Generator, device):
    """One step's noised batch (labels dropped to the null class at `class_dropout`), every draw from `g`."""
    idx = torch.randint(len(labels), (config.batch_size,), generator=g)
    x0 = images[idx]
    y = labels[idx].clone()
    y[torch.rand(len(y), generator=g) < config.class_dropout] = null
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(config.num_train_timesteps, (len(y),), generator=g)
    x0, y, noise, t = x0.to(device), y.to(device), noise.to(device), t.to(device)
    a = alphas[t].view(-1, 1, 1, 1)
    return a.sqrt() * x0 + (1 - a).sqrt() * noise, t, y, noise


def train_base(config: TrainBaseConfig, out: str | Path, resume: bool = True,
               keep_checkpoints: bool = False) -> Path:
    """Train and save a model folder at `out`; checkpoints go to `<out>-checkpoints/` meanwhile."""
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    out = Path(out)
    ckpt_dir = out.with_name(out.name + "-checkpoints")
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    data, model, excluded = _data_and_model(config, accelerator)
    unet = model.unet
    ema = new_ema(unet.parameters(), config) if config.ema_decay > 0 else None
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)

    start, elapsed, loss_avg = 0, 0.0, None
    saved_config = config_dict(config)
    found = load_latest_checkpoint(ckpt_dir) if resume else None
    if found is not None:
        last, tensors, state = found
        check_same_config(state["config"], saved_config, f"from {last}")
        unet.load_state_dict(tensors["model"])
        if ema is not None:
            shadow = tensors["ema"]
            ema.load_state_dict({**ema.state_dict(), "optimization_step": state["ema_step"],
                                 "shadow_params": [shadow[str(i)] for i in range(len(shadow))]})
        restore_optimizer_state(optimizer, tensors["optimizer"], state["optimizer"])
        start, elapsed, loss_avg = state["step"], state["elapsed_s"], state["loss_avg"]
        logger.info("resuming from %s (step %d of %d)", last, start, config.steps)
    elif ckpt_dir.exists() and not resume:
        shutil.rmtree(ckpt_dir)

    unet, optimizer = accelerator.prepare(unet, optimizer)
    device = accelerator.device
    if ema is not None:
        ema.to(device)
    images, labels = data.images, data.labels
    alphas = model.scheduler.alphas_cumprod.to(device)
    null = model.null_class

    def save_state(step: int) -> None:
        opt_tensors, opt_meta = flatten_optimizer_state(optimizer)
        tensors = {"model": accelerator.unwrap_model(unet).state_dict(), "optimizer": opt_tensors}
        state = {"config": saved_config, "optimizer": opt_meta, "elapsed_s": elapsed, "loss_avg": loss_avg}
        if ema is not None:
            tensors["ema"] = {str(i): p for i, p in enumerate(ema.shadow_params)}
            state["ema_step"] = ema.optimization_step
        save_checkpoint(ckpt_dir, step, tensors, state)

    bar = tqdm(range(start, config.steps), initial=start, total=config.steps, desc="train-base",
               disable=not accelerator.is_local_main_process or progress_off())
    unet.train()
    for step in bar:
        t0 = time.perf_counter()
        # Every draw of this step comes from (seed, step, process), so a resumed run is identical.
        g = step_generator(config.seed, step, accelerator.process_index)
        x_t, t, y, noise = _draw_batch(images, labels, alphas, null, config, g, device)

        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        with accelerator.autocast():
            loss = F.mse_loss(unet(x_t, t, class_labels=y).sample.float(), noise)
        accelerator.backward(loss)
        if config.grad_clip > 0:
            accelerator.clip_grad_norm_(unet.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(accelerator.unwrap_model(unet).parameters())

        value = loss.item()
        if not math.isfinite(value):
            raise EraseError(f"train-base: loss became {value} at step {step}; lower --lr "
                             f"(now {config.lr}). The last good checkpoint is in {ckpt_dir}.")
        loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
        elapsed += time.perf_counter() - t0
        bar.set_postfix(loss=f"{loss_avg:.4f}")
        if (step + 1) % config.checkpoint_every == 0 and step + 1 < config.steps and accelerator.is_main_process:
            save_state(step + 1)
    bar.close()

    if accelerator.is_main_process:
        final = accelerator.unwrap_model(unet)
        training = {"config": saved_config, "steps": config.steps, "train_images": len(labels),
                    "excluded_classes": excluded}
        if ema is not None:
            ema.copy_to(final.parameters())
            training["ema_final_decay"] = ema.get_decay(ema.optimization_step)
        model.unet = copy.deepcopy(final).float().cpu()
        with atomic_dir(out) as tmp:
            model.save_pretrained(tmp, training={
                **training,
                "wall_time_s": round(elapsed, 1), "final_loss": loss_avg,
                "processes": accelerator.num_processes, "device": str(device), "versions": package_versions()})
            mark_output(tmp, "train-base")
        if not keep_checkpoints:
            shutil.rmtree(ckpt_dir, ignore_errors=True)
        logger.info("saved %s (%.0f s of training)", out, elapsed)
    accelerator.wait_for_everyone()
    return out


# -- command line ---------------------------------------------------------------------------------
def add_commands(subparsers) -> None:
    p = add_training_command(subparsers, "train-base", TrainBaseConfig, out_help="model folder to write", run=lambda c, a:
                             train_base(c, a.out, resume=not a.no_resume, keep_checkpoints=a.keep_checkpoints))
    p.add_argument("--no-resume", action="store_true", help="start over even if OUT-checkpoints/ exists")
    p.add_argument("--keep-checkpoints", action="store_true", help="keep OUT-checkpoints/ after finishing")
