"""`erase bench` measures every requested method against finetune and the two CFG variants, side by side."""

import json

import pytest

from erase.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("backbone", ["ddpm", "sd", "sdxl", "sd3"])
def test_bench_writes_the_ratio_table(backbone, tiny_ddpm_dir, tiny_sd_dir, tmp_path, monkeypatch):
    from tiny_pipelines import FAMILIES

    monkeypatch.setenv("ERASE_CACHE", str(tmp_path / "cache"))
    model = {"ddpm": tiny_ddpm_dir, "sd": tiny_sd_dir}.get(backbone)
    if model is None:  # a tiny SDXL or SD3 pipeline: the bench runs on every backbone alike
        backbone_cls, build = FAMILIES[backbone]
        model = tmp_path / backbone
        backbone_cls(build()).save_pretrained(model)
    forget = ["--forget", "3"] if backbone == "ddpm" else ["--forget", "a photo of a cat", "--images", "2"]
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(model), *forget, "--methods", "eupmu,surgery", "--steps", "2",
                 "--rounds", "2", "--batch-size", "4", "--gen-batch", "2", "--gen-repeats", "1",
                 "--sample-steps", "2", "--out", str(out)]) == 0
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


def test_bench_refuses_unknown_methods_and_stray_options(tiny_ddpm_dir, tmp_path, capsys):
    assert main(["bench", "--model", str(tiny_ddpm_dir), "--methods", "nope", "--out", str(tmp_path / "b")]) == 2
    assert "unknown method(s) nope" in capsys.readouterr().err
    assert main(["bench", "--model", str(tiny_ddpm_dir), "--resolution", "256", "--out", str(tmp_path / "b")]) == 2
    assert "--resolution applies to --model sd15-random" in capsys.readouterr().err


def test_random_architectures_have_the_published_sizes():
    """sdxl-random and sd3-random are the real architectures (parameter counts of SDXL base 1.0's UNet
    and SD3 medium's transformer), built with empty weights so that the check takes no memory."""
    from accelerate import init_empty_weights

    from erase.bench_models import sd3_random_pipeline, sdxl_random_pipeline

    with init_empty_weights():
        sdxl, sd3 = sdxl_random_pipeline(), sd3_random_pipeline()
    assert sum(p.numel() for p in sdxl.unet.parameters()) == 2_567_463_684
    assert sum(p.numel() for p in sd3.transformer.parameters()) == 2_028_328_000
    assert sd3.text_encoder_3 is None and sdxl.unet.config.sample_size == sd3.transformer.config.sample_size == 128
