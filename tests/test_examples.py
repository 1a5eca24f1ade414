"""The example scripts run (on tiny models, shortened)."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_erase_nudity_example_runs_on_a_tiny_pipeline(tmp_path, tiny_sd_dir):
    """The README's SD recipe end to end with the model given by its Hub id, as the README gives it:
    unlearn, evaluate the original by the same id, report. The id resolves offline from a local
    Hugging Face cache that holds a tiny pipeline under that name."""
    from conftest import install_in_hub_cache

    install_in_hub_cache(tmp_path / "hf", "CompVis/stable-diffusion-v1-4", tiny_sd_dir)
    csv_path = tmp_path / "i2p.csv"
    with csv_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "categories", "nudity_percentage", "evaluation_seed", "evaluation_guidance"])
        w.writerows([("a body", "sexual", 80, 5, 9), ("a beach", "sexual", 55, 7, 12), ("a street", "violence", 0, 6, 3)])
    out = tmp_path / "run"
    done = subprocess.run([sys.executable, "examples/erase_nudity_sd.py", "--model", "CompVis/stable-diffusion-v1-4", "--i2p",
                           str(csv_path), "--out", str(out), "--limit", "2", "--steps", "1", "--images", "2",
                           "--eval-steps", "1"], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "ERASE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
                               "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    for name in ("original", "eupmu", "esd"):
        metrics = json.loads((out / name / "i2p" / "metrics.json").read_text())
        assert metrics["images"] == 2 and metrics["protocol"] == "i2p-nudity"
    assert json.loads((out / "original" / "i2p" / "metrics.json").read_text())["model"] == "CompVis/stable-diffusion-v1-4"
    for method, params in (("eupmu", "all"), ("esd", "noxattn")):
        record = json.loads((out / method / "model" / "erase_config.json").read_text())
        assert record["params"] == params and record["config"]["lr"] == 1e-5
    assert "## Nudity: NudeNet on I2P" in (out / "report" / "report.md").read_text()


def test_bench_digits_driver_aggregates_seeds_through_the_commands(tmp_path, tiny_ddpm_dir, tiny_classifier_dir):
    out = tmp_path / "bench"
    done = subprocess.run([sys.executable, "examples/bench_digits_erasure.py", "--model", str(tiny_ddpm_dir),
                           "--classifier", str(tiny_classifier_dir), "--methods", "original,ga", "--seeds", "0,1",
                           "--unlearn-option=--steps=2", "--unlearn-option=--batch-size=4",
                           "--eval-option=--n=3", "--eval-option=--n-forget=4", "--eval-option=--steps=2",
                           "--eval-option=--fid-bootstrap=10", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    # Each seed went through `erase unlearn --seed s` and `erase eval --seed s`.
    for seed in (0, 1):
        assert json.loads((out / "ga" / f"seed-{seed}" / "model" / "erase_config.json").read_text())["seed"] == seed
        settings = json.loads((out / "ga" / f"seed-{seed}" / "eval" / "metrics.json").read_text())["settings"]
        assert settings["seed"] == seed and settings["n_forget"] == 4
    rows = json.loads((out / "aggregate.json").read_text())
    ua = [json.loads((out / "ga" / f"seed-{s}" / "eval" / "metrics.json").read_text())["metrics"]["ua"] for s in (0, 1)]
    mean, lo, hi = rows["ga"]["ua"]
    assert mean == sum(ua) / 2 and lo <= mean <= hi and rows["ga"]["seeds"] == 2
    assert "ua" in rows["original"] and "neighbour_accuracy" in rows["original"]
    table = (out / "table.md").read_text()
    assert "Produced by `python examples/bench_digits_erasure.py " in table and "protocol `digits-class`" in table
    assert f"| ga | 2 | {100 * mean:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] |" in table
    # The share of the erased class's images that are data, over seeds, beside UA.
    share, lo, hi = rows["ga"]["forget_in_distribution"]
    assert lo <= share <= hi and f"| {100 * share:.1f} [{100 * lo:.1f}, {100 * hi:.1f}] |" in table
    assert (out / "report" / "report.html").is_file()
