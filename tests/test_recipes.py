"""Recipes: shipped and user files checked field by field before any work, a recipe run equal to its
stages run one by one, a killed recipe resumed bit for bit, the terms checked against their method."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import erase
from erase.backbones import load_backbone
from erase.cli import main
from erase.loop import unlearn
from erase.unlearning.recipe import load_recipe, shipped_recipes
from erase.utils import EraseError

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = {"batch_size": 4, "steps": 3, "checkpoint_every": 2}
# The shape of the digits recipe (eupmu keeping its input, a repair keeping the original, esd), short.
CHAIN = {"name": "short-chain", "target": "match-retrain", "stages": [
    {"method": "eupmu", "config": {**RUN, "lr": 1e-3}, "terms": {"retain": {"teacher": "input"}}},
    {"method": "finetune", "config": {**RUN, "lr": 1e-3}, "terms": {"retain": {"teacher": "original"}}},
    {"method": "esd", "config": RUN}]}


def weights(folder):
    return load_backbone(folder).unet.state_dict()


def same(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_shipped_recipes_load_and_check(capsys):
    recipes = shipped_recipes()
    assert {"class-match-retrain", "concept-forget", "forget"} <= set(recipes)
    for name, path in recipes.items():
        recipe = load_recipe(name)
        assert recipe.name == name == path.stem and recipe.target in ("forget", "match-retrain")
        assert recipe.provenance["benchmarks"].startswith("BENCHMARKS.md section") and recipe.provenance["commands"]
        recipe.built()  # every stage's method, config and terms valid
    assert [s.method for s in load_recipe("class-match-retrain").stages] == ["eupmu", "finetune", "esd"]
    assert load_recipe("concept-forget").stages[1].terms.retain.samples == "paths"
    # match-retrain is forget with the robust perturbation bounded at the condition's norm (BENCHMARKS.md section 13)
    forget, match = load_recipe("forget"), load_recipe("match-retrain")
    assert [s.method for s in match.stages] == [s.method for s in forget.stages]
    assert (forget.stages[1].terms.robust.radius, match.stages[1].terms.robust.radius) == (None, 1.0)
    assert main(["recipes"]) == 0
    text = capsys.readouterr().out
    assert "class-match-retrain (version 1, target match-retrain)" in text and "stage 3: esd" in text


@pytest.mark.parametrize("change, message", [
    (lambda r: r.update(stage=[]), r"unknown key 'stage'"),
    (lambda r: r.update(target="erase"), r"target 'erase' is not one of forget, match-retrain"),
    (lambda r: r.update(stages=[]), r"stages is empty"),
    (lambda r: r["stages"][0].update(method="magic"), r"stage 1 \(magic\): unknown method"),
    (lambda r: r["stages"][0].update(method=3), r"stage 1: method must be a string, got 3"),
    (lambda r: r["stages"][1].update(lr=1e-3), r"stage 2: unknown key 'lr'; a stage has method, config"),
    (lambda r: r["stages"][1]["config"].update(lr="fast"), r"stage 2 \(finetune\): --lr \(config file\) must be"),
    (lambda r: r["stages"][1]["config"].update(w_lr=1.0), r"stage 2 \(finetune\): unknown option\(s\) w_lr"),
    (lambda r: r["stages"][0]["terms"].update(average={"decay": 1.5}), r"terms.average: .*decay must be in \(0, 1\)"),
    (lambda r: r["stages"][0]["terms"]["retain"].update(teacher="friend"), r"'friend' is not one of original, input"),
    (lambda r: r["stages"][0]["terms"].update(ema={}), r"unknown term 'ema'"),
    (lambda r: r["stages"][1]["terms"].update(robust={}), r"finetune trains without the forget condition"),
    (lambda r: r["stages"][2].update(terms={"retain": {}}), r"esd at retain_weight 0 .*draws no retain samples"),
    (lambda r: r.update(stages=r["stages"][1:]), r"stage 1 \(finetune\): the first stage must erase"),
])
def test_a_wrong_recipe_is_refused_in_one_line_before_any_work(change, message, tiny_model, tmp_path, capsys):
    recipe = json.loads(json.dumps(CHAIN))
    change(recipe)
    path = tmp_path / "mine.json"
    path.write_text(json.dumps(recipe))
    assert main(["unlearn", "--model", str(tiny_model), "--forget", "3", "--recipe", str(path),
                 "--out", str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-checkpoints").exists()


def test_a_recipe_run_is_its_stages_run_one_by_one(tiny_model, tmp_path):
    """One command = the three per-stage commands (old flags) chained by hand, bit for bit; the output
    holds the recipe, each stage's record and losses, and one delta against the original."""
    out = tmp_path / "recipe"
    path = tmp_path / "chain.json"
    path.write_text(json.dumps(CHAIN))
    assert main(["unlearn", "--model", str(tiny_model), "--forget", "3", "--recipe", str(path), "--seed", "5",
                 "--out", str(out)]) == 0
    with pytest.warns(FutureWarning, match="deprecated"):
        first = unlearn(tiny_model, "eupmu", "3", tmp_path / "s1", lr=1e-3, seed=5, retain_target="reference", **RUN)
    with pytest.warns(FutureWarning, match="deprecated"):
        second = unlearn(first, "finetune", "3", tmp_path / "s2", lr=1e-3, seed=5, retain_target="reference",
                         retain_reference=str(tiny_model), **RUN)
    third = unlearn(second, "esd", "3", tmp_path / "s3", seed=5, **RUN)
    assert same(weights(out), weights(third))

    original, final = weights(tiny_model), weights(out)
    delta = load_file(out / "delta.safetensors")
    assert delta and all(torch.equal(delta[k], final[k]) for k in delta)
    assert {k for k in final if not torch.equal(final[k], original[k])} == set(delta)
    summary = json.loads((out / "erase_config.json").read_text())
    assert summary["target"] == "match-retrain" and [s["method"] for s in summary["stages"]] == ["eupmu", "finetune", "esd"]
    assert summary["stages"][1]["terms"] == {"retain": {"teacher": "original", "samples": "images", "paths": 256}}
    assert json.loads((out / "recipe.json").read_text())["name"] == "short-chain"
    for i, method in enumerate(["eupmu", "finetune", "esd"], 1):
        record = json.loads((out / "stages" / f"{i}-{method}" / "erase_config.json").read_text())
        assert record["method"] == method and record["seed"] == 5
        assert (out / "stages" / f"{i}-{method}" / "loss_history.jsonl").read_text().strip()
    assert not (tmp_path / "recipe-checkpoints").exists()


@pytest.mark.parametrize("stop_after", [2, 4, 6])  # inside stage 1, inside stage 2, between stage 2 and 3
def test_a_killed_recipe_resumes_where_it_stopped_bit_for_bit(stop_after, tiny_model, tmp_path):
    full = unlearn(tiny_model, forget="3", out=tmp_path / "full", recipe=CHAIN, progress=False)
    out = tmp_path / "resumed"
    stopped = unlearn(tiny_model, forget="3", out=out, recipe=CHAIN, stop_after=stop_after, progress=False)
    assert stopped.exists() and not out.exists()
    done = sorted(p.name for p in (tmp_path / "resumed-checkpoints").iterdir())
    assert done[0] == "stage-1-eupmu" and len(done) == 1 + (stop_after - 1) // 3  # the stages begun
    if stop_after > 3:  # a finished stage is reused only under the settings it ran with
        changed = json.loads(json.dumps(CHAIN))
        changed["stages"][0]["config"]["lr"] = 2e-3
        with pytest.raises(EraseError, match="cannot resume .*stage-1-eupmu.*settings differ"):
            unlearn(tiny_model, forget="3", out=out, recipe=changed, progress=False)
    unlearn(tiny_model, forget="3", out=out, recipe=CHAIN, progress=False)
    assert same(weights(out), weights(full))
    a, b = (json.loads((p / "erase_config.json").read_text()) for p in (full, out))
    assert [s["final_losses"] for s in a["stages"]] == [s["final_losses"] for s in b["stages"]]


def test_python_api_runs_a_shipped_recipe_by_name(tiny_model, tmp_path):
    result = erase.unlearn(str(tiny_model), forget="3", out=tmp_path / "api", recipe=CHAIN)
    assert result.summary["recipe"]["name"] == "short-chain" and result.method == "short-chain"
    with pytest.raises(EraseError, match="not both"):
        erase.unlearn(str(tiny_model), "ga", forget="3", out=tmp_path / "x", recipe=CHAIN)
    with pytest.raises(EraseError, match="lr is set per stage by the recipe"):
        erase.unlearn(str(tiny_model), forget="3", out=tmp_path / "y", recipe=CHAIN, lr=1e-3)


def test_terms_are_checked_against_their_method(tiny_model, tmp_path):
    with pytest.raises(EraseError, match="finetune trains without the forget condition"):
        unlearn(tiny_model, "finetune", "3", tmp_path / "a", terms={"robust": {}}, **RUN)
    with pytest.raises(EraseError, match="esd at retain_weight 0 .* draws no retain samples"):
        unlearn(tiny_model, "esd", "3", tmp_path / "b", terms={"retain": {}}, **RUN)
    unlearn(tiny_model, "esd", "3", tmp_path / "c", terms={"retain": {}}, retain_weight=1.0, **RUN)  # with a retain batch


def test_method_config_holds_no_term():
    from dataclasses import fields

    from erase.methods import MethodConfig
    from erase.unlearning.terms import LEGACY_OPTIONS

    assert not {f.name for f in fields(MethodConfig)} & set(LEGACY_OPTIONS)


def test_unlearn_help_lists_at_most_28_options_and_hides_the_deprecated_ones(capsys):
    import argparse

    from erase.cli import build_parser

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["unlearn", "--help"])
    text = capsys.readouterr().out
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["unlearn"]
    shown = [a for a in sub._actions if a.help != argparse.SUPPRESS]
    assert len(shown) <= 28, [a.option_strings for a in shown]
    assert "--recipe" in text and "--ema-decay" not in text and "--adversarial-every" not in text
    hidden = [a for a in sub._actions if a.help == argparse.SUPPRESS]
    assert {s for a in hidden for s in a.option_strings} >= {"--ema-decay", "--retain-target", "--adversarial-radius"}


def test_every_stage_of_a_text_recipe_trains_on_the_originals_images(tiny_sd_dir, tmp_path, monkeypatch):
    """A later stage's concept images are the original model's, not the partly erased model's (which
    draws something else for the prompt): each data setting is drawn once, before the first stage."""
    from erase.concept_data import MANIFEST

    monkeypatch.setenv("ERASE_CACHE", str(tmp_path / "cache"))
    small = {"batch_size": 4, "steps": 2, "lr": 1e-2}
    recipe = {"name": "two-text-stages", "target": "forget", "stages": [
        {"method": "esd", "config": small, "data": {"image_guidance": 1}},
        {"method": "ga", "config": small},
        {"method": "esd", "config": small, "data": {"image_guidance": 1}}]}
    out = unlearn(tiny_sd_dir, forget="the number 3", out=tmp_path / "out", recipe=recipe, images=2, progress=False)
    caches = [s["data"]["cache"] for s in json.loads((out / "erase_config.json").read_text())["stages"]]
    assert caches[0] == caches[2] != caches[1]  # one build per data setting
    original = load_backbone(tiny_sd_dir).fingerprint()
    drawn_by = {json.loads((Path(c) / MANIFEST).read_text())["settings"]["denoiser_fingerprint"] for c in caches}
    assert drawn_by == {original} and load_backbone(out).fingerprint() != original


def test_one_recipe_file_serves_a_class_model_and_a_text_model(tiny_model, tiny_sd_dir, tmp_path, monkeypatch, capsys):
    """A stage's text-image options (`image_guidance`, ...) shape a text concept's drawn images; a class
    model trains on real images, so there they are left out and recorded, not refused. Given on the
    command line for a class model, they are still refused in one line."""
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path / "cache"))
    small = {"batch_size": 4, "steps": 2}
    recipe = {"name": "portable", "target": "forget", "stages": [
        {"method": "esd", "config": small, "data": {"image_guidance": 1, "anchor_in_retain": False}},
        {"method": "finetune", "config": small}]}
    path = tmp_path / "portable.json"
    path.write_text(json.dumps(recipe))
    on_class = unlearn(tiny_model, forget="3", out=tmp_path / "ddpm", recipe=str(path), progress=False)
    stages = json.loads((on_class / "erase_config.json").read_text())["stages"]
    assert stages[0]["data"]["recipe_options_not_applied"] == ["anchor_in_retain", "image_guidance"]
    assert "recipe_options_not_applied" not in stages[1]["data"]
    on_text = unlearn(tiny_sd_dir, forget="the number 3", out=tmp_path / "sd", recipe=str(path), images=2,
                      progress=False)
    assert "recipe_options_not_applied" not in json.loads((on_text / "erase_config.json").read_text())["stages"][0]["data"]
    out = tmp_path / "refused"
    assert main(["unlearn", "--model", str(tiny_model), "--forget", "3", "--recipe", str(path), "--image-guidance", "1",
                 "--out", str(out)]) != 0
    assert "--image-guidance applies to the images generated for a text concept" in capsys.readouterr().err
    assert not out.exists()


def test_without_method_or_recipe_unlearn_runs_the_recommended_forget_recipe(tiny_model, tmp_path, caplog):
    """`erase unlearn` given neither --method nor --recipe runs recipes/forget.json (the same file on
    every backbone), says so, and records it as `--recipe forget`."""
    out = tmp_path / "default"
    with caplog.at_level("INFO", logger="erase"):
        assert main(["unlearn", "--model", str(tiny_model), "--forget", "3", "--seed", "1", "--out", str(out)]) == 0
    assert "running the recommended recipe 'forget'" in caplog.text
    summary = json.loads((out / "erase_config.json").read_text())
    assert summary["target"] == "forget" and summary["recipe"] == load_recipe("forget").to_dict()
    assert [s["method"] for s in summary["stages"]] == ["salun", "rl"] and "--recipe forget" in summary["command"]
    assert not same(weights(out), weights(tiny_model))
