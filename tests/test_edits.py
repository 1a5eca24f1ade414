"""Closed-form edits (uce, speed, hardening): the algebra, the backbone contract on every text family,
the entry point and its outputs, several concepts at once, and bad input."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from erase.backbones import load_backbone
from erase.edits import EDITS, apply_edit
from erase.edits.algebra import null_space_projector, null_space_transform, uce_transform
from erase.edits.base import edit_rows
from erase.edits.speed import Speed, SpeedConfig
from erase.edits.uce import UCE, UCEConfig
from erase.utils import EraseError

from conftest import eval_digits_prompts, write_concept_folder
from tiny_pipelines import FAMILIES

pytestmark = pytest.mark.usefixtures("one_thread")

MINI_SD = Path(__file__).resolve().parent.parent / "models" / "mini-sd"
MINI_FLOW = MINI_SD.parent / "mini-flow"
PAIRS = [("the number 3", "the digit 4"), ("a drawing of a 3", "the digit 4")]
RETAIN = ["a cat", "the digit 5"]


def _rows(n, d, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(n, d, generator=g, dtype=torch.float64)
    return torch.randn(n, rank, generator=g, dtype=torch.float64) @ torch.randn(rank, d, generator=g, dtype=torch.float64)


# -- the algebra ----------------------------------------------------------------------------------------
def test_uce_sends_erased_rows_to_the_anchor_outputs_and_keeps_preserved_ones():
    W = _rows(12, 16, seed=1)
    erase, anchor, preserve = _rows(3, 16, seed=2), _rows(3, 16, seed=3), _rows(5, 16, seed=4)
    M = uce_transform(erase, anchor, preserve, lamb=1e-8, erase_scale=1.0, preserve_scale=1.0)
    # 8 constraints in 16 dimensions: both sets are met exactly as λ → 0.
    torch.testing.assert_close(erase @ M.T @ W.T, anchor @ W.T, atol=1e-5, rtol=0)
    torch.testing.assert_close(preserve @ M.T @ W.T, preserve @ W.T, atol=1e-5, rtol=0)


def test_uce_is_the_minimiser_of_its_objective():
    W = _rows(12, 16, seed=1)
    erase, anchor, preserve = _rows(40, 16, seed=2), _rows(40, 16, seed=3), _rows(60, 16, seed=4)
    lamb, se, sp = 0.3, 1.0, 0.5
    new = W @ uce_transform(erase, anchor, preserve, lamb, se, sp)
    # ∂/∂W' of se Σ‖W'c_e − W c_a‖² + sp Σ‖W'c_p − W c_p‖² + λ‖W' − W‖² vanishes at the solution.
    grad = se * (new @ erase.T - W @ anchor.T) @ erase + sp * (new - W) @ preserve.T @ preserve + lamb * (new - W)
    assert grad.abs().max() < 1e-9 * new.abs().max() * 100


def test_null_space_edit_leaves_preserved_rows_exactly_and_moves_erased_ones():
    W = _rows(12, 16, seed=1)
    erase, anchor = _rows(3, 16, seed=2), _rows(3, 16, seed=3)
    preserve = _rows(30, 16, rank=6, seed=4)  # 30 rows spanning 6 of the 16 directions
    projector = null_space_projector(preserve, 1e-10)
    assert int(torch.trace(projector).round()) == 10
    M = null_space_transform(erase, anchor, projector, lamb=1e-3)
    # Exact up to float64 rounding (a 1/λ-fold amplified 1e-16).
    torch.testing.assert_close(preserve @ M.T @ W.T, preserve @ W.T, atol=1e-9, rtol=1e-9)
    before = (erase @ W.T - anchor @ W.T).norm()
    after = (erase @ M.T @ W.T - anchor @ W.T).norm()
    assert after < 0.5 * before


# -- the backbone contract on every text family ---------------------------------------------------------
@pytest.fixture(scope="module", params=["sd", *FAMILIES])
def text_model(request, tiny_sd_dir):
    if request.param == "sd":
        return load_backbone(tiny_sd_dir)
    backbone_cls, build = FAMILIES[request.param]
    return backbone_cls(build())


def _read_rows(model, layer, prompt):
    """The rows `layer` reads (one per token, or one per prompt) when the denoiser runs on `prompt`."""
    seen = []
    handle = layer.register_forward_hook(lambda module, args, output: seen.append(args[0].detach()) or None)
    try:
        model.predict(torch.randn(1, *model.sample_shape), torch.tensor([500]), model.encode_conditions([prompt]))
    finally:
        handle.remove()
    return seen[0].reshape(-1, seen[0].shape[-1]).float()


def test_text_entry_layers_read_exactly_the_rows_the_contract_gives(text_model):
    entries = text_model.text_entries()
    assert "tokens" in entries and set(entries["tokens"].layers) == set(text_model.text_entry_layers())
    params = dict(text_model.denoiser.named_parameters())
    for name, entry in entries.items():
        assert entry.layers and all(isinstance(layer, torch.nn.Linear) for layer in entry.layers.values())
        assert all(f"{layer}.weight" in params for layer in entry.layers)
        segments = entry.inputs(["the number 3"])
        given = torch.cat([s.embeddings[0] for s in segments])
        # Every layer of the entry reads these rows (on SD3 without T5 only zero rows follow the tokens',
        # which no weight edit reaches).
        for layer in entry.layers.values():
            seen = _read_rows(text_model, layer, "the number 3")
            torch.testing.assert_close(seen[:len(given)], given.float(), atol=1e-5, rtol=0)
        assert all(0 <= int(s.last_token[0]) < s.embeddings.shape[1] for s in segments)
    assert all(0 < int(s.last_token[0]) for s in entries["tokens"].inputs(["the number 3"]))


def _entry_layers(model) -> dict:
    return {name: layer for entry in model.text_entries().values() for name, layer in entry.layers.items()}


def test_uce_on_every_family_moves_erased_rows_towards_the_anchor_and_only_the_text_entry_layers(text_model):
    import copy

    model = copy.deepcopy(text_model)
    entries = model.text_entries()
    rows = {name: edit_rows(entry.inputs, PAIRS, RETAIN) for name, entry in entries.items()}
    before = {n: p.detach().clone() for n, p in model.denoiser.named_parameters()}
    weights = {n: layer.weight.detach().double().clone() for n, layer in _entry_layers(model).items()}
    changed, summary = apply_edit(model, UCE(UCEConfig()), PAIRS, RETAIN)
    after = dict(model.denoiser.named_parameters())
    assert set(changed) == {f"{n}.weight" for n in weights}
    assert all(torch.equal(before[n], p) for n, p in after.items() if n not in changed)
    assert all(not torch.equal(before[n], after[n]) for n in changed)
    assert set(summary["entries"]) == set(entries)

    for name, entry in entries.items():
        layers, r = entry.layers, rows[name]

        def error(rows_in, targets, current: bool):
            return float(sum(((rows_in @ (layers[n].weight.detach().double() if current else weights[n]).T
                               - targets @ weights[n].T) ** 2).sum() for n in layers))

        assert error(r.erase, r.anchor, current=True) < 0.5 * error(r.erase, r.anchor, current=False)
        assert summary["entries"][name]["rounds"][0]["erase_error"] < 0.75
        # The preserved rows move much less than the erased ones did.
        assert error(r.preserve, r.preserve, True) / error(r.preserve, torch.zeros_like(r.preserve), False) < 0.1


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_the_pooled_text_is_edited_and_the_empty_prompts_pooled_row_kept(family):
    """The pooled CLIP embedding is an entry of its own on SD3 and FLUX, and the empty prompt's row of it
    (the unconditional prediction's, which guidance subtracts from every prompt's) is kept by every edit."""
    import copy
    import dataclasses

    from erase.backbones.flux import FluxBackbone
    from erase.backbones.sd3 import StableDiffusion3Backbone
    from tiny_pipelines import tiny_flux_pipeline, tiny_sd3_pipeline

    model = (StableDiffusion3Backbone(tiny_sd3_pipeline()) if family == "sd3" else FluxBackbone(tiny_flux_pipeline()))
    assert set(model.text_entries()) == {"tokens", "pooled"}
    pooled = model.text_entries()["pooled"]
    assert pooled.always_preserved == ("",)
    null = pooled.inputs([""])[0].embeddings[:, 0].double()

    def null_change(backbone) -> float:
        layer = next(iter(backbone.text_entries()["pooled"].layers.values()))
        before = layer.weight.detach().double().clone()
        apply_edit(backbone, UCE(UCEConfig()), PAIRS, RETAIN)
        return float((null @ (layer.weight.detach().double() - before).T).norm() / (null @ before.T).norm())

    kept = null_change(copy.deepcopy(model))
    unmarked = copy.deepcopy(model)
    entries = {**unmarked.text_entries()}
    entries["pooled"] = dataclasses.replace(entries["pooled"], always_preserved=())
    unmarked.text_entries = lambda: entries
    moved_unmarked = null_change(unmarked)
    assert kept < moved_unmarked
    # The tiny FLUX pools every prompt alike (8 dims, cosine 0.86-0.99 with the empty prompt): erasing any moves it.
    if family == "sd3":
        assert kept < 0.5 * moved_unmarked


def test_the_ddpm_refuses_an_edit_in_one_line(tiny_ddpm_dir, tmp_path):
    from erase.cli import main

    model = load_backbone(tiny_ddpm_dir)
    with pytest.raises(EraseError, match="no layers where a text embedding enters") as err:
        model.text_entry_layers()
    assert "\n" not in str(err.value)
    out = tmp_path / "out"
    assert main(["unlearn", "--model", str(tiny_ddpm_dir), "--method", "uce", "--forget", "3", "--out", str(out)]) != 0
    assert not out.exists()


# -- on the miniature Stable Diffusion --------------------------------------------------------------------
def test_an_edit_names_a_miniatures_class_words_in_a_list(tmp_path):
    """`--forget three,five,seven` on a miniature: each digit's training captions erased towards the next
    digit's, the seven other digits' captions kept, as the fine-tuning methods resolve the same list."""
    from erase.cli import main

    out = tmp_path / "out"
    assert main(["unlearn", "--model", "mini-sd", "--method", "uce", "--forget", "three,five,7", "--out", str(out)]) == 0  # by its name
    data = json.loads((out / "erase_config.json").read_text())["data"]
    assert data["concepts"] == ["three", "five", "seven"]
    assert data["forget_prompts"] == 3 * 8 and data["retain_prompts"] == 7 * 8


@pytest.fixture(scope="module")
def mini_sd():
    return load_backbone(MINI_SD)


def _predictions(model, prompts):
    torch.manual_seed(0)
    x = torch.randn(len(prompts), *model.sample_shape)
    with torch.no_grad():
        return model.predict(x, torch.full((len(prompts),), 500), model.encode_conditions(prompts))


def test_speed_keeps_the_preserved_prompts_predictions_exactly(mini_sd):
    import copy

    model = copy.deepcopy(mini_sd)
    kept = ["a handwritten digit zero", "the number 5"]  # 2 prompts + the null text: rank 48 of 64
    before_kept, before_null, before_three = (_predictions(model, kept), _predictions(model, [""]),
                                              _predictions(model, ["a handwritten digit three"]))
    pairs = [("a handwritten digit three", "a handwritten digit four"), ("three", "a handwritten digit four")]
    apply_edit(model, Speed(SpeedConfig(null_threshold=1e-10)), pairs, kept)
    torch.testing.assert_close(_predictions(model, kept), before_kept, atol=1e-4, rtol=0)
    torch.testing.assert_close(_predictions(model, [""]), before_null, atol=1e-4, rtol=0)
    assert (_predictions(model, ["a handwritten digit three"]) - before_three).abs().max() > 1e-2


def test_hardening_weakens_the_closed_form_adversary(mini_sd):
    import copy

    pairs = [("a handwritten digit three", "a handwritten digit four"), ("the number 3", "a handwritten digit four")]
    _, plain = apply_edit(copy.deepcopy(mini_sd), UCE(UCEConfig(harden=0)), pairs, ["the number 5"])
    _, hardened = apply_edit(copy.deepcopy(mini_sd), UCE(UCEConfig(harden=2)), pairs, ["the number 5"])
    rounds = hardened["entries"]["tokens"]["rounds"]
    assert len(rounds) == 3 and rounds[1]["erase_rows"] == 2 * rounds[0]["erase_rows"]
    assert rounds[0]["erase_error"] == pytest.approx(plain["entries"]["tokens"]["rounds"][0]["erase_error"])
    # The embedding that best regenerates the concept regenerates it worse after each round.
    assert rounds[-1]["adversarial_error"] > rounds[0]["adversarial_error"]


@pytest.mark.slow
@pytest.mark.parametrize("miniature", [MINI_SD, MINI_FLOW], ids=["mini-sd", "mini-flow"])
@pytest.mark.parametrize("method", list(EDITS))
def test_three_is_gone_from_the_miniature_and_five_is_kept(method, miniature, tmp_path):
    import erase
    from erase.digits import classify_digits, default_classifier_path
    from erase.classifier import SmallClassifier

    result = erase.unlearn(str(miniature), method, "three", tmp_path / "out")
    classifier = SmallClassifier.from_pretrained(default_classifier_path())
    original = load_backbone(miniature)
    seeds = list(range(8))

    def drawn(model, prompt, digit):
        images = model.sample([prompt] * 8, seeds, steps=15, guidance=3.0, batch_size=8, progress=False)
        return float((classify_digits(images, classifier) == digit).float().mean())

    assert drawn(original, "a handwritten digit three", 3) >= 0.75
    assert drawn(result.model, "a handwritten digit three", 3) <= 0.125
    assert drawn(result.model, "a drawing of the number three", 3) <= 0.125  # an unseen paraphrase
    assert drawn(result.model, "a handwritten digit five", 5) >= drawn(original, "a handwritten digit five", 5) - 0.125


# -- the entry point and its outputs ------------------------------------------------------------------------
def test_erase_unlearn_writes_the_model_the_delta_and_the_config(tiny_sd_dir, tmp_path, capsys):
    from erase.cli import main

    out = tmp_path / "edited"
    assert main(["unlearn", "--model", str(tiny_sd_dir), "--method", "speed", "--forget", "the number 3",
                 "--anchor", "the digit 4", "--retain", "a cat,a dog", "--harden", "1", "--out", str(out)]) == 0
    summary = json.loads((out / "erase_config.json").read_text())
    assert summary["method"] == "speed" and summary["config"]["harden"] == 1 and summary["wall_time_s"] > 0
    assert summary["data"]["concepts"] == ["the number 3"] and summary["data"]["retain_prompts"] == 2
    assert shlex.split(summary["command"])[:2] == ["erase", "unlearn"] and "--harden" in summary["command"]
    assert not (out / "loss_history.jsonl").exists()  # an edit has no steps, so no losses
    delta = load_file(out / "delta.safetensors")
    assert delta and all(k.endswith((".attn2.to_k.weight", ".attn2.to_v.weight")) for k in delta)
    edited, original = load_backbone(out), load_backbone(tiny_sd_dir)
    state = edited.denoiser.state_dict()
    assert all(torch.equal(state[k], v) for k, v in delta.items())
    assert all(not torch.equal(original.denoiser.state_dict()[k], v) for k, v in delta.items())
    # The delta applied to the original with stock loading gives the edited model.
    original.denoiser.load_state_dict(delta, strict=False)
    assert all(torch.equal(original.denoiser.state_dict()[k], v) for k, v in state.items())


def test_erase_methods_lists_the_edits(capsys):
    from erase.cli import main

    assert main(["methods"]) == 0
    listed = capsys.readouterr().out
    assert all(f"\n{name} " in listed for name in EDITS) and "closed-form" in listed


# -- several concepts, mass-erasure files, bad input ------------------------------------------------------------
def test_a_list_of_concepts_merges_retain_sets_without_the_erased_prompts(tmp_path):
    from erase.concept_sets import resolve_concepts

    three = write_concept_folder(tmp_path, "three", ["the number 3"], "the digit 4", ["the number 5", "the number 7", "a cat"])
    seven = write_concept_folder(tmp_path, "seven", ["the number 7"], "the digit 4", ["the number 3", "a dog"])
    listed = tmp_path / "list.txt"
    listed.write_text(f"# two concepts\n{three}\n{seven}\n")
    for forget in (f"{three},{seven}", str(listed)):
        found = resolve_concepts(forget)
        assert [c.name for c in found.concepts] == ["three", "seven"]
        assert found.retain == ["the number 5", "a cat", "a dog"]


def test_mass_erasure_file_in_the_published_layout(tmp_path):
    from erase.concept_sets import resolve_concepts

    csv = tmp_path / "mass.csv"
    csv.write_text("id,type,text,concept,seed\n1,erase,A portrait of Ann,Ann,1\n2,erase,\"Ann, smiling\",Ann,2\n"
                   "3,erase,A sketch of Bob,Bob,3\n4,retain,A portrait of Cy,Cy,4\n")
    found = resolve_concepts(str(csv))
    assert [(c.name, c.forget, c.anchor) for c in found.concepts] == [
        ("Ann", ["A portrait of Ann", "Ann, smiling"], ""), ("Bob", ["A sketch of Bob"], "")]
    assert found.retain == ["A portrait of Cy"]


def test_a_config_of_another_method_or_edit_is_refused_before_any_work(tiny_sd_dir, tmp_path):
    """Methods and edits build their config the same way (`erase.config.make_config`): an instance of
    their own Config class or a dict, with keyword overrides; another class's config is one clear line."""
    from erase.config import make_config
    from erase.loop import unlearn
    from erase.methods import get_method
    from erase.methods.esd import ESDConfig

    assert make_config(UCE, UCEConfig(lamb=0.5), preserve_scale=2.0) == UCEConfig(lamb=0.5, preserve_scale=2.0)
    assert make_config(get_method("esd"), {"steps": 7}, lr=1e-3) == ESDConfig(steps=7, lr=1e-3)
    for method, config, wrong in (("uce", ESDConfig(), "ESDConfig is not the config of uce (UCEConfig)"),
                                  ("esd", UCEConfig(), "UCEConfig is not the config of esd (ESDConfig)")):
        with pytest.raises(EraseError, match=re.escape(wrong)):
            unlearn(tiny_sd_dir, method, "the number 3", tmp_path / method, config=config)
        assert not (tmp_path / method).exists()


@pytest.mark.parametrize("args, message", [
    (["--forget", "{three},{three}"], "twice"),
    (["--forget", "{three},no-such-concept"], "unknown concept 'no-such-concept'"),
    (["--forget", "{three}", "--retain", "the number 3,a cat"], "both a prompt to forget and one to retain"),
    (["--forget", "{bad}"], "first line must be id,type,text,concept,seed"),
    (["--forget", "{three}", "--images", "8"], "--images applies to fine-tuning methods only"),
    (["--forget", "{three}", "--seed", "1"], "--seed is an option of the fine-tuning methods, not of uce"),
    (["--forget", "{three}", "--lamb", "0"], "lamb must be positive"),
])
def test_bad_input_is_one_line_and_nothing_is_written(tiny_sd_dir, tmp_path, capsys, args, message):
    from erase.cli import main

    three = write_concept_folder(tmp_path, "three", ["the number 3"], "the digit 4", ["a cat"])
    bad = tmp_path / "bad.csv"
    bad.write_text("name,prompt\nAnn,A portrait of Ann\n")
    args = [a.format(three=three, bad=bad) for a in args]
    out = tmp_path / "out"
    try:
        code = main(["unlearn", "--model", str(tiny_sd_dir), "--method", "uce", "--out", str(out), *args])
    except SystemExit as e:  # the option parser's refusals
        code = e.code
    assert code != 0
    errors = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(errors) == 1 and message in errors[0], errors
    assert not out.exists()


# -- the mass-erasure metrics of the digits protocol ------------------------------------------------------------
def test_digits_prompts_with_several_erased_digits_reports_h_o(tmp_path, tiny_sd_dir, tiny_classifier_dir):
    from erase.cli import main
    from erase.eval.metrics import harmonic_h_o

    edited = tmp_path / "edited"
    assert main(["unlearn", "--model", str(tiny_sd_dir), "--method", "uce", "--forget", "the number 3",
                 "--anchor", "the digit 4", "--out", str(edited)]) == 0
    out = tmp_path / "run"
    results, index, predicted = eval_digits_prompts(edited, "three,5,seven", tiny_classifier_dir, out)
    accuracy = {c: sum(p == c for e, p in zip(index, predicted) if e["class"] == c) /
                sum(e["class"] == c for e in index) for c in range(10)}
    m = results["metrics"]
    assert m["erased_classes"] == ["three", "five", "seven"] and "ua" not in m
    assert m["erased_accuracy"] == pytest.approx((accuracy[3] + accuracy[5] + accuracy[7]) / 3)
    assert m["kept_accuracy"] == pytest.approx(sum(accuracy[c] for c in (0, 1, 2, 4, 6, 8, 9)) / 7)
    assert m["h_o"] == pytest.approx(harmonic_h_o(m["erased_accuracy"], m["kept_accuracy"]))
    assert m["erase_wall_time_s"] == json.loads((edited / "erase_config.json").read_text())["wall_time_s"]
    # The report shows the command the edit recorded (it cannot rebuild one from a fine-tuning method).
    assert main(["report", str(out), "--out", str(tmp_path / "report")]) == 0
    assert harmonic_h_o(0.0, 1.0) == 1.0 and harmonic_h_o(1.0, 1.0) == 0.0
    assert harmonic_h_o(0.5, 0.25) == pytest.approx(1 / 3)
    assert main(["eval", "--model", str(edited), "--protocol", "digits-prompts", "--forget", "three,3",
                 "--classifier", str(tiny_classifier_dir), "--out", str(tmp_path / "bad")]) != 0
    assert not (tmp_path / "bad").exists()


def test_bench_times_edits_against_a_finetune_step(tiny_sd_dir, tmp_path):
    from erase.cli import main

    csv = tmp_path / "mass.csv"
    csv.write_text("id,type,text,concept,seed\n1,erase,the number 3,three,1\n2,erase,a 3,three,2\n"
                   "3,erase,the number 7,seven,3\n4,retain,a cat,cat,4\n5,retain,a dog,dog,5\n")
    out = tmp_path / "bench"
    assert main(["bench", "--model", str(tiny_sd_dir), "--edits", "uce,speed", "--edit-concepts", "1,2",
                 "--concepts-file", str(csv), "--steps", "2", "--rounds", "1", "--batch-size", "2",
                 "--out", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    rows = {(r["edit"], r["concepts"]): r for r in report["edits"]}
    assert set(rows) == {("uce", 1), ("uce", 2), ("speed", 1), ("speed", 2)}
    assert rows[("uce", 1)]["forget_prompts"] == 2 and rows[("uce", 2)]["forget_prompts"] == 3
    step = report["finetune_step"]["seconds_per_step"]
    assert all(r["seconds"] > 0 and r["vs_finetune_step"] == pytest.approx(r["seconds"] / step) for r in rows.values())
    assert "vs one finetune step" in (out / "bench.md").read_text()
    assert main(["bench", "--model", str(tiny_sd_dir), "--edits", "uce", "--edit-concepts", "5",
                 "--concepts-file", str(csv), "--out", str(tmp_path / "too-many")]) != 0
