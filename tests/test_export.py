"""`erase export` on tiny pipelines: a run's change as a diffusers LoRA that stock `load_lora_weights`
loads (exact, or the best rank-R approximation), the same LoRA in the kohya/WebUI layout read back
through diffusers' converter, a single file `from_single_file` loads back, and the bad inputs."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from erase.backbones import StableDiffusionBackbone, load_backbone
from erase.cli import main
from erase.export import export, factor_change
from erase.loop import unlearn
from erase.utils import EraseError
from conftest import random_latent_data, saved_with_data
from test_sd_backbone import tiny_pipeline
from tiny_pipelines import FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")

BACKBONES = {"sd": (StableDiffusionBackbone, tiny_pipeline), **FAMILIES}
RUN = dict(steps=3, batch_size=4, lr=1e-2, progress=False)
PROMPTS = ["the number 3", "the number 5"]


def _make_run(family: str, root, params: str):
    base, data = saved_with_data(*BACKBONES[family], root / "base")
    run = unlearn(base, "finetune", out=root / f"run-{params}", data=data, params=params, **RUN)
    return base, run


@pytest.fixture(scope="module")
def sd_runs(tmp_path_factory):
    """A tiny SD run that moved every weight (`all`: convs, biases, norms too) and one that moved only
    cross-attention keys and values (bias-free Linear layers: a LoRA carries all of it)."""
    root = tmp_path_factory.mktemp("sd")
    base, run_all = _make_run("sd", root, "all")
    run_kv = unlearn(base, "finetune", out=root / "run-kv", data=random_latent_data(load_backbone(base)),
                     params="xattn-kv", **RUN)
    return base, run_all, run_kv


def _stock(family: str, path):
    """A fresh stock pipeline of the family from a folder (no erase code in the loading)."""
    return BACKBONES[family][0].pipeline_class().from_pretrained(str(path), safety_checker=None) \
        if family == "sd" else BACKBONES[family][0].pipeline_class().from_pretrained(str(path))


def _fused_denoiser_state(pipe, kind: str) -> dict:
    pipe.fuse_lora()
    pipe.unload_lora_weights()
    return getattr(pipe, kind).state_dict()


@pytest.mark.parametrize("family", list(BACKBONES))
def test_exact_lora_reproduces_every_linear_and_conv_change(family, tmp_path):
    base, run = _make_run(family, tmp_path, "all")
    report = export(run, "diffusers-lora", tmp_path / "lora")
    assert report["relative_error"]["worst"] < 1e-4  # float32 rounding of the factors only
    kind = BACKBONES[family][0].DENOISER
    pipe = _stock(family, base)
    original = {k: v.clone() for k, v in getattr(pipe, kind).state_dict().items()}
    pipe.load_lora_weights(str(tmp_path / "lora"))
    fused = _fused_denoiser_state(pipe, kind)
    erased = load_backbone(run).denoiser.state_dict()
    delta = load_file(run / "delta.safetensors")
    left_out = set(report["left_out"]["relative_change"])
    assert left_out and all(not k.endswith(".weight") or "norm" in k or "emb" in k for k in left_out)
    lora_weights = {f"{name}.weight" for name in report["ranks"]}
    assert lora_weights and lora_weights | left_out == {k for k in delta if not torch.equal(delta[k], original[k])}
    for name in lora_weights:  # the change is carried, up to the singular values under float32 precision
        scale = (erased[name] - original[name]).abs().max()
        assert (fused[name] - erased[name]).abs().max() <= 1e-3 * scale, name
    for name in left_out:  # what a LoRA cannot carry stays at the input model's value
        assert torch.equal(fused[name], original[name]), name


def test_exact_lora_draws_the_erased_models_images(sd_runs, tmp_path):
    base, _, run_kv = sd_runs
    report = export(run_kv, "diffusers-lora", tmp_path / "lora")
    assert report["left_out"]["tensors"] == 0
    pipe = _stock("sd", base)
    pipe.load_lora_weights(str(tmp_path / "lora"))  # not fused: the LoRA layers run as loaded
    with_lora = StableDiffusionBackbone(pipe).sample(PROMPTS, [1, 2], steps=4, batch_size=2)
    erased = load_backbone(run_kv).sample(PROMPTS, [1, 2], steps=4, batch_size=2)
    original = load_backbone(base).sample(PROMPTS, [1, 2], steps=4, batch_size=2)
    assert (erased - original).abs().max() > 1e-3  # the run changed the images
    assert (with_lora - erased).abs().max() < 1e-4 * (erased - original).abs().max() + 1e-5


def test_truncated_rank_is_the_best_approximation(sd_runs, tmp_path):
    _, run_all, _ = sd_runs
    exact = export(run_all, "diffusers-lora", tmp_path / "exact")
    low = export(run_all, "diffusers-lora", tmp_path / "rank1", rank=1)
    assert set(low["ranks"].values()) == {1} and max(exact["ranks"].values()) > 1
    assert low["relative_error"]["worst"] > 1e-3
    state = load_file(tmp_path / "rank1" / "pytorch_lora_weights.safetensors")
    assert all(v.shape[0] == 1 for k, v in state.items() if ".lora_A." in k)
    # Eckart-Young: the error of the rank-1 factors is the tail of the singular values.
    delta = torch.randn(12, 9, dtype=torch.float64)
    s = torch.linalg.svdvals(delta)
    layer = factor_change("x", delta, rank=3)
    assert layer.rank == 3
    assert layer.error == pytest.approx(float(s[3:].norm() / s.norm()), rel=1e-5)


@pytest.mark.parametrize("family", ["sd", "sdxl"])
def test_webui_lora_reads_back_through_diffusers_to_the_same_weights(family, tmp_path):
    base, run = _make_run(family, tmp_path, "all")
    # Exact: the layers' ranks differ (a conv_out of 4 channels, attention of 8 or 16), which the kohya
    # layout's per-layer alphas must survive.
    folder = export(run, "diffusers-lora", tmp_path / "lora")
    assert len(set(folder["ranks"].values())) > 1
    webui = export(run, "webui-lora", tmp_path / "webui.safetensors")
    assert (tmp_path / "webui.report.json").is_file()
    keys = list(load_file(tmp_path / "webui.safetensors"))
    assert keys and all(k.startswith("lora_unet_") for k in keys)
    # Layers the kohya layout cannot name (SDXL's add_embedding) are listed as left out, not lost silently.
    dropped = folder["ranks"].keys() - webui["ranks"].keys()
    assert {f"{n}.weight" for n in dropped} <= webui["left_out"]["relative_change"].keys()
    assert len(webui["ranks"]) > len(dropped)
    weights = []
    for source in (tmp_path / "lora", tmp_path / "webui.safetensors"):
        pipe = _stock(family, base)
        pipe.load_lora_weights(str(source))
        weights.append(_fused_denoiser_state(pipe, "unet"))
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][f"{n}.weight"], weights[1][f"{n}.weight"]) for n in webui["ranks"])


def test_single_file_round_trips_through_from_single_file(sd_runs, tmp_path):
    from diffusers import StableDiffusionPipeline

    _, run_all, _ = sd_runs
    export(run_all, "single-file", tmp_path / "erased.safetensors")
    pipe = StableDiffusionPipeline.from_single_file(str(tmp_path / "erased.safetensors"), config=str(run_all),
                                                    local_files_only=True, safety_checker=None)
    erased = load_backbone(run_all)
    for name in ("unet", "vae", "text_encoder"):
        mine, theirs = getattr(erased, name).state_dict(), getattr(pipe, name).state_dict()
        assert all(torch.equal(v, theirs[k]) for k, v in mine.items()), name
    assert torch.equal(StableDiffusionBackbone(pipe).sample(PROMPTS, [3, 4], steps=4, batch_size=2),
                       erased.sample(PROMPTS, [3, 4], steps=4, batch_size=2))


def test_pipeline_scale_dials_from_the_original_to_the_lora(sd_runs, tmp_path):
    base, run_all, _ = sd_runs
    original = load_backbone(base).denoiser.state_dict()
    export(run_all, "pipeline", tmp_path / "s0", scale=0.0)
    export(run_all, "pipeline", tmp_path / "s1")
    export(run_all, "pipeline", tmp_path / "s05", scale=0.5)
    s0, s05, s1 = (load_backbone(tmp_path / n).denoiser.state_dict() for n in ("s0", "s05", "s1"))
    assert all(torch.equal(s0[k], original[k]) for k in original)
    moved = [k for k in original if not torch.equal(s1[k], original[k])]
    assert moved
    for k in moved:  # half the scale, half the change
        torch.testing.assert_close(s05[k] - original[k], (s1[k] - original[k]) / 2, rtol=1e-3, atol=1e-6)


def test_bad_inputs_get_one_line_and_write_nothing(sd_runs, tmp_path, tiny_ddpm_dir, capsys):
    base, run_all, _ = sd_runs
    unfinished = tmp_path / "unfinished"
    unlearn(base, "finetune", out=unfinished, data=random_latent_data(load_backbone(base)), stop_after=1, **RUN)
    out = tmp_path / "out"
    cases = [
        ([str(unfinished), "--format", "diffusers-lora"], "is not finished yet"),
        ([str(base), "--format", "diffusers-lora"], "is not an `erase unlearn` output"),
        ([str(run_all), "--format", "diffusers-lora", "--rank", "100000"], "larger than any changed layer"),
        ([str(run_all), "--format", "diffusers-lora", "--rank", "0"], "at least 1"),
        ([str(run_all), "--format", "single-file"], "ending in .safetensors"),
        ([str(run_all), "--format", "diffusers-lora", "--base", str(tmp_path / "nowhere")], "pass --base"),
    ]
    for args, message in cases:
        capsys.readouterr()  # what loading the fixtures printed
        assert main(["export", *args, "--out", str(out)]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not out.exists()
    # A --base that is not the model the run started from (another run of it): found when both are loaded.
    with pytest.raises(EraseError, match="does not match its input model"):
        export(sd_runs[2], "diffusers-lora", out, base=run_all)
    assert not out.exists()
    # A backbone the converters do not cover: a LoRA of the SD3 family in the WebUI layout.
    sd3_base, sd3_run = _make_run("sd3", tmp_path / "sd3", "condition")
    with pytest.raises(EraseError, match="webui-lora is not available for a stable-diffusion-3"):
        export(sd3_run, "webui-lora", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("method", ["uce", "speed"])
def test_a_closed_form_edit_exports_exactly_as_a_lora_at_its_rank(method, tmp_path):
    """An edit W' = W M moves only the cross-attention keys and values (bias-free Linear layers), so a
    LoRA carries all of it at the change's own rank, in both layouts, and the stock loader reproduces it."""
    backbone_cls, build = BACKBONES["sd"]
    backbone_cls(build()).save_pretrained(tmp_path / "base")
    run = unlearn(tmp_path / "base", method, "the number 3", tmp_path / "run", anchor="the digit 4",
                  retain="a cat,a dog")
    original, erased = load_backbone(tmp_path / "base").denoiser.state_dict(), load_backbone(run).denoiser.state_dict()
    edited = {k for k in original if not torch.equal(erased[k], original[k])}
    assert edited and all(k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")) for k in edited)
    for fmt, out in (("diffusers-lora", tmp_path / "lora"), ("webui-lora", tmp_path / "webui.safetensors")):
        report = export(run, fmt, out)
        assert report["left_out"]["tensors"] == 0 and report["relative_error"]["worst"] < 1e-6, fmt
        assert {f"{n}.weight" for n in report["ranks"]} == edited
        if fmt == "diffusers-lora":  # exact at each change's own rank (the kohya file pads to one rank)
            for name, rank in report["ranks"].items():
                change = (erased[f"{name}.weight"] - original[f"{name}.weight"]).double()
                assert rank == int(torch.linalg.matrix_rank(change, rtol=1e-6)), name
        pipe = _stock("sd", tmp_path / "base")
        pipe.load_lora_weights(str(out))
        fused = _fused_denoiser_state(pipe, "unet")
        for k in original:
            scale = (erased[k] - original[k]).abs().max()
            assert (fused[k] - erased[k]).abs().max() <= 1e-5 * scale, (fmt, k)
