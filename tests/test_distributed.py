"""Data-parallel training and sharded evaluation through `accelerate launch`, on two CPU processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from erase.cli import main
from erase.unlearn import check_in_sync
from erase.utils import EraseError

REPO = Path(__file__).resolve().parent.parent
ACCELERATE = Path(sys.executable).parent / "accelerate"


def launch(*args: str) -> subprocess.CompletedProcess:
    # --multi_gpu starts N processes even without GPUs; the code joins them in a gloo group on the CPU.
    return subprocess.run([str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29521",
                           "-m", "erase.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


@pytest.mark.skipif(not ACCELERATE.exists(), reason="accelerate's launcher is not installed next to this Python")
def test_two_process_unlearn_and_eval(tmp_path, tiny_ddpm_dir, tiny_classifier_dir):
    model = tmp_path / "erased"
    run = launch("unlearn", "--model", str(tiny_ddpm_dir), "--method", "eupmu", "--forget", "3", "--steps", "3",
                 "--batch-size", "8", "--out", str(model))
    assert run.returncode == 0, run.stderr[-3000:]
    summary = json.loads((model / "erase_config.json").read_text())
    assert summary["processes"] == 2
    # The run got past check_in_sync (both processes hold the same weights) and the weights moved.
    delta = load_file(model / "delta.safetensors")
    assert delta and all(torch.isfinite(t).all() for t in delta.values())

    args = ["eval", "--model", str(model), "--protocol", "digits-class", "--forget", "3",
            "--classifier", str(tiny_classifier_dir), "--n", "4", "--n-forget", "3", "--steps", "2",
            "--batch-size", "4"]
    two = launch(*args, "--out", str(tmp_path / "two"))
    assert two.returncode == 0, two.stderr[-3000:]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    one_m, two_m = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert (one_m["processes"], two_m["processes"]) == (1, 2)
    assert two_m["metrics"]["ua"] == one_m["metrics"]["ua"]
    assert two_m["metrics"]["per_class_accuracy"] == one_m["metrics"]["per_class_accuracy"]
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one" / "images").rglob("*.png"))
    assert len(files) == 3 + 9 * 4
    assert all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in files)


class _Gathers:
    """An accelerator stand-in whose processes report the given weight checksums."""

    num_processes = 2

    def __init__(self, sums):
        self.sums = torch.tensor(sums, dtype=torch.float64)

    def gather(self, _):
        return self.sums


def test_processes_out_of_sync_are_refused():
    params = {"w": torch.nn.Parameter(torch.ones(3))}
    check_in_sync(_Gathers([3.0, 3.0]), params)
    with pytest.raises(EraseError, match="out of sync"):
        check_in_sync(_Gathers([3.0, 3.5]), params)
