"""`erase bench` measures every requested method against finetune and the two CFG variants, side by side."""

import json

import pytest

from erase.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


# sd3-no-t5: SD3 without its T5 encoder, as models/mini-flow ships; the stock pipeline must be told so.
@pytest.mark.parametrize("backbone", ["ddpm", "sd", "sdxl", "sd3", "sd3-no-t5", "flux"])
def test_bench_writes_the_ratio_table(backbone, tiny_ddpm_dir, tiny_sd_dir, tmp_path, monkeypatch):
    from tiny_pipelines import FAMILIES, tiny_sd3_pipeline

    monkeypatch.setenv("ERASE_CACHE", str(tmp_path / "cache"))
    model = {"ddpm": tiny_ddpm_dir, "sd": tiny_sd_dir}.get(backbone)
    if model is None:  # a tiny SDXL, SD3 or FLUX pipeline: the bench runs on every backbone alike
        backbone_cls, build = FAMILIES[backbone.removesuffix("-no-t5")]
        model = tmp_path / backbone
        backbone_cls(tiny_sd3_pipeline(t5=False) if backbone == "sd3-no-t5" else build()).save_pretrained(model)
    forget = ["--forget", "3"] if backbone == "ddpm" else ["--forget", "a photo of a cat", "--images", "2"]
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(model), *forget, "--methods", "eupmu,surgery", "--steps", "2",
                 "--rounds", "2", "--batch-size", "4", "--gen-batch", "2", "--gen-repeats", "1",
                 "--sample-steps", "2", "--gen-batch-sizes", "1,2", "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    rows = {r["method"]: r for r in report["methods"]}
    assert list(rows) == ["finetune", "eupmu", "surgery"]  # finetune first: the reference
    assert rows["finetune"]["vs_finetune"] == 1.0
    for r in rows.values():
        assert len(r["all_rounds_s"]) == 2 and r["seconds_per_step"] == min(r["all_rounds_s"]) > 0
        assert r["vs_finetune"] == pytest.approx(r["seconds_per_step"] / rows["finetune"]["seconds_per_step"])
        assert r["peak_memory_mb"] > 0 and r["batch_size"] == 4
    g = report["generation"]
    assert g["batched_cfg_speedup"] == pytest.approx(
        g["guided_predictions_per_s_batched"] / g["guided_predictions_per_s_separate"])
    assert g["sampler_images_per_s"] > 0
    md = (out / "bench.md").read_text()
    assert "| eupmu |" in md and f"{rows['surgery']['vs_finetune']:.2f}x" in md

    # Against stock diffusers on the same model and settings, each variant timed in every round.
    v = report["generation_vs_stock"]
    from erase.backbones import load_backbone

    reference = ("stock DDIMScheduler loop" if backbone == "ddpm" else
                 f"stock {load_backbone(model).PIPELINE}")  # the model's own diffusers pipeline
    assert v["reference"] == reference and v["variants"][reference]["vs_stock"] == 1.0
    assert "erase" in v["variants"] and (backbone == "ddpm" or "erase eval (I2P/COCO)" in v["variants"])
    for r in v["variants"].values():
        assert len(r["all_rounds_s"]) == 2 and r["images_per_s"] == pytest.approx(v["images"] / min(r["all_rounds_s"]))
    assert report["channels_last"]["speedup"] > 0
    assert 0 < report["nudenet"]["share_of_i2p"] < 1 and report["nudenet"]["images_per_s"] > 0
    assert "| stock" in md and "NudeNet:" in md
    assert set(report["batch_sizes"]["variants"]) == {"batch 1", "batch 2"} and "| batch | images/s |" in md


def _one_round_recording(monkeypatch, model, out, options: list[str], recorded) -> tuple[dict, list]:
    """A one-round bench of eupmu on `model` with `options`: its rows by method, and `recorded(method,
    options)` of every unlearning run it started, in order."""
    import erase.loop

    calls = []
    plain_unlearn = erase.loop.unlearn

    def recording_unlearn(model, method, **options):
        calls.append(recorded(method, options))
        return plain_unlearn(model, method, **options)

    monkeypatch.setattr(erase.loop, "unlearn", recording_unlearn)
    assert main(["bench", "--model", str(model), "--methods", "eupmu", "--steps", "2", "--rounds", "1",
                 "--batch-size", "4", "--gen-batch", "2", "--gen-repeats", "1", "--sample-steps", "2",
                 "--gen-images", "2", "--nudenet-images", "0", "--no-channels-last", *options, "--out", str(out)]) == 0
    return {r["method"]: r for r in json.loads((out / "bench.json").read_text())["methods"]}, calls


def test_bench_times_robust_erasure_and_sampling_paths_beside_the_plain_method(tiny_ddpm_dir, tmp_path, monkeypatch):
    def recorded(method, options):
        terms = options.get("terms") or {}
        return method, terms.get("robust", {}).get("every"), terms.get("retain", {}).get("samples")

    out = tmp_path / "bench"
    rows, calls = _one_round_recording(monkeypatch, tiny_ddpm_dir, out, ["--robust-every", "1", "--paths"], recorded)
    # finetune has no forget condition to perturb: no robust row of it
    assert list(rows) == ["finetune", "eupmu", "eupmu+robust", "finetune+paths", "eupmu+paths"]
    assert calls == [("finetune", None, None), ("eupmu", None, None), ("eupmu", 1, None),
                     ("finetune", None, "paths"), ("eupmu", None, "paths")]  # one round, side by side
    assert rows["eupmu+robust"]["vs_finetune"] == pytest.approx(
        rows["eupmu+robust"]["seconds_per_step"] / rows["finetune"]["seconds_per_step"])
    assert rows["eupmu+paths"]["retain_paths_s"] > 0 and "retain_paths_s" not in rows["eupmu"]
    md = (out / "bench.md").read_text()
    assert "| eupmu+robust |" in md and "| eupmu+paths |" in md and "Drawing the original's sampling paths" in md


def test_stock_ddim_loop_draws_what_the_ddpm_sampler_draws(tiny_ddpm_dir):
    """The DDPM's stock reference does the same work: same noise, UNet calls and scheduler give the same images."""
    import torch

    from erase.backbones import load_backbone
    from erase.bench.generation import stock_ddim_sample

    model = load_backbone(tiny_ddpm_dir)
    labels, seeds = [3, 5, 7, 3], [0, 1, 2, 3]
    ours = model.sample(labels, seeds, steps=3, guidance=3.0, batch_size=4)
    with torch.inference_mode():
        stock = stock_ddim_sample(model.unet, model.scheduler.config, torch.tensor(labels), model.null_class,
                                  model.initial_noise(seeds), steps=3, guidance=3.0)
    torch.testing.assert_close(ours, stock.clamp(-1, 1), rtol=0, atol=1e-5)


def test_mfu_counts_the_flops_of_one_step(tiny_ddpm_dir, tmp_path):
    """FLOPs per step from FlopCounterMode; with a given peak, MFU is achieved over peak."""
    assert main(["bench", "--model", str(tiny_ddpm_dir), "--methods", "eupmu", "--steps", "2", "--rounds", "1",
                 "--batch-size", "4", "--gen-batch", "2", "--gen-repeats", "1", "--gen-images", "2",
                 "--sample-steps", "1", "--nudenet-images", "0", "--channels-last", "false", "--mfu", "true",
                 "--peak-tflops", "2.5", "--out", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    rows = {r["method"]: r for r in report["mfu"]}
    steps = {r["method"]: r["seconds_per_step"] for r in report["methods"]}
    # A step is a forward and a backward pass and more: eupmu also runs the frozen reference and a second forward.
    assert rows["eupmu"]["tflops_per_step"] > rows["finetune"]["tflops_per_step"] > 0
    for m, r in rows.items():
        assert r["seconds_per_step"] == steps[m] and r["peak_tflops"] == 2.5
        assert r["mfu"] == pytest.approx(r["tflops_per_step"] / steps[m] / 2.5)
    assert "| eupmu |" in (tmp_path / "b" / "bench.md").read_text().split("FlopCounterMode")[1]


def test_device_peaks_are_looked_up_by_name(monkeypatch):
    import torch

    from erase.bench.generation import device_peak_tflops

    assert device_peak_tflops(torch.device("cpu")) is None
    for name, peak in (("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H200", 989.4),
                       ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA L40S", 362.1), ("NVIDIA L4", 121.0)):
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device, name=name: name)
        assert device_peak_tflops(torch.device("cuda")) == (name, peak)


def test_bench_refuses_unknown_methods_and_stray_options(tiny_ddpm_dir, tmp_path, capsys):
    assert main(["bench", "--model", str(tiny_ddpm_dir), "--methods", "nope", "--out", str(tmp_path / "b")]) == 2
    assert "unknown method(s) nope" in capsys.readouterr().err
    assert main(["bench", "--model", str(tiny_ddpm_dir), "--resolution", "256", "--out", str(tmp_path / "b")]) == 2
    assert "--resolution applies to --model sd15-random" in capsys.readouterr().err


def test_random_architectures_have_the_published_sizes():
    """sdxl-random and sd3-random are the real architectures (parameter counts of SDXL base 1.0's UNet
    and SD3 medium's transformer), built with empty weights so that the check takes no memory."""
    from accelerate import init_empty_weights

    from erase.bench.models import sd3_random_pipeline, sdxl_random_pipeline

    with init_empty_weights():
        sdxl, sd3 = sdxl_random_pipeline(), sd3_random_pipeline()
    assert sum(p.numel() for p in sdxl.unet.parameters()) == 2_567_463_684
    assert sum(p.numel() for p in sd3.transformer.parameters()) == 2_028_328_000
    assert sd3.text_encoder_3 is None and sdxl.unet.config.sample_size == sd3.transformer.config.sample_size == 128


def test_compile_effect_times_compiled_against_eager_and_restores_eager(tiny_ddpm_dir):
    """torch.compile's effect on sampling: both variants timed, the images close to eager's, and the
    backbone's denoiser left eager for what is measured next."""
    import torch

    from erase.backbones import load_backbone
    from erase.bench.generation import compile_effect

    model = load_backbone(tiny_ddpm_dir)
    before = model.sample([3, 5], [0, 1], steps=2, guidance=3.0, batch_size=2)
    effect = compile_effect(model, n=2, batch_size=2, steps=2, guidance=3.0, rounds=1, device=torch.device("cpu"))
    assert set(effect["variants"]) == {"eager", "torch.compile"} and effect["speedup"] > 0
    assert effect["compile_s"] >= 0 and effect["max_abs_image_difference"] < 1e-2
    assert model.denoiser._compiled_call_impl is None
    torch.testing.assert_close(model.sample([3, 5], [0, 1], steps=2, guidance=3.0, batch_size=2), before,
                               rtol=0, atol=0)


def test_batch_size_effect_times_every_batch_on_the_same_images(tiny_ddpm_dir):
    import torch

    from erase.backbones import load_backbone
    from erase.bench.generation import batch_size_effect

    effect = batch_size_effect(load_backbone(tiny_ddpm_dir), n=5, batch_sizes=(2, 3), steps=2, guidance=3.0,
                               rounds=2, device=torch.device("cpu"))
    assert effect["images"] == 6  # rounded up to a multiple of both: no variant pays for padding
    assert set(effect["variants"]) == {"batch 2", "batch 3"}
    assert max(r["vs_fastest"] for r in effect["variants"].values()) == 1.0
    for r in effect["variants"].values():
        assert len(r["all_rounds_s"]) == 2 and r["images_per_s"] == pytest.approx(6 / min(r["all_rounds_s"]))
    assert effect["chosen_without_a_batch_size"] == 64  # a CPU keeps the protocols' CPU batch


def test_bench_times_lora_beside_full_fine_tuning(tiny_ddpm_dir, tmp_path, monkeypatch):
    out = tmp_path / "bench"
    rows, calls = _one_round_recording(monkeypatch, tiny_ddpm_dir, out, ["--lora-rank", "2"],
                                       lambda method, options: (method, options.get("lora_rank")))
    assert list(rows) == ["finetune", "eupmu", "finetune+lora2", "eupmu+lora2"]
    assert calls == [("finetune", None), ("eupmu", None), ("finetune", 2), ("eupmu", 2)]  # one round, side by side
    assert rows["eupmu+lora2"]["peak_memory_mb"] > 0
    assert "| eupmu+lora2 |" in (out / "bench.md").read_text()
