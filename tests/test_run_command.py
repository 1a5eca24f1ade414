"""A run's record holds the `erase unlearn` command that makes it (the command line as given, or the
equivalent of a run started from Python), and the report shows it without the method registry."""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from erase.cli import main
from erase.eval.protocols import DigitsClass
from erase.eval.report import build_report
from erase.loop import unlearn


def recorded(model: Path) -> dict:
    return json.loads((model / "erase_config.json").read_text())


@pytest.fixture(scope="module")
def python_run(tmp_path_factory, tiny_ddpm_dir, tiny_classifier_dir):
    """A ga run started from Python (no command line recording), and its evaluation."""
    root = tmp_path_factory.mktemp("runs")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model = unlearn(tiny_ddpm_dir, "ga", "3", root / "models" / "ga", steps=3, batch_size=4, lr=2e-3,
                        retain="1,2", progress=False)
        DigitsClass(forget=3, classifier=str(tiny_classifier_dir), n=3, steps=2, batch_size=8,
                    fid_bootstrap=0).run(model, root / "eval")
    finally:
        torch.set_num_threads(before)
    return Path(model), root / "eval"


def test_a_run_from_python_records_the_command_that_makes_the_same_model(python_run, tmp_path, one_thread):
    model, _ = python_run
    command = shlex.split(recorded(model)["command"])
    assert command[:2] == ["erase", "unlearn"]
    given = dict(zip(command[2::2], command[3::2]))
    assert given["--method"] == "ga" and given["--forget"] == "3" and given["--retain"] == "1,2"
    assert given["--steps"] == "3" and float(given["--lr"]) == 2e-3 and given["--out"] == str(model.resolve())
    assert recorded(model)["recipe_name"] == "ga" and recorded(model)["target"] == "forget"
    # Run as it is recorded (into another folder), the command makes the same weights.
    command[command.index("--out") + 1] = str(tmp_path / "again")
    assert main(command[1:]) == 0
    ours, again = load_file(model / "delta.safetensors"), load_file(tmp_path / "again" / "delta.safetensors")
    assert ours.keys() == again.keys() and ours
    assert all(torch.equal(ours[k], again[k]) for k in ours)
    # The command line records itself, as given.
    assert shlex.split(recorded(tmp_path / "again")["command"])[:4] == ["erase", "unlearn", "--model", given["--model"]]


def test_a_run_of_python_objects_records_no_command_it_cannot_honour(tiny_ddpm_dir, tmp_path, one_thread):
    """Terms on a single method have no command line of their own (a recipe file holds them)."""
    out = unlearn(tiny_ddpm_dir, "ga", "3", tmp_path / "ga", steps=1, batch_size=4, progress=False,
                  terms={"average": {"decay": 0.9}})
    assert "command" not in recorded(Path(out))


def test_the_report_shows_the_recorded_command_without_importing_the_methods(python_run, tmp_path):
    model, run = python_run
    # An older record without a command: a plain description instead.
    old_model, old_run = tmp_path / "old-model", tmp_path / "old-run"
    shutil.copytree(model, old_model)
    shutil.copytree(run, old_run)
    record = recorded(old_model)
    del record["command"]
    (old_model / "erase_config.json").write_text(json.dumps(record))
    metrics = json.loads((old_run / "metrics.json").read_text())
    (old_run / "metrics.json").write_text(json.dumps({**metrics, "model": str(old_model)}))

    code = ("import sys\nfrom erase.eval.report import build_report\n"
            f"md = build_report([{str(run)!r}, {str(old_run)!r}], {str(tmp_path / 'report')!r})[0].read_text()\n"
            "print(md)\nprint(sorted(m for m in sys.modules if m.startswith('erase.methods')))\n")
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert shown.returncode == 0, shown.stderr[-3000:]
    md, imported = shown.stdout.rstrip().rsplit("\n", 1)
    assert imported == "[]"  # the report never imported the method registry
    assert "`erase unlearn --model " in md and "--forget 3 --method ga" in md and "--retain 1,2" in md
    assert "method ga on " in md and "forget three, seed 0 (no command recorded)" in md
    # The same report built in this process agrees.
    assert "--method ga" in build_report([run], tmp_path / "report-here")[0].read_text()
