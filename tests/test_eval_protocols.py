"""Protocols end to end on tiny models, the `erase eval` command's refusals, and a two-process run."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from erase.classifier import SmallClassifier
from erase.cli import main
from erase.data import load_dataset
from erase.eval.generation import load_images, sample_prompts
from erase.eval.metrics import FeatureFID, NudityCounts, clip_score_metric, wilson_interval
from erase.eval.prompts import PromptItem
from erase.eval.registry import PROTOCOLS
from erase.utils import EraseError
from erase.eval.protocols import Cifar10Class, DigitsClass, I2PNudity, T2IUtility
from conftest import eval_digits_prompts

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(params=["sd", "flux"])
def prompt_model_dir(request):
    """The prompt protocols run on every text family alike: the tiny SD 1.x pipeline, and the tiny
    guidance-distilled FLUX pipeline (flow matching, T5 sequence and CLIP pooled text)."""
    return request.getfixturevalue(f"tiny_{request.param}_dir")


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory, tiny_ddpm_dir, tiny_classifier_dir):
    out = tmp_path_factory.mktemp("runs") / "digits"
    DigitsClass(forget="three", classifier=str(tiny_classifier_dir), n=6, n_forget=8, steps=3,
                batch_size=8).run(tiny_ddpm_dir, out)
    return out


def test_digits_class_writes_every_setting_and_the_images(digits_run, tiny_ddpm_dir, tiny_classifier_dir):
    results = json.loads((digits_run / "metrics.json").read_text())
    assert results["protocol"] == "digits-class"
    assert set(results["settings"]) == {f.name for f in dataclasses.fields(DigitsClass)}
    assert results["settings"]["n_forget"] == 8 and results["settings"]["guidance"] == 1.0
    assert results["model"] == str(Path(tiny_ddpm_dir).resolve())
    assert results["classifier"] == str(Path(tiny_classifier_dir).resolve())
    assert "classifier features" in results["feature_extractor"]
    assert {"torch", "torchmetrics", "nudenet", "diffusers"} <= set(results["versions"])
    index = json.loads((digits_run / "index.json").read_text())["images"]
    assert len(index) == results["images"] == 8 + 9 * 6
    assert [e["class"] for e in index[:8]] == [3] * 8
    assert all((digits_run / e["file"]).is_file() for e in index)


def test_digits_class_with_several_erased_classes_pools_ua_and_reports_h_o(tmp_path, tiny_ddpm_dir,
                                                                          tiny_classifier_dir):
    """Three classes erased at once: n_forget samples of each, UA over all of them, the mass-erasure
    entries (erased and kept accuracy, H_o) as the prompt protocol reports them; no one-class entries."""
    from erase.eval.metrics import harmonic_h_o

    out = tmp_path / "run"
    results = DigitsClass(forget="3,five,7", classifier=str(tiny_classifier_dir), n=2, n_forget=3, steps=2,
                          batch_size=8, fid_bootstrap=0).run(tiny_ddpm_dir, out)
    m = results["metrics"]
    index = json.loads((out / "index.json").read_text())["images"]
    assert [e["class"] for e in index[:9]] == [3] * 3 + [5] * 3 + [7] * 3 and len(index) == 9 + 7 * 2
    acc = m["per_class_accuracy"]
    assert m["erased_classes"] == ["three", "five", "seven"]
    assert m["erased_accuracy"] == pytest.approx((acc["three"] + acc["five"] + acc["seven"]) / 3)
    assert m["ua"] == pytest.approx(1 - m["erased_accuracy"])  # equal shares of each class
    assert m["kept_accuracy"] == pytest.approx(m["retained_accuracy"])
    assert m["h_o"] == pytest.approx(harmonic_h_o(m["erased_accuracy"], m["kept_accuracy"]))
    assert "forget_class" not in m and "neighbour_classes" not in m


@pytest.mark.parametrize("forget", ["3,three", "0,1,2,3,4,5,6,7,8,9"])
def test_digits_class_refuses_a_class_named_twice_or_no_class_kept(tmp_path, tiny_ddpm_dir, tiny_classifier_dir, forget):
    with pytest.raises(EraseError, match="list each erased class once"):
        DigitsClass(forget=forget, classifier=str(tiny_classifier_dir), n=2, steps=1).run(tiny_ddpm_dir, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_digits_class_metrics_agree_with_the_saved_pngs(digits_run, tiny_classifier_dir):
    """UA, per-class accuracy and FID recomputed from the PNG files on disk."""
    results = json.loads((digits_run / "metrics.json").read_text())
    metrics = results["metrics"]
    index = json.loads((digits_run / "index.json").read_text())["images"]
    images = load_images([digits_run / e["file"] for e in index])
    labels = torch.tensor([e["class"] for e in index])
    classifier = SmallClassifier.from_pretrained(tiny_classifier_dir)
    with torch.no_grad():
        logits = classifier(images)
    correct = logits.argmax(1) == labels
    assert metrics["ua"] == pytest.approx(1 - correct[labels == 3].float().mean().item())
    for c, name in enumerate(results["class_names"]):
        assert metrics["per_class_accuracy"][name] == pytest.approx(correct[labels == c].float().mean().item())
    p3 = logits[labels == 3].double().softmax(1)
    assert metrics["forget_prob"] == pytest.approx(p3[:, 3].mean().item())

    fid = FeatureFID(classifier)
    fid.update(images[labels != 3], real=False)
    fid.update(load_dataset("digits", "train").subset([c for c in range(10) if c != 3]).images, real=True)
    expected = fid.compute()
    assert metrics["fid"] == pytest.approx(expected["fid"], rel=1e-6)
    assert metrics["fid_samples"] == 54 and metrics["fid_reference_images"] == expected["reference_images"]
    assert metrics["fid_ci95"] == pytest.approx(expected["ci95"], rel=1e-5) and metrics["fid_reliable"] is True

    # Intervals from the same counts: Wilson for UA, the retained pool and the neighbour classes.
    wrong3 = int((~correct[labels == 3]).sum())
    assert metrics["ua_ci95"] == pytest.approx(wilson_interval(wrong3, 8))
    kept = labels != 3
    assert metrics["retained_accuracy_ci95"] == pytest.approx(wilson_interval(int(correct[kept].sum()), 54))
    near = [results["class_names"].index(n) for n in metrics["neighbour_classes"]]
    assert len(near) == 2 and 3 not in near
    in_near = torch.isin(labels, torch.tensor(near))
    assert metrics["neighbour_accuracy"] == pytest.approx(correct[in_near].float().mean().item())


def test_class_images_do_not_depend_on_how_many_are_requested(digits_run, tmp_path, tiny_ddpm_dir, tiny_classifier_dir):
    DigitsClass(forget=3, classifier=str(tiny_classifier_dir), n=2, n_forget=3, steps=3,
                batch_size=8).run(tiny_ddpm_dir, tmp_path / "small")
    for rel in ("images/3/00002.png", "images/0/00001.png", "images/9/00000.png"):
        assert (tmp_path / "small" / rel).read_bytes() == (digits_run / rel).read_bytes()


def test_a_protocol_without_a_batch_size_records_the_one_chosen_for_the_device(digits_run, tmp_path, tiny_ddpm_dir,
                                                                            tiny_classifier_dir, monkeypatch):
    from erase.backbones import ClassConditionalDDPM

    run = dict(forget=3, classifier=str(tiny_classifier_dir), n=2, n_forget=3, steps=3)
    DigitsClass(**{**run, "n": 8}).run(tiny_ddpm_dir, tmp_path / "cpu")  # 75 images: the CPU batch, 64
    assert json.loads((tmp_path / "cpu" / "metrics.json").read_text())["settings"]["batch_size"] == 64
    DigitsClass(**run).run(tiny_ddpm_dir, tmp_path / "short")  # 21 images: no batch padded beyond them
    assert json.loads((tmp_path / "short" / "metrics.json").read_text())["settings"]["batch_size"] == 21
    # Where the device chooses another batch (a GPU), that is the batch drawn at and recorded.
    monkeypatch.setattr(ClassConditionalDDPM, "choose_batch_size", lambda self, cond, cpu_batch, state=None: 8)
    DigitsClass(**run).run(tiny_ddpm_dir, tmp_path / "chosen")
    assert json.loads((tmp_path / "chosen" / "metrics.json").read_text())["settings"]["batch_size"] == 8
    for rel in ("images/3/00002.png", "images/0/00001.png"):  # digits_run drew at batch 8
        assert (tmp_path / "chosen" / rel).read_bytes() == (digits_run / rel).read_bytes()


def test_compile_generates_with_the_compiled_denoiser_and_the_same_images(digits_run, tmp_path, tiny_ddpm_dir,
                                                                          tiny_classifier_dir, one_thread,
                                                                          monkeypatch):
    """`--compile`: the denoiser runs compiled (fused kernels round differently: PNG levels may move by one)."""
    compiled_modules, compile_ = [], torch.nn.Module.compile
    monkeypatch.setattr(torch.nn.Module, "compile",
                        lambda self, *a, **k: compiled_modules.append(type(self).__name__) or compile_(self, *a, **k))
    DigitsClass(forget=3, classifier=str(tiny_classifier_dir), n=2, n_forget=3, steps=3, batch_size=8,
                compile=True).run(tiny_ddpm_dir, tmp_path / "compiled")
    assert json.loads((tmp_path / "compiled" / "metrics.json").read_text())["settings"]["compile"] is True
    assert compiled_modules == ["UNet2DModel"]  # the denoiser, and nothing else
    for rel in ("images/3/00002.png", "images/0/00001.png"):
        eager, compiled = (load_images([run / rel]) for run in (digits_run, tmp_path / "compiled"))
        assert (compiled - eager).abs().max() <= 2 / 255 + 1e-6  # one PNG level in [-1, 1]


def test_distance_to_a_reference_model_is_zero_to_itself_and_grows_to_another(digits_run, tmp_path, tiny_ddpm_dir,
                                                                          tiny_classifier_dir):
    from conftest import save_tiny_ddpm

    run = dict(forget=3, classifier=str(tiny_classifier_dir), n=6, n_forget=8, steps=3, batch_size=8)
    itself = DigitsClass(**run, reference_model=str(tiny_ddpm_dir)).run(tiny_ddpm_dir, tmp_path / "itself")["metrics"]
    # The reference draws the same classes and seeds: from the same model, the very same images.
    assert itself["fid_vs_reference"] == pytest.approx(0.0, abs=1e-3)
    assert itself["forget_verdict_distance_vs_reference"] == 0.0
    assert itself["forget_verdicts"] == itself["reference_forget_verdicts"]
    assert sum(itself["forget_verdicts"].values()) == 8
    # The run's own numbers do not change with a reference beside them.
    plain = json.loads((digits_run / "metrics.json").read_text())["metrics"]
    assert itself["ua"] == plain["ua"] and itself["fid"] == plain["fid"]

    torch.manual_seed(1)
    other = save_tiny_ddpm(tmp_path / "other", attention=True)  # other weights, same classes
    apart = DigitsClass(**run, reference_model=str(other)).run(tiny_ddpm_dir, tmp_path / "apart")["metrics"]
    assert apart["fid_vs_reference"] > itself["fid_vs_reference"] + 0.1
    assert apart["fid_vs_reference_ci95"][0] <= apart["fid_vs_reference"] <= apart["fid_vs_reference_ci95"][1]
    assert apart["fid_vs_reference_samples"] == 9 * 6  # the retained samples only
    low, high = apart["forget_verdict_distance_vs_reference_ci95"]
    assert low <= apart["forget_verdict_distance_vs_reference"] <= high


def test_a_reference_model_over_other_classes_is_refused(tmp_path, tiny_ddpm_dir, tiny_classifier_dir, tiny_sd_dir):
    with pytest.raises(EraseError, match="same classes"):
        DigitsClass(forget=3, classifier=str(tiny_classifier_dir), n=2, steps=1, batch_size=8,
                    reference_model=str(tiny_sd_dir)).run(tiny_ddpm_dir, tmp_path / "refused")


def test_cifar10_class_defaults_are_the_papers():
    p = Cifar10Class(forget="airplane")
    assert (p.n_forget, p.n, p.steps, p.eta, p.guidance, p.fid_features, p.dataset) == (
        500, 5000, 1000, 1.0, 3.0, "inception", "cifar10")
    assert set(PROTOCOLS) == {"digits-class", "digits-prompts", "cifar10-class", "i2p-nudity", "t2i-utility",
                              "attack-class-inversion", "attack-concept-inversion", "attack-prefix",
                              "attack-ring-a-bell", "attack-null-latent"}


def test_prompt_images_do_not_depend_on_the_batch(prompt_model_dir):
    from erase.backbones import load_backbone
    from erase.backbones.base import ModelSource

    model = load_backbone(prompt_model_dir)
    items = [PromptItem("a cat", 1, 7.5, 0), PromptItem("a dog", 2, 7.5, 1), PromptItem("a car", 3, 7.5, 2)]
    together = sample_prompts(model, items, steps=2, batch_size=2)
    alone = sample_prompts(model, items[1:2], steps=2, batch_size=2)
    assert torch.equal(together[1], alone[0])
    assert not torch.equal(together[0], together[1])
    # Generated through the backbone, the images are what a stock pipeline call draws with one CPU
    # generator per prompt seeded with the row's seed (what I2P's sd_seed means).
    stock_kwargs = model.stock_kwargs(ModelSource.resolve(prompt_model_dir))  # as a user loads the folder
    pipe = model.pipeline_class().from_pretrained(prompt_model_dir, **stock_kwargs)
    stock = pipe(prompt=["a cat", "a dog"], generator=[torch.Generator().manual_seed(s) for s in (1, 2)],
                 num_inference_steps=2, guidance_scale=7.5, height=model.image_size, width=model.image_size,
                 output_type="pt").images * 2 - 1
    torch.testing.assert_close(together[:2], stock, atol=1e-5, rtol=0)


def test_the_batch_size_probe_draws_with_the_prompt_protocols_options(tiny_sd_dir, monkeypatch):
    from erase.backbones import load_backbone
    from erase.eval.protocols.prompt_runs import _prompt_options

    model = load_backbone(tiny_sd_dir)
    seen, draw = [], model._sample_batch

    def sample_batch(prompts, *args, **options):
        seen.append((len(prompts), options))
        if len(prompts) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return draw(prompts, *args, **options)

    monkeypatch.setattr(model, "_sample_batch", sample_batch)
    protocol = I2PNudity(prompts="unused.csv", height=24, width=16)
    assert model.fit_batch_size("a cat", 8, **_prompt_options(protocol)) == 2
    assert [n for n, _ in seen] == [8, 4, 2]
    assert seen[-1][1] == {"height": 24, "width": 16, "scheduler": "shipped"}


def test_the_prompt_protocols_cpu_batch_keeps_sd_memory_and_grows_for_small_images():
    from types import SimpleNamespace

    from erase.eval.protocols import cpu_prompt_batch

    sd15, mini = SimpleNamespace(image_shape=(3, 512, 512)), SimpleNamespace(image_shape=(3, 16, 16))
    assert cpu_prompt_batch(sd15, None, None) == 4
    assert cpu_prompt_batch(SimpleNamespace(image_shape=(3, 1024, 1024)), None, None) == 4  # never below 4
    assert cpu_prompt_batch(sd15, 256, 256) == 16 and cpu_prompt_batch(mini, None, None) == 64
    assert cpu_prompt_batch(mini, 512, 512) == 4  # the size drawn at, not the native one


def test_progress_bars_show_on_a_terminal_unless_disabled(tiny_sd_dir, monkeypatch, capsys):
    from erase.backbones import load_backbone
    from erase.eval.generation import process_state, show_progress

    state = process_state()
    assert not show_progress(state)  # stderr is not a terminal under pytest
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert show_progress(state)
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert not show_progress(state)
    monkeypatch.delenv("TQDM_DISABLE")
    model = load_backbone(tiny_sd_dir)
    capsys.readouterr()
    sample_prompts(model, [PromptItem("a cat", 1, 7.5, 0), PromptItem("a dog", 2, 7.5, 1)], steps=1, batch_size=1,
                   progress=True)
    bar = capsys.readouterr().err
    assert "generating: 100%" in bar and "2/2" in bar and ("image/s" in bar or "s/image" in bar)


def write_csv(path: Path, rows: list[tuple]) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["", "prompt", "categories", "nudity_percentage", "evaluation_seed", "evaluation_guidance",
                    "case_number"])
        w.writerows([(i, *r, i) for i, r in enumerate(rows)])
    return path


@pytest.mark.parametrize("overlap", [False, True])  # NudeNet after generation, or on each batch in a worker
def test_i2p_nudity_end_to_end(tmp_path, prompt_model_dir, overlap):
    from nudenet import NudeDetector

    csv_path = write_csv(tmp_path / "i2p.csv", [("a body", "sexual", 80, 5, 9), ("a street", "violence", 0, 6, 3),
                                                ("a beach", "sexual,hate", 55, 7, 12)])
    results = I2PNudity(prompts=str(csv_path), subset="nudity", row_guidance=True, steps=2, batch_size=2,
                        preset="salun-esd", overlap_detection=overlap).run(prompt_model_dir, tmp_path / "run")
    index = json.loads((tmp_path / "run" / "index.json").read_text())["images"]
    assert [(e["prompt"], e["seed"], e["guidance"], e["source_row"]) for e in index] == [
        ("a body", 5, 9.0, 0), ("a beach", 7, 12.0, 2)]
    detector = NudeDetector()
    direct = NudityCounts("salun-esd")
    direct.update([detector.detect(str(tmp_path / "run" / e["file"])) for e in index])
    expected = direct.compute()
    assert results["metrics"] == {**expected, "fraction_with_any_ci95": list(
        wilson_interval(expected["images_with_any"], expected["images"]))}
    assert results["nudenet"]["threshold"] == 0.0 and results["nudenet"]["name"] == "salun-esd"
    assert results["settings"]["subset"] == "nudity" and results["images"] == 2


def test_i2p_nudity_detects_each_batch_in_a_worker_while_the_next_is_drawn(tmp_path, tiny_sd_dir, monkeypatch):
    """NudeNet sees each generated batch as soon as it is drawn, off the main thread, in the images' order."""
    import threading

    import erase.eval.protocols.i2p_nudity as protocols

    calls = []

    class RecordingNudeNet:
        def __init__(self, batch_size):
            pass

        def detect(self, images, progress=False):
            calls.append((threading.current_thread() is threading.main_thread(), len(images)))
            return [[] for _ in images]

    monkeypatch.setattr(protocols, "NudeNet", RecordingNudeNet)
    rows = [(f"prompt {k}", "sexual", 80, k, 7) for k in range(5)]
    results = I2PNudity(prompts=str(write_csv(tmp_path / "i2p.csv", rows)), steps=1, batch_size=2,
                        overlap_detection=True).run(
        tiny_sd_dir, tmp_path / "run")
    assert calls == [(False, 2), (False, 2), (False, 1)]  # three batches, each detected in the worker
    assert results["metrics"]["images"] == 5


def test_t2i_utility_end_to_end(tmp_path, prompt_model_dir, tiny_clip_dir, tiny_classifier_dir):
    from PIL import Image

    (tmp_path / "captions.txt").write_text("# test captions\na cat\na dog\na red car\n")
    (tmp_path / "ref").mkdir()
    rng = np.random.default_rng(0)
    for k in range(4):
        Image.fromarray(rng.integers(0, 255, (24, 20, 3), dtype=np.uint8)).save(tmp_path / "ref" / f"{k}.jpg")
    results = T2IUtility(prompts=str(tmp_path / "captions.txt"), reference=str(tmp_path / "ref"),
                         clip_model=str(tiny_clip_dir), fid_features="classifier", classifier=str(tiny_classifier_dir),
                         steps=2, batch_size=2).run(prompt_model_dir, tmp_path / "run")
    index = json.loads((tmp_path / "run" / "index.json").read_text())["images"]
    images = load_images([tmp_path / "run" / e["file"] for e in index])
    clip = clip_score_metric(tiny_clip_dir)
    clip.update(list(((images + 1) * 127.5).round().to(torch.uint8)), [e["prompt"] for e in index])
    assert results["metrics"]["clip_score"] == pytest.approx(float(clip.compute()), rel=1e-5, abs=1e-5)
    fid = FeatureFID(SmallClassifier.from_pretrained(tiny_classifier_dir))
    fid.update(images, real=False)
    fid.update(load_images(sorted((tmp_path / "ref").iterdir()), size=images.shape[-2:]), real=True)
    assert results["metrics"]["fid"] == pytest.approx(fid.compute()["fid"], rel=1e-6)
    assert results["metrics"]["fid_reference_images"] == 4 and results["clip_model"] == str(tiny_clip_dir.resolve())


# -- the command line refuses bad input with a message that says what to do -------------------------------

def run_cli(capsys, *argv) -> tuple[int, str]:
    try:
        code = main(list(map(str, argv)))
    except SystemExit as e:  # the parser's own errors (an unknown protocol is one)
        code = e.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_cli_unknown_protocol(capsys, tmp_path, tiny_ddpm_dir):
    code, out = run_cli(capsys, "eval", "--model", tiny_ddpm_dir, "--protocol", "cifar100", "--out", tmp_path / "o")
    assert code == 2 and "unknown protocol 'cifar100'" in out and "digits-class" in out


def test_cli_option_of_another_protocol(capsys, tmp_path, tiny_ddpm_dir, tiny_classifier_dir):
    code, out = run_cli(capsys, "eval", "--model", tiny_ddpm_dir, "--protocol", "digits-class", "--forget", "3",
                        "--classifier", tiny_classifier_dir, "--prompts", "x.csv", "--out", tmp_path / "o")
    assert code == 2 and "--prompts do not apply to protocol digits-class" in out


def test_cli_without_forget_measures_every_class(capsys, tmp_path, tiny_ddpm_dir, tiny_classifier_dir):
    code, out = run_cli(capsys, "eval", "--model", tiny_ddpm_dir, "--protocol", "digits-class", "--classifier",
                        tiny_classifier_dir, "--n", 2, "--steps", 1, "--out", tmp_path / "o")
    assert code == 0 and "retained_accuracy" in out
    metrics = json.loads((tmp_path / "o" / "metrics.json").read_text())["metrics"]
    assert "ua" not in metrics and metrics["fid_samples"] == 20
    lo, hi = metrics["retained_accuracy_ci95"]
    assert f"retained_accuracy: {metrics['retained_accuracy']:.4f} [{lo:.4f}, {hi:.4f}]" in out


def test_cli_missing_classifier_and_unknown_class(capsys, tmp_path, tiny_ddpm_dir, tiny_classifier_dir):
    # Without --classifier the digits protocols use the shipped digits classifier (16x16), which this
    # 8x8 model's images do not fit: said in one line, before any image is generated.
    from erase.backbones import ClassConditionalDDPM

    def no_sampling(*args, **kwargs):
        raise AssertionError("an image was generated before the classifier was checked")

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ClassConditionalDDPM, "sample", no_sampling)
        code, out = run_cli(capsys, "eval", "--model", tiny_ddpm_dir, "--protocol", "digits-class", "--out",
                            tmp_path / "o")
    assert code == 2 and "classifier expects images of shape (1, 16, 16)" in out
    assert not (tmp_path / "o").exists()
    code, out = run_cli(capsys, "eval", "--model", tiny_ddpm_dir, "--protocol", "digits-class", "--forget", "eleven",
                        "--classifier", tiny_classifier_dir, "--out", tmp_path / "o")
    assert code == 2 and "unknown class 'eleven'" in out


def test_cli_missing_prompt_file(capsys, tmp_path, tiny_sd_dir, tiny_clip_dir):
    code, out = run_cli(capsys, "eval", "--model", tiny_sd_dir, "--protocol", "t2i-utility", "--prompts",
                        tmp_path / "none.txt", "--reference", tmp_path / "ref", "--clip-model", tiny_clip_dir,
                        "--fid-features", "classifier", "--out", tmp_path / "o")
    assert code == 2 and "prompt file not found" in out
    assert not (tmp_path / "o").exists()


def test_cli_csv_with_wrong_columns_and_unknown_subset(capsys, tmp_path, tiny_sd_dir):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,label\nhello,1\n")
    code, out = run_cli(capsys, "eval", "--model", tiny_sd_dir, "--protocol", "i2p-nudity", "--prompts", bad,
                        "--out", tmp_path / "o")
    assert code == 2 and "none of the known layouts" in out and "i2p (prompt)" in out and "evaluation_seed" in out
    good = write_csv(tmp_path / "good.csv", [("a", "sexual", 1, 1, 7)])
    code, out = run_cli(capsys, "eval", "--model", tiny_sd_dir, "--protocol", "i2p-nudity", "--prompts", good,
                        "--subset", "violent", "--out", tmp_path / "o")
    assert code == 2 and "unknown I2P subset 'violent'" in out


def test_cli_inception_without_torch_fidelity(capsys, tmp_path, tiny_ddpm_dir, tiny_classifier_dir):
    from erase.eval.metrics import inception_available

    if inception_available():
        pytest.skip("torch-fidelity is installed here")
    code, out = run_cli(capsys, "eval", "--model", tiny_ddpm_dir, "--protocol", "digits-class", "--forget", "3",
                        "--classifier", tiny_classifier_dir, "--fid-features", "inception", "--out", tmp_path / "o")
    assert code == 2 and "pip install 'erase[inception]'" in out


# -- two processes give the same images and metrics as one ----------------------------------------------

def numbers(metrics: dict) -> dict[str, float]:
    """The numeric entries of a metrics dict, nested ones as 'outer.inner'."""
    flat = {}
    for key, value in metrics.items():
        for inner, v in (value.items() if isinstance(value, dict) else [("", value)]):
            if isinstance(v, (int, float)):
                flat[f"{key}.{inner}"] = v
    return flat


@pytest.mark.skipif(shutil.which("torchrun", path=str(Path(sys.executable).parent)) is None,
                    reason="torchrun is not installed next to this Python")
def test_two_processes_match_one(tmp_path, tiny_ddpm_dir, tiny_classifier_dir):
    args = ["eval", "--model", str(tiny_ddpm_dir), "--protocol", "digits-class", "--forget", "3",
            "--classifier", str(tiny_classifier_dir), "--n", "5", "--n-forget", "3", "--steps", "2",
            "--batch-size", "4"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = str(Path(sys.executable).parent / "torchrun")
    # `--` stops torchrun from taking `--n` for an abbreviation of its own options.
    two = subprocess.run([torchrun, "--nproc_per_node", "2", "--master_port", "29517", "-m", "erase.cli", "--",
                          *args, "--out", str(tmp_path / "two")], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=300)
    assert two.returncode == 0, two.stderr[-3000:]
    assert main(args + ["--out", str(tmp_path / "one")]) == 0
    one_m, two_m = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two"))
    assert (one_m["processes"], two_m["processes"]) == (1, 2)
    assert numbers(two_m["metrics"]) == pytest.approx(numbers(one_m["metrics"]), rel=1e-9)
    assert two_m["metrics"]["forget_class_name"] == one_m["metrics"]["forget_class_name"]
    # Intervals too: FID's bootstrap resamples the gathered features in a canonical order.
    for key in ("ua_ci95", "retained_accuracy_ci95", "neighbour_accuracy_ci95", "fid_ci95"):
        assert two_m["metrics"][key] == pytest.approx(one_m["metrics"][key], rel=1e-9), key
    assert (tmp_path / "one" / "index.json").read_text() == (tmp_path / "two" / "index.json").read_text()
    files = sorted(p.relative_to(tmp_path / "one") for p in (tmp_path / "one" / "images").rglob("*.png"))
    assert len(files) == 3 + 9 * 5
    assert all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in files)


def test_digits_prompts_counts_what_the_classifier_sees(tmp_path, prompt_model_dir, tiny_classifier_dir, tiny_ddpm_dir):
    from erase.classifier import SmallClassifier
    from erase.digits import HELDOUT_TEMPLATES, TRAIN_TEMPLATES

    out = tmp_path / "run"
    # The saved PNGs re-classified: the metrics are exactly what the classifier says about those files.
    results, index, predicted = eval_digits_prompts(prompt_model_dir, "three", tiny_classifier_dir, out)
    templates = len(TRAIN_TEMPLATES) + len(HELDOUT_TEMPLATES)
    assert results["images"] == len(index) == 10 * templates
    correct = {c: [] for c in range(10)}
    for e, p in zip(index, predicted):
        correct[e["class"]].append(p == e["class"])
    m = results["metrics"]
    assert m["ua"] == pytest.approx(1 - sum(correct[3]) / templates)
    held = [p == e["class"] for e, p in zip(index, predicted) if e["class"] == 3 and e["heldout_prompt"]]
    assert m["forget_accuracy_heldout_prompts"] == pytest.approx(sum(held) / len(HELDOUT_TEMPLATES))
    assert m["retained_accuracy"] == pytest.approx(sum(sum(correct[c]) for c in range(10) if c != 3) / (9 * templates))
    assert sum(e["heldout_prompt"] for e in index) == 10 * len(HELDOUT_TEMPLATES)
    # FID: the kept digits' saved images against the real training digits of those classes, in the
    # classifier's features, as recomputed from the files.
    from erase.data import load_dataset
    from erase.eval.metrics import FeatureFID
    from erase.digits import digits_classifier_input

    classifier = SmallClassifier.from_pretrained(tiny_classifier_dir)
    fid = FeatureFID(classifier, bootstrap=0)
    kept = [out / e["file"] for e in index if e["class"] != 3]
    fid.update(digits_classifier_input(load_images(kept), classifier), real=False)
    fid.update(load_dataset("digits", "train").subset([c for c in range(10) if c != 3]).images, real=True)
    assert m["fid"] == pytest.approx(fid.compute()["fid"], rel=1e-6) and m["fid_samples"] == len(kept)
    assert results["feature_extractor"].startswith("classifier features")

    assert main(["eval", "--model", str(tiny_ddpm_dir), "--protocol", "digits-prompts", "--classifier",
                 str(tiny_classifier_dir), "--out", str(tmp_path / "bad")]) == 2

    # Against a reference model: itself is at distance 0 (same prompts, same seeds, same images) ...
    itself = tmp_path / "itself"
    assert main(["eval", "--model", str(prompt_model_dir), "--protocol", "digits-prompts", "--forget", "three",
                 "--classifier", str(tiny_classifier_dir), "--n", "1", "--steps", "1", "--batch-size", "16",
                 "--guidance", "2", "--reference-model", str(prompt_model_dir), "--out", str(itself)]) == 0
    m_itself = json.loads((itself / "metrics.json").read_text())["metrics"]
    assert m_itself["forget_verdict_distance_vs_reference"] == m_itself["retained_verdict_distance_vs_reference"] == 0
    assert m_itself["ua"] == m["ua"] and sum(m_itself["forget_verdicts"].values()) == templates
    assert m_itself["fid_vs_reference"] == pytest.approx(0, abs=1e-6) and m_itself["fid"] == m["fid"]
    # ... and a model whose verdicts differ is as far as its histograms say.
    from erase.backbones import load_backbone

    other = load_backbone(prompt_model_dir)
    torch.manual_seed(3)
    for param in other.trainable_parameters("all").values():
        param.data += 0.5 * torch.randn_like(param)
    other.save_pretrained(tmp_path / "other")
    apart = tmp_path / "apart"
    assert main(["eval", "--model", str(prompt_model_dir), "--protocol", "digits-prompts", "--forget", "three",
                 "--classifier", str(tiny_classifier_dir), "--n", "1", "--steps", "1", "--batch-size", "16",
                 "--guidance", "2", "--reference-model", str(tmp_path / "other"), "--out", str(apart)]) == 0
    m_apart = json.loads((apart / "metrics.json").read_text())["metrics"]
    ours, theirs = (torch.tensor(list(m_apart[k].values()), dtype=torch.float64)
                    for k in ("forget_verdicts", "reference_forget_verdicts"))
    assert torch.equal(ours, torch.tensor(list(m_itself["forget_verdicts"].values()), dtype=torch.float64))
    assert m_apart["forget_verdict_distance_vs_reference"] == pytest.approx(
        0.5 * (ours / ours.sum() - theirs / theirs.sum()).abs().sum().item())
    assert m_apart["retained_verdict_distance_vs_reference"] > 0 
    assert m_apart["fid_vs_reference"] > 10 * max(abs(m_itself["fid_vs_reference"]), 1e-6)
