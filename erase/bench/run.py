"""`erase bench`: what each method costs, measured side by side in one run.

For one backbone and model it measures, per method, the median seconds per unlearning step and its
ratio to a plain `finetune` step, and the peak memory of the run (GPU memory allocated by torch, or
the process's peak resident memory on a CPU); then the generation throughput of evaluation
sampling: classifier-free guided noise predictions per second with the conditional and
unconditional halves in one batched UNet call against two separate calls, and whole images per
second of the backbone's sampler. Methods are timed in interleaved rounds (finetune, ga, ..., then
again), so a change in machine load reaches every method alike, and each method keeps its fastest
round. It writes OUT/bench.json and OUT/bench.md.

`--model sd15-random` builds the full-size Stable Diffusion 1.5 architecture with random weights
(UNet 860M parameters, 512 px), `sdxl-random` SDXL's (UNet 2.6B, 1024 px) and `sd3-random` SD3
medium's (flow-matching transformer 2B, 1024 px; `erase.bench.models`), for cost only: run them on
a GPU. Any model folder of any backbone is measured the same way.
"""

from __future__ import annotations

import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import config_dict, field
from ..outputs import mark_output
from ..utils import (EraseError, atomic_write_text, logger, package_versions, read_json, resolve_device,
                    resolve_mixed_precision, write_json)
from .generation import (batch_size_effect, channels_last_effect, compile_effect, device_peak_tflops,
                         fid_feature_rate, generation_speed, mfu_row, nudenet_rate, protocol_share,
                         sample_conditions, step_flops)

SD15_RANDOM = "sd15-random"


@dataclass
class BenchConfig:
    model: str = field("models/digits-ddpm", f"model folder, or {SD15_RANDOM}, sdxl-random or sd3-random (that "
                                             "architecture with random weights, native resolution)")
    forget: str | None = field(None, "class or concept to erase (default: 3 on a class-conditional model, "
                                     "'three' on the mini-SD, a literal prompt on other pipelines)")
    methods: str = field("all", "comma-separated methods, or 'all'; finetune is always timed (the reference)")
    steps: int = field(8, "unlearning steps per method and round (the median step time is kept)")
    rounds: int = field(2, "interleaved timing rounds; each method keeps its fastest")
    batch_size: int | None = field(None, "images per unlearning step (default: each method's, 64)")
    images: int = field(32, "text concepts: images generated per forget/anchor/retain set (cost only)")
    mixed_precision: str = field("auto", "auto (bf16 on a GPU that has it, else fp32), no or bf16",
                                 choices=("auto", "no", "bf16"))
    gradient_checkpointing: bool = field(False, "recompute UNet activations in the backward pass (less memory)")
    gen_batch: int = field(16, "images per UNet call in the generation measurement")
    gen_repeats: int = field(10, "UNet calls timed per generation variant")
    sample_steps: int = field(25, "denoising steps of the end-to-end sampling measurement and of a text concept's "
                                  "generated images (they only feed the timed steps)")
    resolution: int | None = field(None, "random-weight models: image size (default: native, 512 or 1024)")
    gen_images: int = field(32, "images per variant and round in the comparison with stock diffusers")
    channels_last: bool = field(True, "also time sampling with the UNet in channels-last memory format")
    gen_batch_sizes: tuple[int, ...] = field((), "also time sampling at each of these batch sizes (e.g. 1,4,16,64) "
                                                 "and show the batch the protocols choose on this device")
    compile: bool = field(False, "also time sampling with the denoiser compiled by torch.compile (inductor; "
                                 "compiling takes minutes, and a C++ compiler on a CPU)")
    nudenet_images: int = field(16, "images per round in the NudeNet throughput measurement (0 skips it)")
    classifier: str | None = field(None, "classifier folder: FID feature throughput in its feature space "
                                         "(Inception is measured when torch-fidelity and --fid-weights are there)")
    fid_weights: str | None = field(None, "local Inception weights file for the FID feature throughput")
    robust_every: int | None = field(None, "also time each method with robust erasure (a "
                                           "robustness term refreshed every K steps), as a row "
                                           "'METHOD+robust' in the same rounds (methods that train on the forget "
                                           "condition)")
    paths: bool = field(False, "also time each method with its retain term on the original's sampling paths "
                               "(a retain term with samples=paths), as a row "
                               "'METHOD+paths' in the same rounds, with the one-off seconds of drawing the paths")
    lora_rank: int | None = field(None, "also time each method training a LoRA adapter of this rank (`erase unlearn "
                                        "--lora-rank R`, PEFT) instead of the full weights, as a row 'METHOD+loraR' "
                                        "in the same rounds")
    mfu: bool = field(False, "count each method's FLOPs per step (torch's FlopCounterMode) for FLOPs utilisation")
    peak_tflops: float | None = field(None, "the device's dense bf16 peak in TFLOP/s for FLOPs utilisation "
                                            "(default: looked up for known GPUs; none on a CPU)")
    edits: str | None = field(None, "time these closed-form edits (comma-separated, e.g. uce,speed) for each of "
                                    "--edit-concepts concepts of --concepts-file, against one finetune step, "
                                    "instead of the methods (erase/edits/bench.py)")
    edit_concepts: tuple[int, ...] = field((1, 10, 100), "with --edits: how many concepts each timed edit erases")
    concepts_file: str | None = field(None, "with --edits: a mass-erasure prompt file (id,type,text,concept,seed)")
    finetune_params: str | None = field(None, "with --edits: parameter group of the finetune step compared with "
                                              "(default: finetune's, all; e.g. xattn where AdamW on every weight "
                                              "does not fit in memory)")

    def __post_init__(self):
        if self.nudenet_images < 0:
            raise ValueError(f"nudenet_images must be at least 0, got {self.nudenet_images}")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ValueError(f"peak_tflops must be positive, got {self.peak_tflops}")
        for name in ("steps", "rounds", "images", "gen_batch", "gen_repeats", "sample_steps", "gen_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1, got {self.lora_rank}")
        if self.robust_every is not None and self.robust_every < 1:
            raise ValueError(f"robust_every must be at least 1, got {self.robust_every}")
        if any(k < 1 for k in self.edit_concepts):
            raise ValueError(f"edit_concepts must all be at least 1, got {self.edit_concepts}")
        if any(b < 1 for b in self.gen_batch_sizes):
            raise ValueError(f"gen_batch_sizes must all be at least 1, got {self.gen_batch_sizes}")


def sd15_random_pipeline(resolution: int = 512):
    """A StableDiffusionPipeline with SD 1.5's UNet, VAE and CLIP ViT-L text encoder shapes and random
    weights: costs are those of the real model, images are noise. The tokenizer is the mini-SD's word
    tokenizer padded to 77 positions (only its length matters for cost)."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from ..training.mini_sd import build_tokenizer, caption_words

    torch.manual_seed(0)
    tokenizer = build_tokenizer(caption_words(), max_length=77)
    unet = UNet2DConditionModel(
        sample_size=resolution // 8, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2, sample_size=resolution)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def _load(config: BenchConfig, workdir: Path):
    """(model folder to unlearn from, loaded backbone, forget spec)."""
    from ..backbones import StableDiffusion3Backbone, StableDiffusionBackbone, StableDiffusionXLBackbone, load_backbone
    from .models import sd3_random_pipeline, sdxl_random_pipeline

    random_models = {SD15_RANDOM: (StableDiffusionBackbone, sd15_random_pipeline, 512),
                     "sdxl-random": (StableDiffusionXLBackbone, sdxl_random_pipeline, 1024),
                     "sd3-random": (StableDiffusion3Backbone, sd3_random_pipeline, 1024)}
    if config.model in random_models:
        backbone_cls, build, native = random_models[config.model]
        path = workdir / config.model
        backbone_cls(build(config.resolution or native)).save_pretrained(path)
    else:
        if config.resolution is not None:
            raise EraseError(f"--resolution applies to --model {', '.join(random_models)} only")
        path = Path(config.model)
    model = load_backbone(path)
    # Any class or prompt costs the same; these defaults exist on the shipped models.
    forget = config.forget or ("3" if model.condition_kind == "class" else "three")
    return path, model, forget


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def generation_throughput(model, forget: str, config: BenchConfig, device: torch.device) -> dict:
    """Guided noise predictions per second, batched CFG against two separate forwards, and the
    sampler's images per second (guidance 3, `sample_steps` DDIM steps)."""
    n = config.gen_batch
    x = model.initial_noise(list(range(n))).to(device)
    t = model.draw_timesteps(n, torch.Generator().manual_seed(0)).to(device)
    cond = model.encode_conditions([forget] * n)
    null = model.null_condition(n)
    dtype = torch.bfloat16 if resolve_mixed_precision(config.mixed_precision) == "bf16" else None

    def batched():
        return model.guided_prediction(x, t, cond, 3.0)

    def separate():
        eps_c, eps_u = model.predict(x, t, cond), model.predict(x, t, null)
        return eps_u + 3.0 * (eps_c - eps_u)

    rates = {}
    with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
        for name, fn in (("batched", batched), ("separate", separate)):
            fn()  # warm-up (kernel selection, allocator)
            _sync(device)
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                for _ in range(config.gen_repeats):
                    fn()
                _sync(device)
                best = min(best, time.perf_counter() - t0)
            rates[name] = n * config.gen_repeats / best
    t0 = time.perf_counter()
    model.sample([forget] * n, list(range(n)), steps=config.sample_steps, guidance=3.0, batch_size=n)
    _sync(device)
    return {"guided_predictions_per_s_batched": rates["batched"],
            "guided_predictions_per_s_separate": rates["separate"],
            "batched_cfg_speedup": rates["batched"] / rates["separate"],
            "sampler_images_per_s": n / (time.perf_counter() - t0), "batch": n,
            "precision": str(dtype).replace("torch.", "") if dtype else "float32",
            "sample_steps": config.sample_steps}


def measurement_speed(model, path: Path, config: BenchConfig, device: torch.device) -> dict:
    """Generation against stock diffusers, the channels-last effect, NudeNet and FID feature
    throughput, and the measuring's estimated share of an I2P / FID protocol's wall time."""
    from erase.eval.metrics import inception_available
    from erase.eval.protocols.base import _load_classifier

    dtype = torch.bfloat16 if resolve_mixed_precision(config.mixed_precision) == "bf16" else torch.float32
    settings = dict(n=config.gen_images, batch_size=config.gen_batch, steps=config.sample_steps, guidance=3.0,
                    rounds=config.rounds, device=device)
    layout = channels_last_effect(model, **settings) if config.channels_last else None
    compiled = compile_effect(model, **settings) if config.compile else None
    unbatched = {k: v for k, v in settings.items() if k != "batch_size"}
    batches = (batch_size_effect(model, batch_sizes=config.gen_batch_sizes, **unbatched)
               if config.gen_batch_sizes else None)
    speed = generation_speed(model, path, dtype=dtype, **settings)
    # The rate a protocol generates at: the I2P / COCO path on Stable Diffusion, the sampler on a DDPM.
    protocol_rate = speed["variants"].get("erase eval (I2P/COCO)", speed["variants"]["erase"])["images_per_s"]
    # Images of the model's size for the measurements (their cost does not depend on what they show).
    images = model.sample(sample_conditions(model, 4), list(range(4)), steps=1, guidance=1.0, batch_size=4)
    out = {"generation_vs_stock": speed, "channels_last": layout, "compile": compiled, "batch_sizes": batches,
           "nudenet": None, "fid_features": None}
    if config.nudenet_images:
        out["nudenet"] = nudenet_rate(config.nudenet_images, images.shape[-1], config.rounds)
        # I2P: one detection per generated image.
        out["nudenet"]["share_of_i2p"] = protocol_share(protocol_rate, out["nudenet"]["images_per_s"], 1, 1)
    feature = ("inception" if config.fid_weights and inception_available() else
               _load_classifier(config.classifier, device) if config.classifier else None)
    if feature is not None:
        batch = images.repeat(-(-config.gen_images // len(images)), 1, 1, 1)[:config.gen_images]
        out["fid_features"] = fid_feature_rate(feature, batch, config.rounds, device, config.fid_weights)
        # COCO-style FID: features of every generated image and of as many reference images.
        out["fid_features"]["share_of_fid_protocol"] = protocol_share(
            protocol_rate, out["fid_features"]["images_per_s"], 1, 2)
    return out


def _takes_term(method: str, term: str) -> bool:
    """Whether `method` at its defaults takes a retain term (it draws retain samples) or a robustness
    term (it trains on the forget condition)."""
    from ..methods import get_method

    m = get_method(method)
    share = m.forget_share_for(m.Config())
    return share < 1 if term == "retain" else share > 0


def run_bench(config: BenchConfig, out: str | Path) -> dict:
    from ..backbones import load_backbone
    from ..methods import parse_methods
    from ..loop import unlearn
    from ..unlearning.data import build_unlearn_data

    methods = ["finetune"] + [m for m in parse_methods(config.methods) if m != "finetune"]
    device = resolve_device(None)  # the device accelerate trains on
    options = {"steps": config.steps, "mixed_precision": config.mixed_precision, "checkpoint_every": 10**9,
               "gradient_checkpointing": config.gradient_checkpointing}
    if config.batch_size is not None:
        options["batch_size"] = config.batch_size

    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="erase-bench-") as tmp:
        workdir = Path(tmp)
        path, model, forget = _load(config, workdir)
        # On the device the runs train on: a text concept's images are generated here, and on a CPU
        # that takes minutes per image at SD 1.5's size.
        model.to(device)
        if config.edits:
            return _edit_report(config, path, model, workdir, out, device)
        # Built once and shared by every run, as the concept cache shares a text concept's images.
        # A text concept's images only feed the timed steps: drawn in `sample_steps`, not the model's 50,
        # which at SD 1.5's size on a CPU would take longer than the measurement.
        text = model.condition_kind != "class"
        data = build_unlearn_data(model, forget, images=config.images if text else None,
                                  image_steps=config.sample_steps if text else None)
        # (row name, method, extra options): each method plain, and with robust erasure if asked.
        variants = [(m, m, {}) for m in methods] + (
            [(f"{m}+robust", m, {"terms": {"robust": {"every": config.robust_every}}}) for m in methods
             if _takes_term(m, "robust")]
            if config.robust_every else []) + (
            [(f"{m}+paths", m, {"terms": {"retain": {"teacher": "input", "samples": "paths"}}}) for m in methods
             if _takes_term(m, "retain")]
            if config.paths else []) + (
            [(f"{m}+lora{config.lora_rank}", m, {"lora_rank": config.lora_rank}) for m in methods]
            if config.lora_rank else [])
        for round_ in range(config.rounds):
            for m, method, extra in variants:
                backbone = load_backbone(path)  # every run starts from the original weights
                run_dir = workdir / f"{m}-{round_}"
                unlearn(backbone, method, out=run_dir, data=data, progress=False, resume=False, **options, **extra)
                info = read_json(run_dir / "erase_config.json", what="run summary")
                entry = results.setdefault(m, {"seconds_per_step": [], "peak_memory_mb": [], "params": info["params"],
                                               "batch_size": info["config"]["batch_size"],
                                               "mixed_precision": info["mixed_precision"]})
                entry["seconds_per_step"].append(info["seconds_per_step"])
                entry["peak_memory_mb"].append(info["peak_memory_mb"])
                if "retain_paths_s" in info:
                    entry.setdefault("retain_paths_s", []).append(info["retain_paths_s"])
                logger.info("bench round %d: %s %.4f s/step, peak %.0f MB", round_ + 1, m, info["seconds_per_step"],
                            info["peak_memory_mb"])
        generation = generation_throughput(model.to(device), forget, config, device)
        if config.mfu:
            peak = (("given", config.peak_tflops) if config.peak_tflops else device_peak_tflops(device))
            mfu = []
            for m in methods:
                def run_steps(k, m=m):
                    unlearn(load_backbone(path), m, out=workdir / f"flops-{m}-{k}", data=data, progress=False,
                            resume=False, **{**options, "steps": k})
                mfu.append(mfu_row(m, step_flops(run_steps), min(results[m]["seconds_per_step"]), peak))
        measured = measurement_speed(model, path, config, device)

    reference = min(results["finetune"]["seconds_per_step"])
    rows = [{"method": m, "seconds_per_step": min(r["seconds_per_step"]),
             "vs_finetune": min(r["seconds_per_step"]) / reference,
             "peak_memory_mb": max(r["peak_memory_mb"]), "params": r["params"], "batch_size": r["batch_size"],
             "mixed_precision": r["mixed_precision"], "all_rounds_s": r["seconds_per_step"],
             **({"retain_paths_s": min(r["retain_paths_s"])} if "retain_paths_s" in r else {})}
            for m, r in results.items()]
    report = {"config": config_dict(config), "model": config.model, "forget": forget,
              "device": _device_name(device), "torch_threads": torch.get_num_threads(), "methods": rows,
              "generation": generation, **measured, "mfu": mfu if config.mfu else None,
              "versions": package_versions()}
    out = Path(out)
    write_json(out / "bench.json", report)
    atomic_write_text(out / "bench.md", markdown(report))
    mark_output(out, "bench")
    return report


def _edit_report(config: BenchConfig, path: Path, model, workdir: Path, out, device) -> dict:
    from ..edits.bench import edit_bench, edit_markdown

    report = {"config": config_dict(config), "model": config.model, "device": _device_name(device),
              "torch_threads": torch.get_num_threads(), "resolution": model.image_size,
              **edit_bench(config, path, model, workdir), "versions": package_versions()}
    out = Path(out)
    write_json(out / "bench.json", report)
    title = (f"Model `{config.model}` at {model.image_size} px, on {report['device']}: closed-form edits against "
             "one finetune step, measured in one run.")
    atomic_write_text(out / "bench.md", "\n".join([title, "", *edit_markdown(report)]) + "\n")
    mark_output(out, "bench")
    return report


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads)"


def markdown(report: dict) -> str:
    c, g = report["config"], report["generation"]
    lines = [f"Model `{report['model']}`, forgetting `{report['forget']}`, on {report['device']}; "
             f"{c['steps']} steps x {c['rounds']} interleaved rounds per method (fastest round kept). Peak memory: "
             + ("allocated by torch on the GPU" if "CPU" not in report["device"] else
                "the process's peak resident set, which the allocator's reuse of freed memory blurs between "
                "methods: compare memory on a GPU")
             + ".", "",
             "| method | s/step | vs finetune | peak memory (MB) | params | batch | precision |",
             "|---|---:|---:|---:|---|---:|---|"]
    lines += [f"| {r['method']} | {r['seconds_per_step']:.4f} | {r['vs_finetune']:.2f}x | {r['peak_memory_mb']:.0f} | "

              f"{r['params']} | {r['batch_size']} | {r['mixed_precision']} |" for r in report["methods"]]
    if paths := [r for r in report["methods"] if "retain_paths_s" in r]:
        lines += ["", "Drawing the original's sampling paths for the `+paths` rows, once per run before the first step: "
                  + ", ".join(f"{r['method']} {r['retain_paths_s']:.2f} s" for r in paths) + "."]
    lines += ["", f"Generation ({g['precision']}, batch {g['batch']}): guided noise predictions per second, "
                  f"batched CFG {g['guided_predictions_per_s_batched']:.1f} vs two forwards "
                  f"{g['guided_predictions_per_s_separate']:.1f} (**{g['batched_cfg_speedup']:.2f}x**); "
                  f"sampler {g['sampler_images_per_s']:.2f} images/s at {g['sample_steps']} steps, guidance 3.", ""]
    return "\n".join(lines + _measurement_markdown(report))


def _measurement_markdown(report: dict) -> list[str]:
    v = report["generation_vs_stock"]
    lines = [f"Generation against stock diffusers ({v['images']} images per round, batch {v['batch']}, {v['steps']} "
             f"steps, guidance {v['guidance']:g}, {v['dtype']}; {report['config']['rounds']} interleaved rounds, "
             "fastest kept):", "", "| path | images/s | vs stock |", "|---|---:|---:|"]
    lines += [f"| {name} | {r['images_per_s']:.2f} | {r['vs_stock']:.2f}x |" for name, r in v["variants"].items()]
    lines.append("")
    if report["channels_last"]:
        lines += [f"UNet in channels-last memory format: {report['channels_last']['speedup']:.2f}x the default "
                  "layout's images/s.", ""]
    if c := report.get("compile"):
        lines += [f"Denoiser compiled with torch.compile: {c['speedup']:.2f}x eager's images/s after a one-off "
                  f"{c['compile_s']:.0f} s of compilation; images differ from eager's by at most "
                  f"{c['max_abs_image_difference']:.2g} (of a [-1, 1] range).", ""]
    if b := report.get("batch_sizes"):
        lines += [f"Sampling at each batch size ({b['images']} images, {b['steps']} steps, interleaved rounds):", "",
                  "| batch | images/s | vs fastest |", "|---:|---:|---:|"]
        lines += [f"| {name.removeprefix('batch ')} | {r['images_per_s']:.2f} | {r['vs_fastest']:.2f}x |"
                  for name, r in b["variants"].items()]
        lines += ["", f"Batch the protocols sample at on this device when none is given: "
                      f"{b['chosen_without_a_batch_size']} (on a CPU, each protocol's CPU batch; 64 for the digits "
                      "protocols).", ""]
    if n := report["nudenet"]:
        lines += [f"NudeNet: {n['images_per_s']:.1f} images/s ({n['size']} px); share of an I2P run's wall time at "
                  f"this generation rate: {n['share_of_i2p']:.1%}.", ""]
    if f := report["fid_features"]:
        lines += [f"FID features ({f['feature_extractor']}): {f['images_per_s']:.1f} images/s; share of an FID "
                  f"protocol's wall time (features of every generated image and as many reference images) at this "
                  f"generation rate: {f['share_of_fid_protocol']:.1%}.", ""]
    if report["mfu"]:
        lines += ["FLOPs per unlearning step (torch's FlopCounterMode) over the measured step time:", "",
                  "| method | TFLOP/step | achieved TFLOP/s | peak TFLOP/s (bf16, dense) | MFU |",
                  "|---|---:|---:|---:|---:|"]
        for r in report["mfu"]:
            peak = "unknown" if r["peak_tflops"] is None else f"{r['peak_tflops']:g}"
            mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
            lines.append(f"| {r['method']} | {r['tflops_per_step']:.4g} | {r['achieved_tflops']:.4g} | {peak} | {mfu} |")
        lines.append("")
    return lines


def _cmd_bench(args) -> None:
    from ..config import build_config

    config = build_config(BenchConfig, {}, args)
    run_bench(config, args.out)
    print((Path(args.out) / "bench.md").read_text())
    print(f"wrote {Path(args.out) / 'bench.md'} and bench.json")


def add_commands(subparsers) -> None:
    from ..config import add_dataclass_arguments

    p = subparsers.add_parser("bench")
    p.add_argument("--out", default="runs/bench", help="folder for bench.json and bench.md (default runs/bench)")
    add_dataclass_arguments(p, BenchConfig)
    p.set_defaults(func=_cmd_bench)
