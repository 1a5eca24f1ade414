"""Several concepts erased at once by the fine-tuning methods: `--forget a,b` (or a file of names) on a
text model, several classes on a class model; every batch holds every concept and each concept's loss
is logged apart."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from erase.cli import main
from erase.unlearning.running import LOG_EVERY
from erase.unlearn_data import UnlearnData

from conftest import write_concept_folder

pytestmark = pytest.mark.usefixtures("one_thread")


def _history(out):
    return [json.loads(line) for line in (out / "loss_history.jsonl").read_text().splitlines()]


def _concept_entries(history, names):
    """The logged steps that carry each concept's loss: every LOG_EVERY-th step, from the first."""
    entries = [entry for entry in history if set(names) <= set(entry)]
    assert entries and all((entry["step"] - 1) % LOG_EVERY == 0 for entry in entries)
    return entries


@pytest.fixture
def two_concepts(tmp_path):
    cat = write_concept_folder(tmp_path / "concepts", "cat", ["a photo of a cat", "a cat on a sofa"], "a photo of an animal",
                          ["a photo of a tree", "a photo of a dog"])
    dog = write_concept_folder(tmp_path / "concepts", "dog", ["a photo of a dog"], "a photo of an animal",
                          ["a photo of a tree", "a photo of a house"])
    return cat, dog


@pytest.mark.parametrize("method", ["finetune", "esd", "eupmu"])
def test_several_text_concepts_train_together_and_each_concept_is_logged(tiny_sd_dir, tmp_path, monkeypatch,
                                                                         two_concepts, method):
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path / "cache"))
    cat, dog = two_concepts
    out = tmp_path / "erased"
    assert main(["unlearn", "--model", str(tiny_sd_dir), "--method", method, "--forget", f"{cat},{dog}",
                 "--images", "2", "--steps", "3", "--batch-size", "4", "--out", str(out)]) == 0
    record = json.loads((out / "erase_config.json").read_text())
    data = record["data"]
    assert data["kind"] == "concepts" and data["concepts"] == ["cat", "dog"]
    assert set(data["parts"]) == {"cat", "dog"}
    # The retain sets are merged without the prompts another concept erases ("a photo of a dog").
    assert data["parts"]["cat"]["concept"]["retain"] == ["a photo of a tree", "a photo of a house"]
    entries = _concept_entries(_history(out), {"forget_denoise.cat", "forget_denoise.dog"})
    assert all(entry["forget_denoise.cat"] != entry["forget_denoise.dog"] for entry in entries)
    delta = load_file(out / "delta.safetensors")
    before = load_file(tiny_sd_dir / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(before[k], v) for k, v in delta.items())


def test_a_file_of_concepts_is_a_list(tiny_sd_dir, tmp_path, monkeypatch, two_concepts):
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path / "cache"))
    listed = tmp_path / "concepts.txt"
    listed.write_text("# erased together\n" + "\n".join(str(c) for c in two_concepts) + "\n")
    out = tmp_path / "erased"
    assert main(["unlearn", "--model", str(tiny_sd_dir), "--method", "esd", "--forget", str(listed),
                 "--images", "2", "--steps", "2", "--batch-size", "4", "--out", str(out)]) == 0
    assert json.loads((out / "erase_config.json").read_text())["data"]["concepts"] == ["cat", "dog"]
    _concept_entries(_history(out), {"forget_denoise.cat", "forget_denoise.dog"})


def test_a_model_vocabulary_names_its_classes_in_a_list(tiny_sd_dir, tmp_path, monkeypatch):
    """On a model that records its captions (the miniatures), `--forget five,seven` erases both digits'
    training captions, each towards the next digit's, with the other digits' captions kept."""
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path / "cache"))
    model = tmp_path / "model"
    shutil.copytree(tiny_sd_dir, model)
    words = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    (model / "erase_info.json").write_text(json.dumps({"backbone": "stable-diffusion", "info": {"training": {
        "train_templates": ["a handwritten digit {w}", "the number {d}"], "class_words": words}}}))
    out = tmp_path / "erased"
    assert main(["unlearn", "--model", str(model), "--method", "esd", "--forget", "five,7", "--images", "2",
                 "--steps", "2", "--batch-size", "4", "--out", str(out)]) == 0
    parts = json.loads((out / "erase_config.json").read_text())["data"]["parts"]
    assert parts["five"]["concept"]["forget"] == ["a handwritten digit five", "the number 5"]
    assert parts["seven"]["concept"]["anchor"] == "a handwritten digit eight"
    kept = parts["seven"]["concept"]["retain"]
    assert "the number 4" in kept and "the number 5" not in kept and "the number 7" not in kept


def test_several_classes_train_together_and_each_class_is_logged(tiny_ddpm_dir, tmp_path):
    out = tmp_path / "erased"
    assert main(["unlearn", "--model", str(tiny_ddpm_dir), "--method", "ga", "--forget", "3,five,7", "--steps", "12",
                 "--batch-size", "6", "--out", str(out)]) == 0
    record = json.loads((out / "erase_config.json").read_text())
    assert record["data"]["forget"] == ["three", "five", "seven"]
    names = {f"forget_denoise.{n}" for n in ("three", "five", "seven")}
    history = _history(out)
    entries = _concept_entries(history, names)
    assert [entry["step"] for entry in entries] == [1, 11] and len(history) == 12  # the extra forward: 2 of 12 steps
    assert len({entries[0][n] for n in names}) == 3
    delta = load_file(out / "delta.safetensors")
    assert delta and all(torch.isfinite(v).all() for v in delta.values())


def test_every_batch_holds_every_concept_in_equal_shares():
    from erase.backbones.base import Condition

    labels = torch.tensor([0] * 50 + [1] * 3 + [2] * 7)  # concepts of very different sizes
    data = UnlearnData(forget_x0=torch.randn(60, 1, 2, 2), forget_cond=Condition(class_labels=torch.arange(60)),
                       anchor_cond=Condition(class_labels=torch.arange(60)), retain_x0=torch.randn(4, 1, 2, 2),
                       retain_cond=Condition(class_labels=torch.arange(4)), forget_concept=labels,
                       concept_names=["a", "b", "c"])
    for seed in range(5):
        rows = data._forget_rows(7, torch.Generator().manual_seed(seed))
        assert torch.bincount(labels[rows], minlength=3).tolist() == [3, 2, 2]


@pytest.mark.parametrize("forget,message", [
    ("3,3", "names a class twice"),
    ("3,5,7", "raise --batch-size"),
])
def test_bad_class_lists_are_one_line(tiny_ddpm_dir, tmp_path, capsys, forget, message):
    out = tmp_path / "erased"
    assert main(["unlearn", "--model", str(tiny_ddpm_dir), "--method", "ga", "--forget", forget, "--steps", "2",
                 "--batch-size", "4", "--out", str(out)]) != 0
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1
    assert not out.exists()


def test_a_concept_named_twice_under_two_names_is_refused(tiny_sd_dir, tmp_path, capsys, two_concepts):
    cat, _ = two_concepts
    out = tmp_path / "erased"
    assert main(["unlearn", "--model", str(tiny_sd_dir), "--method", "esd", "--forget", f"{cat},{cat}/",
                 "--images", "2", "--steps", "2", "--out", str(out)]) != 0
    assert "twice" in capsys.readouterr().err
    assert not out.exists()
