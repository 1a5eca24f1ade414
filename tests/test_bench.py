"""`erase bench` measures every requested method against finetune and the two CFG variants, side by side."""

import json

import pytest

from erase.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("backbone", ["ddpm", "sd"])
def test_bench_writes_the_ratio_table(backbone, tiny_ddpm_dir, tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path / "cache"))
    model = tiny_ddpm_dir if backbone == "ddpm" else tiny_sd_dir
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
