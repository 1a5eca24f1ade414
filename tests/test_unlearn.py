"""The unlearning loop and its command line: config round trips, errors, the NaN guard, and forgetting on the shipped model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from erase.backbones import load_backbone
from erase.checkpoint import latest_checkpoint, load_checkpoint
from erase.cli import main
from erase.methods import METHODS
from erase.loop import unlearn
from erase.unlearn_data import class_erasure_data
from erase.utils import EraseError

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "digits-ddpm"
CLASSIFIER = ROOT / "models" / "digits-classifier"


pytestmark = pytest.mark.usefixtures("one_thread")  # fixtures in conftest.py


def test_cli_and_config_file_round_trip(tiny_model, tmp_path):
    out = tmp_path / "cli"
    rc = main(["unlearn", "--model", str(tiny_model), "--method", "eupmu", "--forget", "three", "--out", str(out),
               "--steps", "2", "--batch-size", "8", "--lr", "3e-4", "--w-lr", "0.5", "--seed", "7"])
    assert rc == 0
    info = json.loads((out / "erase_config.json").read_text())
    assert info["config"]["w_lr"] == 0.5 and info["config"]["lr"] == 3e-4 and info["seed"] == 7
    assert info["data"]["forget"] == ["three"] and info["data"]["anchor"] == {"three": "four"}
    assert info["base_model"] == str(tiny_model) and "torch" in info["versions"]
    # The recorded config, given back as --config, reproduces the same model bit for bit.
    (tmp_path / "config.json").write_text(json.dumps(info["config"]))
    again = tmp_path / "again"
    assert main(["unlearn", "--model", str(tiny_model), "--method", "eupmu", "--forget", "3", "--out", str(again),
                 "--config", str(tmp_path / "config.json")]) == 0
    assert json.loads((again / "erase_config.json").read_text())["config"] == info["config"]
    a, b = load_backbone(out).unet.state_dict(), load_backbone(again).unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # Unlearned models are ordinary model folders: `erase sample` takes them.
    assert main(["sample", "--model", str(out), "--classes", "3", "--n", "2", "--steps", "2",
                 "--out", str(tmp_path / "samples")]) == 0


def test_methods_command_lists_every_method(capsys):
    assert main(["methods"]) == 0
    text = capsys.readouterr().out
    for name, method in METHODS.items():
        assert name in text and "arXiv" in method.paper()


def test_nan_guard_stops_a_diverging_run(tiny_model, tmp_path):
    with pytest.raises(EraseError, match=r"ga: .* at step \d+: the run diverged; the last good checkpoint") as e:
        unlearn(tiny_model, "ga", "3", tmp_path / "out", steps=200, lr=1e6, alpha=0.0, batch_size=8,
                checkpoint_every=1, progress=False)
    kept = latest_checkpoint(tmp_path / "out-checkpoints")
    assert kept is not None and str(kept) in str(e.value)
    tensors, _ = load_checkpoint(kept)
    assert all(torch.isfinite(t).all() for t in tensors["params"].values())
    assert not (tmp_path / "out").exists()


def test_loss_history_holds_every_step_and_survives_a_resume(tiny_model, tmp_path):
    options = dict(steps=12, batch_size=4, checkpoint_every=5, progress=False)
    unlearn(tiny_model, "ga", "3", tmp_path / "whole", **options)
    unlearn(tiny_model, "ga", "3", tmp_path / "resumed", stop_after=5, **options)
    unlearn(tiny_model, "ga", "3", tmp_path / "resumed", **options)
    lines = [json.loads(line) for line in (tmp_path / "whole" / "loss_history.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines] == list(range(1, 13))
    final = json.loads((tmp_path / "whole" / "erase_config.json").read_text())["final_losses"]
    assert set(lines[0]) == {"step", *final}
    assert lines[-1]["forget"] != lines[0]["forget"]
    assert (tmp_path / "resumed" / "loss_history.jsonl").read_text() == (tmp_path / "whole" / "loss_history.jsonl").read_text()


def test_report_to_refuses_a_tracker_that_is_not_installed(tiny_model, tmp_path):
    with pytest.raises(EraseError, match="--report-to nosuchtracker: not installed"):
        unlearn(tiny_model, "ga", "3", tmp_path / "out", steps=1, batch_size=4, progress=False,
                report_to="nosuchtracker")


def test_report_to_tensorboard_logs_every_step(tiny_model, tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is optional: pip install tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["unlearn", "--model", str(tiny_model), "--method", "ga", "--forget", "3", "--out", str(tmp_path / "o"),
                 "--steps", "3", "--batch-size", "4", "--report-to", "tensorboard"]) == 0
    events = list((tmp_path / "o-logs").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent)).Reload()
    assert [e.step for e in acc.Scalars("forget")] == [1, 2, 3]


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="nope", forget="3"), "unknown method 'nope'"),
    (dict(method="rl", forget="eleven"), "unknown class 'eleven'"),
    (dict(method="rl", forget="12"), "out of range"),
    (dict(method="esd", forget="3", params="xattn"), "'xattn' does not exist for the class-ddpm backbone"),
    (dict(method="rl", forget="3", retain="3,4"), "both forgotten and retained"),
    (dict(method="rl", forget="3", lr=-1.0), "lr must be positive"),
    (dict(method="mox", forget="3", alpha=0.0), "alpha must be positive"),
    (dict(method="rl", forget="3", w_lr=1.0), "unknown option"),
])
def test_clear_errors(tiny_model, tmp_path, kwargs, message):
    method = kwargs.pop("method")
    forget = kwargs.pop("forget")
    with pytest.raises(EraseError, match=message):
        unlearn(tiny_model, method, forget, tmp_path / "out", steps=1, batch_size=4, progress=False, **kwargs)


def test_cli_reports_errors_without_traceback(tiny_model, tmp_path, capsys):
    rc = main(["unlearn", "--model", str(tiny_model), "--method", "rl", "--forget", "eleven", "--out", str(tmp_path / "o")])
    assert rc == 2 and "unknown class 'eleven'" in capsys.readouterr().err


def test_class_data_defaults(tiny_model):
    model = load_backbone(tiny_model)
    data = class_erasure_data(model, "3,9")
    assert data.description["anchor"] == {"three": "four", "nine": "zero"}
    assert set(data.retain_cond.tensors["class_labels"].tolist()) == {0, 1, 2, 4, 5, 6, 7, 8}
    assert set(data.anchor_cond.tensors["class_labels"].tolist()) == {4, 0} and len(data.anchor_cond) == len(data.forget_x0)
    assert data.forget_x0.shape[1:] == model.image_shape
    data = class_erasure_data(model, "3", retain="0,1", anchor="seven")
    assert set(data.anchor_cond.tensors["class_labels"].tolist()) == {7} and set(data.retain_cond.tensors["class_labels"].tolist()) == {0, 1}


# -- the shipped digits model ------------------------------------------------------------------------

def classifier_accuracy(model, classifier, classes: list[int], n: int) -> float:
    labels = [c for c in classes for _ in range(n)]
    images = model.sample(labels, list(range(len(labels))), steps=25, batch_size=64,
                          guidance=model.sample_defaults["guidance"])
    with torch.no_grad():
        return (classifier(images).argmax(1) == torch.tensor(labels)).float().mean().item()


# Steps of the short run: 40, but gradient ascent needs its default 100 on the shipped model (at 40
# it left every 3 in place: measured on erase 0.2.0's model, BENCHMARKS.md section 1).
SHORT_RUN_STEPS = {"ga": 100}
# MOX at its defaults does not erase digit 3 from erase 0.2.0's model even in 100 steps (UA 3-7%;
# BENCHMARKS.md section 1): a known, measured gap, kept strict so that a fix shows up here.
MOX_MISSES = pytest.mark.xfail(strict=True, reason="mox's defaults do not erase on the 0.2.0 digits model "
                                                   "(BENCHMARKS.md section 1)")


RETAINED = [0, 5, 8]


@pytest.fixture(scope="module")
def shipped_before():
    """The classifier and the shipped model's accuracies on 3 and on the retained digits, measured
    once for every method's case (they depend on the model alone)."""
    if not (SHIPPED / "erase_model.json").is_file():
        pytest.skip("models/digits-ddpm is missing (train it with `erase train-base --out models/digits-ddpm`)")
    from erase.classifier import SmallClassifier

    classifier = SmallClassifier.from_pretrained(CLASSIFIER)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the cases run (the one_thread fixture is function-scoped)
    base = load_backbone(SHIPPED)
    accuracies = (classifier_accuracy(base, classifier, [3], 32), classifier_accuracy(base, classifier, RETAINED, 16))
    torch.set_num_threads(before)
    return classifier, accuracies


@pytest.mark.slow
@pytest.mark.parametrize("name", [pytest.param(m, marks=MOX_MISSES) if m == "mox" else m
                                  for m in METHODS if m != "finetune"])
def test_short_run_forgets_three_more_than_the_rest(name, shipped_before, tmp_path):
    classifier, before = shipped_before
    model = load_backbone(SHIPPED)
    unlearn(model, name, "3", tmp_path / "out", steps=SHORT_RUN_STEPS.get(name, 40), progress=False)
    after = (classifier_accuracy(model, classifier, [3], 32), classifier_accuracy(model, classifier, RETAINED, 16))
    drop_forget, drop_retain = before[0] - after[0], before[1] - after[1]
    assert drop_forget > drop_retain + 0.2, f"{name}: forget accuracy {before[0]:.2f} -> {after[0]:.2f}, " \
                                            f"retained {before[1]:.2f} -> {after[1]:.2f}"
