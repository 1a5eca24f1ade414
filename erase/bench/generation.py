"""The generation and measurement sections of `erase bench`, and the FLOPs utilisation of a step.

Generation: images per second of this package's sampling against what a user would otherwise run
on the same model, prompts or classes, seeds, steps, guidance, batch size and dtype, timed in
interleaved rounds (each variant keeps its fastest round):

- Stable Diffusion: `backbone.sample` (the path of the training-data cache and `digits-prompts`)
  and `erase.eval.generation.sample_prompts` (the I2P and COCO protocols) against a stock
  `StableDiffusionPipeline` loaded with `from_pretrained` and called with prompt strings;
- class-conditional DDPM: diffusers has no class-conditional pipeline with guidance, so the
  reference is the closest stock loop: `DDIMScheduler` with the same UNet calls (conditional and
  unconditional rows in one call, as `StableDiffusionPipeline` batches them).

Measurement: NudeNet detections and FID features per second, and their estimated share of an I2P
or COCO protocol's wall time from the measured rates. FLOPs utilisation: the FLOPs of one
unlearning step (counted by torch's `FlopCounterMode`) over its measured time, against the
device's dense bf16 peak (`PEAK_BF16_TFLOPS`).
"""

from __future__ import annotations

import contextlib
import time
from typing import Callable

import numpy as np
import torch

from ..utils import EraseError, logger

# Dense (no sparsity) bf16 tensor-core peaks of the vendors' data sheets, in TFLOP/s. Matched in
# order against torch.cuda.get_device_name(), so "H100 PCIe" comes before "H100".
PEAK_BF16_TFLOPS = (
    ("B200", 2250.0),
    ("H200", 989.4),
    ("H100 PCIe", 756.0),
    ("H100", 989.4),  # SXM
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
    ("A10", 125.0),  # A10 (the AWS A10G has a lower clock and is matched here too: an upper bound)
    ("RTX 4090", 165.2),
)
# Prompts cycled through in the Stable Diffusion measurement (any prompt costs the same).
PROMPTS = ("a handwritten digit three", "the number 7", "a photo of a cat", "a painting of a house by the sea")


def device_peak_tflops(device: torch.device) -> tuple[str, float] | None:
    """(name, dense bf16 TFLOP/s) of a GPU in `PEAK_BF16_TFLOPS`, or None (a CPU, an unlisted GPU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peak in PEAK_BF16_TFLOPS:
        if key in name:
            return name, peak
    return None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved_rates(variants: dict[str, Callable[[], object]], images: int, rounds: int,
                      device: torch.device) -> dict[str, dict]:
    """Images per second of each variant: one warm-up call each, then `rounds` rounds that run every
    variant once in turn (a change of machine load reaches them alike); each keeps its fastest round."""
    for fn in variants.values():
        fn()
    _sync(device)
    seconds: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, fn in variants.items():
            t0 = time.perf_counter()
            fn()
            _sync(device)
            seconds[name].append(time.perf_counter() - t0)
    return {name: {"images_per_s": images / min(s), "all_rounds_s": s} for name, s in seconds.items()}


def stock_ddim_sample(unet, scheduler_config, labels: torch.Tensor, null_class: int, noise: torch.Tensor,
                      steps: int, guidance: float) -> torch.Tensor:
    """The stock reference for a class-conditional UNet: diffusers' DDIM loop (as in `DDIMPipeline`)
    with classifier-free guidance batched as `StableDiffusionPipeline` does it (unconditional half first),
    stepping with the ε of the clipped x0 as this package's sampler does (CHANGELOG.md, 0.2.0)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps, device=noise.device)
    guided = guidance > 1.0
    cond = torch.cat([torch.full_like(labels, null_class), labels]) if guided else labels
    x = noise
    for t in scheduler.timesteps:
        eps = unet(torch.cat([x, x]) if guided else x, t, class_labels=cond).sample
        if guided:
            eps_u, eps_c = eps.chunk(2)
            eps = eps_u + guidance * (eps_c - eps_u)
        x = scheduler.step(eps, t, x, use_clipped_model_output=scheduler.config.clip_sample).prev_sample
    return x


def generation_speed(model, path, n: int, batch_size: int, steps: int, guidance: float, rounds: int,
                     device: torch.device, dtype: torch.dtype = torch.float32) -> dict:
    """Images per second of this package's generation against the stock reference (module docstring)."""
    seeds = list(range(n))
    if model.condition_kind == "class":
        classes = sample_conditions(model, n)
        model.to(device, dtype)
        labels = model.encode_conditions(classes).tensors["class_labels"]

        def stock():
            for start in range(0, n, batch_size):
                noise = model.initial_noise(seeds[start:start + batch_size]).to(device, dtype)
                stock_ddim_sample(model.denoiser, model.sampling_scheduler(steps).config, labels[start:start + batch_size],
                                  model.null_class, noise, steps, guidance)

        variants = {"erase": lambda: model.sample(classes, seeds, steps=steps, guidance=guidance, batch_size=batch_size),
                    "stock DDIMScheduler loop": stock}
        reference = "stock DDIMScheduler loop"
    else:
        from erase.backbones.base import ModelSource
        from erase.eval.generation import sample_prompts
        from erase.eval.prompts import PromptItem

        model.to(device, dtype)
        prompts = sample_conditions(model, n)
        items = [PromptItem(prompt=p, seed=s, guidance=guidance, source_row=s) for p, s in zip(prompts, seeds)]
        half = {} if dtype == torch.float32 else {"torch_dtype": dtype}
        stock_kwargs = model.stock_kwargs(ModelSource.resolve(path))  # as a user loads it: absent parts absent
        pipe = model.pipeline_class().from_pretrained(path, **stock_kwargs, **half).to(device)
        pipe.set_progress_bar_config(disable=True)

        def stock():
            for start in range(0, n, batch_size):
                pipe(prompt=prompts[start:start + batch_size], num_inference_steps=steps, guidance_scale=guidance,
                     generator=[torch.Generator().manual_seed(s) for s in seeds[start:start + batch_size]],
                     output_type="pt")

        variants = {"erase": lambda: model.sample(prompts, seeds, steps=steps, guidance=guidance, batch_size=batch_size),
                    "erase eval (I2P/COCO)": lambda: sample_prompts(model, items, steps=steps, batch_size=batch_size),
                    f"stock {model.PIPELINE}": stock}
        reference = f"stock {model.PIPELINE}"
    rates = interleaved_rates(variants, n, rounds, device)
    base = rates[reference]["images_per_s"]
    for r in rates.values():
        r["vs_stock"] = r["images_per_s"] / base
    return {"images": n, "batch": batch_size, "steps": steps, "guidance": guidance,
            "dtype": str(dtype).replace("torch.", ""), "reference": reference, "variants": rates}


def sample_conditions(model, n: int) -> list:
    """n classes (cycling over the model's) or n prompts (cycling over `PROMPTS`)."""
    if model.condition_kind == "class":
        return [i % model.num_classes for i in range(n)]
    return [PROMPTS[i % len(PROMPTS)] for i in range(n)]


def channels_last_effect(model, n: int, batch_size: int, steps: int, guidance: float, rounds: int,
                         device: torch.device) -> dict:
    """This package's sampling with the UNet in channels-last memory format against the default layout."""
    conditions = sample_conditions(model, n)

    def run(layout):
        def go():
            model.denoiser.to(memory_format=layout)
            model.sample(conditions, list(range(n)), steps=steps, guidance=guidance, batch_size=batch_size)
        return go

    rates = interleaved_rates({"default layout": run(torch.contiguous_format), "channels-last": run(torch.channels_last)},
                              n, rounds, device)
    model.denoiser.to(memory_format=torch.contiguous_format)
    return {"speedup": rates["channels-last"]["images_per_s"] / rates["default layout"]["images_per_s"],
            "variants": rates}


def batch_size_effect(model, n: int, batch_sizes: tuple[int, ...], steps: int, guidance: float, rounds: int,
                      device: torch.device) -> dict:
    """This package's sampling of the same images at each batch size in interleaved rounds, and the
    batch the protocols choose on this device when none is given (`Backbone.choose_batch_size`, with
    the digits protocols' CPU batch of 64). `n` is rounded up to a multiple of every batch size, so
    that no variant pays for padding."""
    from math import lcm

    n = -(-n // lcm(*batch_sizes)) * lcm(*batch_sizes)
    conditions, seeds = sample_conditions(model, n), list(range(n))
    variants = {f"batch {b}": (lambda b=b: model.sample(conditions, seeds, steps=steps, guidance=guidance,
                                                         batch_size=b)) for b in batch_sizes}
    rates = interleaved_rates(variants, n, rounds, device)
    fastest = max(rates.values(), key=lambda r: r["images_per_s"])["images_per_s"]
    for r in rates.values():
        r["vs_fastest"] = r["images_per_s"] / fastest
    return {"images": n, "steps": steps, "variants": rates,
            "chosen_without_a_batch_size": model.choose_batch_size(conditions[0], cpu_batch=64)}


@contextlib.contextmanager
def _eager(module: torch.nn.Module):
    """Inside: `module` runs its plain forward although `module.compile()` was called on it.

    `nn.Module.compile()` compiles in place by setting `_compiled_call_impl`, which `__call__` uses
    when set; clearing it for a moment lets the same module (the backbone's own denoiser, so the
    backbone need not know) be timed compiled and eager in interleaved rounds."""
    if not hasattr(module, "_compiled_call_impl"):
        raise EraseError("this torch's nn.Module has no _compiled_call_impl: the compile measurement "
                         "cannot switch between compiled and eager; run erase bench with --compile false")
    compiled, module._compiled_call_impl = module._compiled_call_impl, None
    try:
        yield
    finally:
        module._compiled_call_impl = compiled


def compile_effect(model, n: int, batch_size: int, steps: int, guidance: float, rounds: int,
                   device: torch.device) -> dict:
    """This package's sampling with the denoiser compiled by `torch.compile` (default inductor
    backend) against eager: the speedup after compilation, the compilation's one-off cost (the first
    compiled call's time over an eager call's), and how far the images move (fused kernels round
    differently, so compiled images are not bit-identical to eager ones)."""
    conditions, seeds = sample_conditions(model, n), list(range(n))

    def sample():
        return model.sample(conditions, seeds, steps=steps, guidance=guidance, batch_size=batch_size)

    denoiser = model.denoiser
    t0 = time.perf_counter()
    eager_images = sample()
    eager_s = time.perf_counter() - t0
    denoiser.compile()
    try:
        t0 = time.perf_counter()
        compiled_images = sample()
        first_compiled_s = time.perf_counter() - t0

        def eager():
            with _eager(denoiser):
                sample()

        rates = interleaved_rates({"eager": eager, "torch.compile": sample}, n, rounds, device)
    finally:
        denoiser._compiled_call_impl = None  # back to eager for whatever the bench measures next
    return {"speedup": rates["torch.compile"]["images_per_s"] / rates["eager"]["images_per_s"],
            "compile_s": max(0.0, first_compiled_s - eager_s), "variants": rates,
            "max_abs_image_difference": float((compiled_images - eager_images).abs().max())}


def nudenet_rate(images: int, size: int, rounds: int) -> dict:
    """NudeNet 3.x detections per second on random RGB images of `size` px (its cost does not depend
    on what they show: it letterboxes every image to 320 px)."""
    from erase.eval.metrics import NudeNet

    detector = NudeNet()
    batch = list(np.random.default_rng(0).integers(0, 256, (images, size, size, 3), dtype=np.uint8))
    rates = interleaved_rates({"nudenet": lambda: detector.detect(batch)}, images, rounds, torch.device("cpu"))
    return {"images": images, "size": size, "images_per_s": rates["nudenet"]["images_per_s"],
            "all_rounds_s": rates["nudenet"]["all_rounds_s"]}


def fid_feature_rate(feature, images: torch.Tensor, rounds: int, device: torch.device,
                     weights_path: str | None = None) -> dict:
    """FID feature extraction (update with generated images) per second; `feature` as for `FeatureFID`."""
    from erase.eval.metrics import FeatureFID

    fid = FeatureFID(feature, weights_path=weights_path).to(device)
    x = images.to(device)
    rates = interleaved_rates({"fid": lambda: fid.update(x, real=False)}, len(x), rounds, device)
    return {"feature_extractor": fid.feature_name, "images": len(x), "size": list(x.shape[-2:]),
            "images_per_s": rates["fid"]["images_per_s"], "all_rounds_s": rates["fid"]["all_rounds_s"]}


def protocol_share(generation_rate: float, measure_rate: float, generated: int, measured: int) -> float:
    """Share of a protocol's wall time spent measuring: `measured` images at `measure_rate` after
    `generated` images at `generation_rate` (loading and writing files left out)."""
    measuring = measured / measure_rate
    return measuring / (generated / generation_rate + measuring)


def step_flops(run_steps: Callable[[int], None]) -> float:
    """FLOPs of one unlearning step: `run_steps(k)` runs a whole unlearning run of k steps; the
    count of a 2-step run minus that of a 1-step run leaves out setup, data and saving, which
    both runs do alike."""
    from torch.utils.flop_counter import FlopCounterMode

    counts = []
    for k in (1, 2):
        with FlopCounterMode(display=False) as counter:
            run_steps(k)
        counts.append(counter.get_total_flops())
    if counts[1] <= counts[0]:
        raise EraseError("the FLOP counter saw no work in an unlearning step")
    return float(counts[1] - counts[0])


def mfu_row(method: str, flops: float, seconds_per_step: float, peak: tuple[str, float] | None) -> dict:
    achieved = flops / seconds_per_step / 1e12
    row = {"method": method, "tflops_per_step": flops / 1e12, "seconds_per_step": seconds_per_step,
           "achieved_tflops": achieved, "peak_tflops": None, "mfu": None}
    if peak is not None:
        row |= {"peak_tflops": peak[1], "mfu": achieved / peak[1]}
    logger.info("bench mfu: %s %.3g TFLOP/step, %.3g TFLOP/s%s", method, flops / 1e12, achieved,
                f", MFU {row['mfu']:.1%}" if row["mfu"] is not None else "")
    return row
