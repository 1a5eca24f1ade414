"""The evaluation classifier and `erase sample`."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from erase.backbones import ClassConditionalDDPM
from erase.classifier import SmallClassifier
from erase.training.classifier import TrainClassifierConfig, accuracy, train_classifier
from erase.cli import main
from erase.data import load_dataset
from erase.utils import EraseError

SHIPPED_CLASSIFIER = Path(__file__).parents[1] / "models" / "digits-classifier"


def test_classifier_learns_and_reloads_identically(tmp_path):
    model = train_classifier(TrainClassifierConfig(epochs=4, width=8), tmp_path / "clf")
    test = load_dataset("digits", "test")
    assert accuracy(model, test.images, test.labels) > 0.5  # ten classes: chance is 0.1
    loaded = SmallClassifier.from_pretrained(tmp_path / "clf")
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(test.images[:8]), loaded(test.images[:8]))
    assert loaded.info["training"]["test_accuracy"] > 0.5
    with pytest.raises(EraseError, match="expects images of shape"):
        loaded(torch.zeros(1, 3, 16, 16))


def test_shipped_classifier_is_accurate():
    model = SmallClassifier.from_pretrained(SHIPPED_CLASSIFIER)
    test = load_dataset("digits", "test")
    assert accuracy(model, test.images, test.labels) >= 0.97


def test_classifier_weights_that_do_not_match_are_refused(tmp_path):
    train_classifier(TrainClassifierConfig(epochs=1, width=8), tmp_path / "clf")
    meta = json.loads((tmp_path / "clf" / "classifier.json").read_text())
    meta["arch"]["width"] = 16
    (tmp_path / "clf" / "classifier.json").write_text(json.dumps(meta))
    with pytest.raises(EraseError, match="do not match the architecture"):
        SmallClassifier.from_pretrained(tmp_path / "clf")


def test_sample_command_writes_pngs_grid_and_index(tmp_path, capsys):
    torch.manual_seed(0)
    model = ClassConditionalDDPM.create([str(i) for i in range(4)], image_size=8, channels=1,
                                        block_out_channels=(8, 16), attention_levels=(False, False),
                                        norm_num_groups=4, num_train_timesteps=50)
    model.save_pretrained(tmp_path / "m")
    def sample(classes, out):
        return main(["sample", "--model", str(tmp_path / "m"), "--classes", classes, "--n", "3",
                     "--steps", "2", "--out", str(tmp_path / out), "--device", "cpu"])

    assert sample("1,3", "s") == 0
    files = sorted(p.relative_to(tmp_path / "s").as_posix() for p in (tmp_path / "s").rglob("*.png"))
    assert files == ["1/00000.png", "1/00001.png", "1/00002.png", "3/00000.png", "3/00001.png",
                     "3/00002.png", "grid.png"]
    index = json.loads((tmp_path / "s" / "index.json").read_text())
    assert [e["class"] for e in index["images"]] == [1, 1, 1, 3, 3, 3]
    # Image i of class 3 is the same when class 3 is requested alone.
    assert sample("3", "alone") == 0
    a = Image.open(tmp_path / "s" / "3" / "00001.png").tobytes()
    assert a == Image.open(tmp_path / "alone" / "3" / "00001.png").tobytes()


def test_sample_command_errors_are_one_line(tmp_path, capsys):
    assert main(["sample", "--model", str(tmp_path / "nope"), "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "error: model" in err and "does not exist" in err and "Traceback" not in err
