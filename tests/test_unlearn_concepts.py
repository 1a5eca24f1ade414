"""`erase unlearn` on a Stable Diffusion pipeline: a text concept erased through the same command."""

import json

import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import load_file

from erase.cli import main


@pytest.mark.parametrize("method,extra", [("eupmu", []), ("esd", []), ("esd", ["--xt", "sample", "--sample-steps", "3"])])
def test_unlearn_a_prompt_concept_and_apply_the_delta_with_stock_diffusers(tiny_sd_dir, tmp_path, monkeypatch, method,
                                                                            extra):
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "erased"
    argv = ["unlearn", "--model", str(tiny_sd_dir), "--method", method, "--forget", "a photo of a cat",
            "--retain", "a photo of a dog,a tree", "--images", "2", "--steps", "2", "--batch-size", "2",
            "--out", str(out), *extra]
    assert main(argv) == 0
    record = json.loads((out / "erase_config.json").read_text())
    assert record["method"] == method
    assert record["data"]["concept"]["forget"] == ["a photo of a cat"]

    delta = load_file(out / "delta.safetensors")
    assert delta, "the delta holds the changed tensors"
    original = StableDiffusionPipeline.from_pretrained(tiny_sd_dir)
    erased = StableDiffusionPipeline.from_pretrained(out)
    before = original.unet.state_dict()
    assert any(not torch.equal(before[k], delta[k]) for k in delta)
    missing, unexpected = original.unet.load_state_dict(delta, strict=False)
    assert not unexpected
    for k, v in erased.unet.state_dict().items():
        assert torch.equal(original.unet.state_dict()[k], v), k


def test_image_guidance_sets_the_guidance_of_the_generated_concept_images(tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path / "cache"))
    runs = {}
    for guidance in ("1", None):
        out = tmp_path / f"erased-{guidance}"
        extra = ["--image-guidance", guidance] if guidance else []
        assert main(["unlearn", "--model", str(tiny_sd_dir), "--method", "finetune", "--forget", "a photo of a cat",
                     "--retain", "a tree", "--images", "2", "--steps", "1", "--batch-size", "2",
                     "--out", str(out), *extra]) == 0
        runs[guidance] = json.loads((out / "erase_config.json").read_text())["data"]
    assert runs["1"]["guidance"] == 1.0
    assert runs[None]["guidance"] != 1.0, "without the option the model's sampling default applies"
    assert runs["1"]["cache"] != runs[None]["cache"], "images drawn at another guidance are cached apart"


def test_no_anchor_in_retain_leaves_the_anchor_images_out_of_the_retain_set(tiny_sd_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path / "cache"))
    runs = {}
    for extra in ([], ["--no-anchor-in-retain"]):
        out = tmp_path / f"erased-{len(extra)}"
        assert main(["unlearn", "--model", str(tiny_sd_dir), "--method", "finetune", "--forget", "a photo of a cat",
                     "--retain", "a tree", "--images", "2", "--steps", "1", "--batch-size", "2",
                     "--out", str(out), *extra]) == 0
        runs[len(extra)] = json.loads((out / "erase_config.json").read_text())["data"]
    assert (runs[0]["anchor_in_retain"], runs[0]["retain_images"]) == (True, 4), "2 anchor + 2 retain images"
    assert (runs[1]["anchor_in_retain"], runs[1]["retain_images"]) == (False, 2)
    assert runs[0]["cache"] == runs[1]["cache"], "the same generated images, only the retain set differs"


def test_dataset_option_is_refused_for_text_concepts(tiny_sd_dir, tmp_path, capsys):
    assert main(["unlearn", "--model", str(tiny_sd_dir), "--method", "rl", "--forget", "cat",
                 "--dataset", "digits", "--out", str(tmp_path / "x")]) == 2
    assert "--dataset applies to class-conditional models" in capsys.readouterr().err
