"""A new user's first hour: what they type wrong gets one line before any work, what they type right
is resolved visibly, recorded, and reproduced by the recorded command.

The table holds the mistakes (command, exit code, the one error line, files untouched); the tests
after it hold the behaviours (concepts from a model's vocabulary, --out reuse, recorded commands,
report sections, interrupts, progress bars).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
from pathlib import Path

import pytest
import torch

from erase.cli import main

from test_bad_inputs import tree_digest

CLASS_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ["a handwritten digit {w}", "the number {d}"]


@pytest.fixture(scope="module")
def first_hour(tmp_path_factory, tiny_model, tiny_sd_dir, tiny_classifier_dir):
    """A user's folder: models (one that records its vocabulary, as the miniatures do), their notes,
    and an earlier unlearn, eval and report output to run over."""
    ws = tmp_path_factory.mktemp("first-hour")
    (ws / "cwd" / "models").mkdir(parents=True)
    shutil.copytree(tiny_model, ws / "cwd" / "models" / "digits-ddpm")
    vocab_sd = ws / "vocab-sd"
    shutil.copytree(tiny_sd_dir, vocab_sd)
    (vocab_sd / "erase_info.json").write_text(json.dumps({"backbone": "stable-diffusion", "info": {
        "training": {"train_templates": TEMPLATES, "class_words": CLASS_WORDS}}}))
    (ws / "notes.txt").write_text("my notes\n")
    earlier = ["--model", str(tiny_model), "--method", "ga", "--forget", "3", "--steps", "2", "--batch-size", "4"]
    assert main(["unlearn", *earlier, "--out", str(ws / "erased")]) == 0
    evaluated = ["eval", "--model", str(ws / "erased"), "--protocol", "digits-class", "--classifier",
                 str(tiny_classifier_dir), "--forget", "3", "--n", "2", "--n-forget", "2", "--steps", "1"]
    assert main([*evaluated, "--out", str(ws / "eval")]) == 0
    assert main(["report", str(ws / "eval"), "--out", str(ws / "report")]) == 0
    return {"ws": ws, "earlier": earlier, "evaluated": evaluated}


SD = ["unlearn", "--model", "{ws}/vocab-sd", "--method", "eupmu", "--images", "2", "--steps", "1", "--batch-size", "2"]
DDPM = ["unlearn", "--model", "{ws}/cwd/models/digits-ddpm", "--method", "ga", "--forget", "3", "--steps", "1",
        "--batch-size", "4"]
# (case, arguments ({ws}: the workspace), environment, expected exit code, the error line (a regex))
CASES = [
    ("concept-typo", SD + ["--forget", "thre", "--out", "{ws}/new"], {}, 2, r"'thre' is not a concept; did you mean three\?"),
    ("concept-typo-shipped", SD + ["--forget", "nudty", "--out", "{ws}/new"], {}, 2, r"did you mean nudity\?"),
    ("concept-one-unknown-word", SD + ["--forget", "dog", "--out", "{ws}/new"], {}, 2,
     r"a literal prompt needs several words .*\(prompt:dog\)"),
    ("concept-is-a-method", SD + ["--forget", "esd", "--out", "{ws}/new"], {}, 2, r"'?esd'? is a method"),
    ("concept-folder-missing", SD + ["--forget", "{ws}/my-concept", "--out", "{ws}/new"], {}, 2,
     r"concept folder .*my-concept does not exist"),
    ("retain-file-missing", SD + ["--forget", "three", "--retain", "my-retain.txt", "--out", "{ws}/new"], {}, 2,
     r"retain prompt file not found: my-retain.txt"),
    ("model-path-typo", ["unlearn", "--model", "./models/digit-ddpm", *DDPM[3:], "--out", "{ws}/new"], {}, 2,
     r"model \./models/digit-ddpm does not exist; did you mean models/digits-ddpm\?"),
    ("model-name-typo", ["unlearn", "--model", "digits-dpm", *DDPM[3:], "--out", "{ws}/new"], {}, 2,
     r"did you mean digits-ddpm\?"),
    ("hub-id-offline", ["unlearn", "--model", "someone/some-model", *DDPM[3:], "--out", "{ws}/new"],
     {"HF_HUB_OFFLINE": "1"}, 2, r"not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
    ("option-typo", DDPM + ["--setps", "3", "--out", "{ws}/new"], {}, 2, r"unrecognized option --setps; did you mean --steps\?"),
    ("option-synonym", DDPM + ["--learning-rate", "1e-4", "--out", "{ws}/new"], {}, 2, r"did you mean --lr\?"),
    ("option-of-another-method", DDPM[:4] + ["eupmu", *DDPM[5:], "--eta", "0.1", "--out", "{ws}/new"], {}, 2,
     r"--eta is an option of esd, not of eupmu"),
    ("method-typo", DDPM[:4] + ["eupm", *DDPM[5:], "--out", "{ws}/new"], {}, 2, r"invalid choice: 'eupm'.*did you mean eupmu\?"),
    ("protocol-typo-before-its-options", ["eval", "--model", "{ws}/erased", "--protocol", "digit-class", "--forget", "7",
                                          "--out", "{ws}/new"], {}, 2, r"unknown protocol 'digit-class'; did you mean digits-class\?"),
    ("checkpoint-minutes-zero", DDPM + ["--checkpoint-minutes", "0", "--out", "{ws}/new"], {}, 2,
     r"--checkpoint-minutes must be a positive number"),
    ("unlearn-out-other-settings", None, {}, 2, r"--out .*erased holds an `erase unlearn` output made with other "
                                               r"settings \(--steps 2 there, 3 now\).*--overwrite"),
    ("eval-out-other-settings", None, {}, 2, r"--out .*eval holds an `erase eval` output made with other settings "
                                             r"\(--n 2 there, 4 now\).*--overwrite"),
    ("report-out-other-runs", ["report", "{ws}/eval", "{ws}/eval", "--out", "{ws}/report"], {}, 2,
     r"--out .*report holds an `erase report` output made with other settings.*--overwrite"),
]


def case_argv(case: str, argv, setup: dict) -> list[str]:
    ws = setup["ws"]
    if case == "unlearn-out-other-settings":
        return ["unlearn", *setup["earlier"], "--steps", "3", "--out", str(ws / "erased")]
    if case == "eval-out-other-settings":
        return [*setup["evaluated"], "--n", "4", "--out", str(ws / "eval")]
    return [a.format(ws=ws) for a in argv]


@pytest.mark.parametrize("case, argv, env, code, expected", CASES, ids=[c[0] for c in CASES])
def test_first_hour_mistakes_get_one_line_before_any_work(case, argv, env, code, expected, first_hour, capsys,
                                                          monkeypatch, tmp_path, one_thread):
    ws = first_hour["ws"]
    monkeypatch.chdir(ws / "cwd")
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path / "cache"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = tree_digest(ws)
    try:
        got = main(case_argv(case, argv, first_hour))
    except SystemExit as e:  # the parser's own errors
        got = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert got == code, err
    assert "Traceback" not in err and "usage:" not in err, err
    assert len(errors) == 1, err
    assert re.search(expected, errors[0]), errors[0]
    assert tree_digest(ws) == before, "a refused command changed files"
    assert not (tmp_path / "cache").exists(), "work started before the mistake was said"


def test_a_class_word_resolves_to_the_models_own_captions_printed_and_recorded(first_hour, tmp_path, monkeypatch,
                                                                               caplog, one_thread):
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "no-five"
    argv = [a.format(ws=first_hour["ws"]) for a in SD] + ["--forget", "five", "--out", str(out)]
    with caplog.at_level("INFO", logger="erase"):
        assert main(argv) == 0
    concept = json.loads((out / "erase_config.json").read_text())["data"]["concept"]
    assert concept["forget"] == ["a handwritten digit five", "the number 5"]
    assert concept["anchor"] == "a handwritten digit six", "the next class, as prompts/three anchors to four"
    assert len(concept["retain"]) == 9 * len(TEMPLATES) and "the number 3" in concept["retain"]
    assert concept["source"].startswith("model vocabulary")
    printed = caplog.text
    assert "forget (2 prompts: a handwritten digit five; the number 5)" in printed
    assert printed.index("anchor: 'a handwritten digit six'") < printed.index("generating 2 forget images")


def test_a_prompt_of_several_words_is_a_literal_prompt_and_says_so(tiny_sd_dir, tmp_path, monkeypatch, caplog,
                                                                    one_thread):
    monkeypatch.setenv("ERASE_CACHE", str(tmp_path / "cache"))
    with caplog.at_level("INFO", logger="erase"):
        assert main(["unlearn", "--model", str(tiny_sd_dir), "--method", "finetune", "--forget", "prompt:cat",
                     "--retain", "a tree", "--images", "2", "--steps", "1", "--batch-size", "2",
                     "--out", str(tmp_path / "out")]) == 0
    assert "from a literal prompt" in caplog.text
    concept = json.loads((tmp_path / "out" / "erase_config.json").read_text())["data"]["concept"]
    assert (concept["forget"], concept["anchor"], concept["retain"]) == (["cat"], "", ["a tree"])


def test_the_recorded_command_reproduces_the_delta_bit_for_bit(tiny_model, tmp_path, one_thread):
    first = tmp_path / "first"
    assert main(["unlearn", "--model", str(tiny_model), "--method", "salun", "--forget", "3", "--steps", "3",
                 "--batch-size", "4", "--lr", "3e-4", "--out", str(first)]) == 0
    command = json.loads((first / "erase_config.json").read_text())["command"]
    words = shlex.split(command)
    assert words[:2] == ["erase", "unlearn"] and "--lr" in words and "--antithetic" in words, command
    assert json.loads((first / "erase-output.json").read_text())["command"] == command
    words[words.index("--out") + 1] = str(tmp_path / "again")
    assert main(words[1:]) == 0
    assert (tmp_path / "again" / "delta.safetensors").read_bytes() == (first / "delta.safetensors").read_bytes()


def test_the_same_command_reuses_its_output(first_hour, capsys, caplog, one_thread):
    ws = first_hour["ws"]
    before = tree_digest(ws / "erased")
    with caplog.at_level("INFO", logger="erase"):
        assert main(["unlearn", *first_hour["earlier"], "--out", str(ws / "erased")]) == 0
        assert main([*first_hour["evaluated"], "--out", str(ws / "eval")]) == 0
    assert caplog.text.count("is already the output of this command: reusing it") == 2
    assert tree_digest(ws / "erased") == before
    metrics = json.loads((ws / "eval" / "metrics.json").read_text())
    assert shlex.split(metrics["command"])[:2] == ["erase", "eval"] and "--n-forget" in metrics["command"]
    assert json.loads((ws / "report" / "erase-output.json").read_text())["command"].startswith("erase report ")


def test_shipped_model_names_work_on_the_command_line(tmp_path, monkeypatch, one_thread):
    monkeypatch.chdir(tmp_path)  # outside the clone: no models/ folder here
    assert main(["sample", "--model", "digits-ddpm", "--classes", "3", "--n", "1", "--steps", "1",
                 "--out", "samples"]) == 0
    assert (tmp_path / "samples" / "3" / "00000.png").is_file()


def test_digits_protocols_default_to_the_shipped_classifier():
    from erase.eval.cli import default_classifier
    from erase.resources import shipped_model

    assert default_classifier("digits-class", None) == str(shipped_model("digits-classifier"))
    assert default_classifier("digits-prompts", "digits-classifier") == str(shipped_model("digits-classifier"))
    assert default_classifier("t2i-utility", None) is None


def test_eval_warns_when_its_forget_is_not_what_the_model_erased(first_hour, tmp_path, caplog, one_thread):
    with caplog.at_level("WARNING", logger="erase"):
        assert main([*first_hour["evaluated"][:-6], "--forget", "5", "--n", "2", "--n-forget", "2", "--steps", "1",
                     "--out", str(tmp_path / "eval-5")]) == 0
    assert "--forget 5 differs from what" in caplog.text


def test_interrupt_names_the_command_that_resumes(tiny_model, tmp_path, monkeypatch, capsys, caplog, one_thread):
    import erase.unlearning.running as running

    draw = running.draw_shards

    def interrupted(data, model, n_forget, n_retain, seed, antithetic, step, *rest):
        if step == 2:
            raise KeyboardInterrupt
        return draw(data, model, n_forget, n_retain, seed, antithetic, step, *rest)

    argv = ["unlearn", "--model", str(tiny_model), "--method", "ga", "--forget", "3", "--steps", "4",
            "--batch-size", "4", "--checkpoint-every", "1", "--out", str(tmp_path / "out")]
    monkeypatch.setattr(running, "draw_shards", interrupted)
    assert main(argv) == 130
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "to resume from the last checkpoint" in line and "run: erase unlearn" in line, line
    command = line.split("run: ", 1)[1]
    monkeypatch.setattr(running, "draw_shards", draw)
    with caplog.at_level("INFO", logger="erase"):
        assert main(shlex.split(command)[1:]) == 0
    assert "resuming ga from" in caplog.text and "(step 2 of 4)" in caplog.text


def test_checkpoints_also_come_by_wall_time(tiny_model, tmp_path, one_thread):
    assert main(["unlearn", "--model", str(tiny_model), "--method", "ga", "--forget", "3", "--steps", "4",
                 "--batch-size", "4", "--checkpoint-every", "1000", "--checkpoint-minutes", "1e-9",
                 "--keep-checkpoints", "--out", str(tmp_path / "out")]) == 0
    kept = sorted(p.name for p in (tmp_path / "out-checkpoints").iterdir())
    assert kept == ["step-0000002", "step-0000003"], kept  # the newest two of steps 1-3, none by step count


def test_concept_images_survive_an_interrupt_in_shards(tiny_sd_dir, tmp_path):
    from erase.backbones import load_backbone
    from erase.concept_data import SHARD_BATCHES, ConceptDataConfig, generate_concept_cache, load_concept_cache
    from erase.concepts import Concept

    model = load_backbone(tiny_sd_dir)
    concept = Concept("cat", ["a cat"], "", ["a tree"])
    config = ConceptDataConfig(images=2 * SHARD_BATCHES + 1, batch_size=1, steps=1)
    sample, calls = model.sample, []

    def interrupted(*args, **kwargs):
        calls.append(len(args[0]))
        if len(calls) == 2:
            raise KeyboardInterrupt
        return sample(*args, **kwargs)

    model.sample = interrupted
    with pytest.raises(KeyboardInterrupt):
        generate_concept_cache(model, concept, config, tmp_path / "cache", progress=False)
    work = next((tmp_path / "cache").glob(".*.partial"))
    assert [p.name for p in work.glob("forget-*.safetensors")] == ["forget-000000.safetensors"]
    calls.clear()
    model.sample = lambda *a, **k: (calls.append(len(a[0])), sample(*a, **k))[1]
    folder = generate_concept_cache(model, concept, config, tmp_path / "cache", progress=False)
    assert calls[0] == SHARD_BATCHES and sum(calls) == 3 * config.images - SHARD_BATCHES, "the kept shard was reused"
    model.sample = sample
    fresh = generate_concept_cache(model, concept, config, tmp_path / "fresh", progress=False)
    kept, fresh_latents = load_concept_cache(folder)[0], load_concept_cache(fresh)[0]
    assert all(torch.equal(kept[k], fresh_latents[k]) for k in kept), "resumed images equal uninterrupted ones"


def test_report_keeps_model_families_and_originals_apart(first_hour, tiny_model, tiny_sd_dir, tmp_path):
    from erase.eval.report import build_report, group_runs

    ws = first_hour["ws"]

    def fake_original_run(name: str, model: Path) -> Path:
        run = tmp_path / name
        run.mkdir()
        (run / "metrics.json").write_text(json.dumps({"protocol": "digits-class", "model": str(model), "settings": {},
                                                      "metrics": {"retained_accuracy": 0.5}}))
        (run / "index.json").write_text(json.dumps({"kind": "classes", "images": []}))
        return run

    ddpm_original = fake_original_run("ddpm-original", tiny_model)
    sd_original = fake_original_run("sd-original", tiny_sd_dir)
    groups = group_runs([ws / "eval", ddpm_original, sd_original])
    assert len(groups) == 2
    by_family = {title.split(":")[0]: runs for title, runs in groups.items()}
    assert set(by_family["class-conditional DDPM"]) == {ws / "eval", ddpm_original}
    assert by_family["StableDiffusionPipeline"] == [sd_original]
    markdown, _ = build_report([ws / "eval", ddpm_original, sd_original], tmp_path / "report")
    text = markdown.read_text()
    assert "class-conditional DDPM: models made from" in text and "StableDiffusionPipeline: models made from" in text
    verdicts = [line for line in text.splitlines() if line.startswith("- **")]
    assert verdicts and not any("original" in line.split("**")[1] for line in verdicts), verdicts
    erased = json.loads((ws / "erased" / "erase_config.json").read_text())
    shown = shlex.join(os.path.relpath(w) if os.path.isabs(w) else w for w in shlex.split(erased["command"]))
    assert shown in text, "the 'model made by' line is the recorded command (paths shown relative)"


def test_progress_bars_follow_tqdm_disable(tiny_model, tmp_path, monkeypatch, capsys, one_thread):
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert main(["unlearn", "--model", str(tiny_model), "--method", "ga", "--forget", "3", "--steps", "2",
                 "--batch-size", "4", "--out", str(tmp_path / "out")]) == 0
    assert "it/s" not in capsys.readouterr().err and "s/it" not in capsys.readouterr().err
