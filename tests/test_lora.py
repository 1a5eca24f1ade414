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
from test_export import BACKBONES, _data
from test_distributed import launch

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = dict(steps=3, batch_size=4, checkpoint_every=2, params="condition", lora_rank=2, lr=1e-2, progress=False)


@pytest.fixture(scope="module", params=list(BACKBONES))
def saved(request, tmp_path_factory):
    backbone_cls, build = BACKBONES[request.param]
    path = tmp_path_factory.mktemp(request.param) / "model"
    model = backbone_cls(build())
    model.save_pretrained(path)
    return request.param, path, _data(model)


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
