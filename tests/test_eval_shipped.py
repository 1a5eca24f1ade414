"""The shipped digits classifier's verdicts on the shipped DDPM's samples, checked by an independent classifier."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from erase.cli import main

REPO = Path(__file__).resolve().parents[1]
SHIPPED_DDPM = REPO / "models" / "digits-ddpm"
SHIPPED_CLASSIFIER = REPO / "models" / "digits-classifier"


def svc_accuracy_per_class(run: Path) -> dict[str, float]:
    """An SVC trained on scikit-learn's 8x8 digits, applied to the run's PNGs averaged down to 8x8."""
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    svc = SVC(gamma=0.001, C=10).fit(digits.data, digits.target)
    index = json.loads((run / "index.json").read_text())["images"]
    x = np.stack([np.asarray(Image.open(run / e["file"]), dtype=np.float64) for e in index])  # (N, 16, 16)
    x = x.reshape(len(x), 8, 2, 8, 2).mean(axis=(2, 4)) / 255 * 16  # the digits' 0..16 scale
    predicted = svc.predict(x.reshape(len(x), 64))
    labels = np.array([e["class"] for e in index])
    names = {e["class"]: e["class_name"] for e in index}
    return {names[c]: float((predicted[labels == c] == c).mean()) for c in sorted(names)}


@pytest.mark.slow
@pytest.mark.skipif(not (SHIPPED_DDPM / "erase_model.json").is_file(),
                    reason="models/digits-ddpm is not there yet (`erase train-base` writes it)")
def test_shipped_classifier_agrees_with_an_independent_svc(tmp_path):
    """Per-digit accuracy of the shipped classifier within 5 points of an SVC's, on average (40 images a digit)."""
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(SHIPPED_DDPM), "--protocol", "digits-class",
                 "--classifier", str(SHIPPED_CLASSIFIER), "--n", "40", "--steps", "25", "--out", str(out)]) == 0
    ours = json.loads((out / "metrics.json").read_text())["metrics"]["per_class_accuracy"]
    svc = svc_accuracy_per_class(out)
    differences = {c: abs(ours[c] - svc[c]) for c in ours}
    assert np.mean(list(differences.values())) < 0.05, (ours, svc)
    assert abs(np.mean(list(ours.values())) - np.mean(list(svc.values()))) < 0.05


RETRAINED_DDPM = REPO / "models" / "digits-ddpm-retrained-no3"
RETRAINED_MINI_SD = REPO / "models" / "mini-sd-retrained-no-three"
RETRAINED_MINI_FLOW = REPO / "models" / "mini-flow-retrained-no-three"


FLOORS = {REPO / "models" / f: REPO / "models" / original for f, original in [
    ("digits-ddpm-retrained-no3", "digits-ddpm"), ("digits-ddpm-retrained-no8", "digits-ddpm"),
    ("mini-sd-retrained-no-three", "mini-sd"), ("mini-sd-retrained-no-seven", "mini-sd"),
    ("mini-flow-retrained-no-three", "mini-flow"), ("mini-flow-retrained-no-seven", "mini-flow")]}


@pytest.mark.parametrize("floor", list(FLOORS), ids=lambda p: p.name)
def test_shipped_floor_samples_as_its_original(floor):
    """A floor compared with runs of its original is sampled (and attacked) at the original's defaults.

    The DDPM floors once lacked digits-ddpm's recorded guidance (1.0), so every protocol sampled them at
    the backbone's 3.0 while the runs they were compared with used 1.0."""
    from erase.backbones import load_backbone

    assert load_backbone(floor).sample_defaults == load_backbone(FLOORS[floor]).sample_defaults


@pytest.mark.slow
def test_shipped_retrained_ddpm_never_saw_a_three(tmp_path):
    """The retrained reference: trained without the 3s, so the label 3 draws no 3, and the rest is drawn."""
    assert json.loads((RETRAINED_DDPM / "erase_model.json").read_text())["info"]["training"]["excluded_classes"] == [3]
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(RETRAINED_DDPM), "--protocol", "digits-class", "--forget", "3",
                 "--classifier", str(SHIPPED_CLASSIFIER), "--n", "10", "--n-forget", "20", "--steps", "10",
                 "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["ua"] >= 0.9 and metrics["retained_accuracy"] >= 0.9, metrics


@pytest.mark.slow
@pytest.mark.parametrize("retrained", [RETRAINED_MINI_SD, RETRAINED_MINI_FLOW], ids=lambda p: p.name)
def test_shipped_retrained_text_models_never_saw_a_three(retrained, tmp_path):
    """Neither the training captions nor the paraphrases of "three" draw a 3; the other digits are drawn."""
    info = json.loads((retrained / "erase_info.json").read_text())["info"]["training"]
    assert info["excluded_digits"] == [3]
    out = tmp_path / "ev"
    assert main(["eval", "--model", str(retrained), "--protocol", "digits-prompts", "--forget", "three",
                 "--classifier", str(SHIPPED_CLASSIFIER), "--n", "2", "--steps", "10", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())["metrics"]
    assert metrics["forget_accuracy_train_prompts"] <= 0.1 and metrics["forget_accuracy_heldout_prompts"] <= 0.1
    assert metrics["retained_accuracy"] >= 0.9, metrics
