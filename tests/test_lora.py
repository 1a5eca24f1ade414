"""LoRA training through PEFT (`--lora-rank`): only the adapter trains, the outputs are a full
fine-tuning's (merged weights, delta against the original) plus an adapter that stock
`load_lora_weights` loads; every method on every text backbone, exact resume, data parallelism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from erase.backbones import StableDiffusionBackbone, load_backbone
from erase.loop import unlearn
from erase.methods import METHODS
from erase.utils import EraseError
from conftest import random_latent_data, saved_with_data
from test_export import BACKBONES
from test_distributed import launch

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = dict(steps=3, batch_size=4, checkpoint_every=2, params="condition", lora_rank=2, lr=1e-2, progress=False)


@pytest.fixture(scope="module", params=list(BACKBONES))
def saved(request, tmp_path_factory):
    """(family, saved pipeline folder, forget/retain data of random latents)."""
    return request.param, *saved_with_data(*BACKBONES[request.param], tmp_path_factory.mktemp(request.param) / "model")


def _matrix_rank(delta: torch.Tensor) -> int:
    return int(torch.linalg.matrix_rank(delta.double().reshape(delta.shape[0], -1), rtol=1e-6))


@pytest.mark.parametrize("method", list(METHODS))
def test_lora_trains_every_method_and_resumes_exactly(method, saved, tmp_path):
    family, path, data = saved
    before = load_backbone(path)
    group = set(before.trainable_parameters("condition"))
    out = unlearn(path, method, out=tmp_path / "full", data=data, **RUN)
    after = load_backbone(out).denoiser.state_dict()
    delta = load_file(out / "delta.safetensors")
    original = before.denoiser.state_dict()
    assert after.keys() == original.keys()  # the adapter is merged and gone from the saved model
    moved = {k for k in original if not torch.equal(after[k], original[k])}
    assert moved and moved <= group and moved == set(delta), method
    assert all(_matrix_rank(after[k] - original[k]) <= 2 for k in moved), method  # a rank-2 change per layer
    summary = json.loads((out / "erase_config.json").read_text())
    assert summary["lora"]["rank"] == 2 and summary["trainable_parameters"] == summary["lora"]["trainable_parameters"]
    assert len(moved) <= summary["lora"]["layers"] <= len(group)  # a layer per moved weight (an unused one stays)
    assert summary["trainable_parameters"] < sum(original[k].numel() for k in group)

    unlearn(path, method, out=tmp_path / "resumed", data=data, stop_after=2, **RUN)
    resumed = load_backbone(unlearn(path, method, out=tmp_path / "resumed", data=data, **RUN)).denoiser.state_dict()
    assert all(torch.equal(after[k], resumed[k]) for k in after), f"{method}: the resumed run differs"


def test_the_adapter_loads_into_a_stock_pipeline(saved, tmp_path):
    family, path, data = saved
    out = unlearn(path, "eupmu", out=tmp_path / "run", data=data, **RUN)
    kind = BACKBONES[family][0].DENOISER
    pipe = BACKBONES[family][0].pipeline_class().from_pretrained(str(path))
    pipe.load_lora_weights(str(out / "lora"))
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    fused, merged = getattr(pipe, kind).state_dict(), load_backbone(out).denoiser.state_dict()
    original = load_backbone(path).denoiser.state_dict()
    for k in load_file(out / "delta.safetensors"):
        scale = (merged[k] - original[k]).abs().max()
        assert (fused[k] - merged[k]).abs().max() <= 1e-5 * scale + 1e-7, k


def test_lora_on_the_class_conditional_ddpm_and_its_bad_inputs(tiny_ddpm_dir, tmp_path):
    out = unlearn(tiny_ddpm_dir, "finetune", "3", tmp_path / "run", steps=2, batch_size=4, lora_rank=1,
                  params="all", progress=False)
    adapter = load_file(out / "lora" / "adapter_model.safetensors")
    assert adapter and all(".lora_A." in k or ".lora_B." in k for k in adapter)
    assert json.loads((out / "lora" / "adapter_config.json").read_text())["r"] == 1
    with pytest.raises(EraseError, match="no Linear or Conv2d layer for LoRA"):
        unlearn(tiny_ddpm_dir, "finetune", "3", tmp_path / "bad", steps=2, batch_size=4, lora_rank=1,
                params="condition", progress=False)
    with pytest.raises(EraseError, match="lora_rank must be 0"):
        unlearn(tiny_ddpm_dir, "finetune", "3", tmp_path / "bad", steps=2, batch_size=4, lora_rank=-1)
    with pytest.raises(EraseError, match="lora_alpha needs a LoRA"):
        unlearn(tiny_ddpm_dir, "finetune", "3", tmp_path / "bad", steps=2, batch_size=4, lora_alpha=4.0)
    assert not (tmp_path / "bad").exists()


def test_two_processes_train_the_adapter_of_one_with_the_joint_batch(tmp_path, tiny_ddpm_dir):
    options = ["--steps", "3", "--lr", "1e-3", "--lora-rank", "2"]
    run = launch("unlearn", "--model", str(tiny_ddpm_dir), "--method", "eupmu", "--forget", "3", "--batch-size", "8",
                 *options, "--out", str(tmp_path / "two"))
    assert run.returncode == 0, run.stderr[-3000:]
    unlearn(tiny_ddpm_dir, "eupmu", "3", tmp_path / "one", steps=3, lr=1e-3, lora_rank=2, batch_size=16, shards=2,
            progress=False)
    two, one = (load_file(tmp_path / d / "delta.safetensors") for d in ("two", "one"))
    base = load_file(Path(tiny_ddpm_dir) / "unet" / "diffusion_pytorch_model.safetensors")
    assert two.keys() == one.keys() and two
    moved = max((one[k] - base[k]).abs().max().item() for k in one)
    differ = max((one[k] - two[k]).abs().max().item() for k in one)
    assert differ < 0.02 * moved, (differ, moved)


# -- LoRA stages of a recipe --------------------------------------------------------------------------------
LORA_STAGE = dict(steps=3, batch_size=4, checkpoint_every=2, params="condition", lora_rank=2, lr=1e-2)
LORA_CHAIN = {"name": "lora-chain", "target": "forget", "stages": [
    {"method": "eupmu", "config": LORA_STAGE},
    {"method": "esd", "config": {**LORA_STAGE, "lora_alpha": 4.0}}]}


@pytest.fixture(scope="module")
def sd_lora_chain(tmp_path_factory):
    """A tiny SD pipeline and an uninterrupted run of a recipe of two LoRA stages on it."""
    backbone_cls, build = BACKBONES["sd"]
    root = tmp_path_factory.mktemp("sd-chain")
    model = backbone_cls(build())
    model.save_pretrained(root / "base")
    data = random_latent_data(model)
    # On the CPU a sum's order follows the number of torch threads, so the uninterrupted run takes
    # the one thread the tests' resumed runs take (the one_thread fixture is function-scoped and
    # starts after this module-scoped one).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        full = unlearn(root / "base", recipe=LORA_CHAIN, out=root / "full", data=data, progress=False)
    finally:
        torch.set_num_threads(before)
    return root / "base", data, full


def test_a_recipe_of_lora_stages_saves_each_stages_adapter_and_one_delta_against_the_original(sd_lora_chain):
    """Each stage's adapter is its own change (stage 2's on top of stage 1's output), so the two loaded
    together by the stock loader at scale 1 give the run's final weights; the delta is the whole change."""
    base, _, full = sd_lora_chain
    original = load_backbone(base).denoiser.state_dict()
    final = load_backbone(full).denoiser.state_dict()
    delta = load_file(full / "delta.safetensors")
    assert delta and set(delta) == {k for k in original if not torch.equal(final[k], original[k])}
    assert all(torch.equal(delta[k], final[k]) for k in delta)
    summary = json.loads((full / "erase_config.json").read_text())
    assert [s["lora"]["rank"] for s in summary["stages"]] == [2, 2] and summary["stages"][1]["lora"]["alpha"] == 4.0
    assert not (full / "lora").exists()  # no single adapter holds the change of several stages
    pipe = StableDiffusionBackbone.pipeline_class().from_pretrained(str(base), safety_checker=None)
    for i, method in enumerate(["eupmu", "esd"], 1):
        pipe.load_lora_weights(str(full / "stages" / f"{i}-{method}" / "lora"), adapter_name=method)
    pipe.set_adapters(["eupmu", "esd"], [1.0, 1.0])
    pipe.fuse_lora(adapter_names=["eupmu", "esd"])
    pipe.unload_lora_weights()
    fused = pipe.unet.state_dict()
    for k in delta:
        scale = (final[k] - original[k]).abs().max()
        assert scale > 0 and (fused[k] - final[k]).abs().max() <= 1e-5 * scale + 1e-7, k
    assert all(torch.equal(fused[k], original[k]) for k in original if k not in delta)


@pytest.mark.parametrize("stop_after", [2, 4])  # inside stage 1, inside stage 2
def test_a_killed_recipe_of_lora_stages_resumes_bit_for_bit(stop_after, sd_lora_chain, tmp_path):
    base, data, full = sd_lora_chain
    out = tmp_path / "resumed"
    stopped = unlearn(base, recipe=LORA_CHAIN, out=out, data=data, stop_after=stop_after, progress=False)
    assert stopped.exists() and not out.exists()
    unlearn(base, recipe=LORA_CHAIN, out=out, data=data, progress=False)
    expected, resumed = load_backbone(full).denoiser.state_dict(), load_backbone(out).denoiser.state_dict()
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
    for stage in ("1-eupmu", "2-esd"):
        a, b = (load_file(folder / "stages" / stage / "lora" / "pytorch_lora_weights.safetensors")
                for folder in (full, out))
        assert a.keys() == b.keys() and a and all(torch.equal(a[k], b[k]) for k in a), stage


def test_a_recipe_mixing_a_lora_stage_and_a_full_stage_keeps_only_the_lora_stages_adapter(sd_lora_chain, tmp_path):
    base, data, _ = sd_lora_chain
    full_stage = {k: v for k, v in LORA_STAGE.items() if k != "lora_rank"}
    recipe = {**LORA_CHAIN, "stages": [LORA_CHAIN["stages"][0], {"method": "esd", "config": full_stage}]}
    out = unlearn(base, recipe=recipe, out=tmp_path / "mixed", data=data, progress=False)
    assert (out / "stages" / "1-eupmu" / "lora" / "pytorch_lora_weights.safetensors").is_file()
    assert not (out / "stages" / "2-esd" / "lora").exists() and not (out / "lora").exists()
    original, final = load_backbone(base).denoiser.state_dict(), load_backbone(out).denoiser.state_dict()
    delta = load_file(out / "delta.safetensors")
    assert delta and set(delta) == {k for k in original if not torch.equal(final[k], original[k])}
    assert any(_matrix_rank(final[k] - original[k]) > 2 for k in delta)  # the full stage's change is not rank 2
