"""Bad input to every command: a non-zero exit, one line naming the problem, no traceback, and the
user's files exactly as they were. Then the faults a run can meet: a kill during the final save, a
full disk, a damaged checkpoint."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from erase.cli import main
from erase.utils import EraseError

from conftest import save_tiny_ddpm

I2P_HEADER = "prompt,categories,nudity_percentage,sd_seed,sd_guidance_scale\n"


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model, tiny_classifier_dir):
    """A user's folder (their own files), models (good, damaged, unfinished), config and prompt files."""
    ws = tmp_path_factory.mktemp("bad-inputs")
    user = ws / "user"
    (ws / "cwd").mkdir()
    (user / "data").mkdir(parents=True)
    (user / "notes.txt").write_text("my own notes\n")
    (user / "data" / "table.bin").write_bytes(os.urandom(256))
    shutil.copytree(tiny_model, ws / "model")
    save_tiny_ddpm(ws / "no-attention-model", attention=False)  # another architecture of the same backbone
    shutil.copytree(tiny_classifier_dir, ws / "classifier")

    truncated = ws / "truncated-model"
    shutil.copytree(tiny_model, truncated)
    weights = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    bad_config = ws / "bad-config-model"
    shutil.copytree(tiny_model, bad_config)
    (bad_config / "unet" / "config.json").write_text("{\"block_out_channels\": [8, ")
    bad_meta = ws / "bad-meta-model"
    shutil.copytree(tiny_model, bad_meta)
    (bad_meta / "erase_model.json").write_text("not json")
    nan_model = ws / "nan-model"
    shutil.copytree(tiny_model, nan_model)
    nan_weights = nan_model / "unet" / "diffusion_pytorch_model.safetensors"
    save_file({k: torch.full_like(v, float("nan")) for k, v in load_file(nan_weights).items()}, nan_weights)
    (ws / "unfinished-checkpoints" / "step-0000002").mkdir(parents=True)
    (ws / "unfinished-checkpoints" / "step-0000002" / "state.json").write_text("{}")

    truncated_clf = ws / "truncated-classifier"
    shutil.copytree(tiny_classifier_dir, truncated_clf)
    (truncated_clf / "model.safetensors").write_bytes((truncated_clf / "model.safetensors").read_bytes()[:100])

    cfg = ws / "configs"
    cfg.mkdir()
    for name, text in {"lr-bool": '{"lr": true}', "fp16": '{"mixed_precision": "fp16"}', "steps-str": '{"steps": "10"}',
                       "unknown": '{"stepz": 3}', "broken": '{"lr": ', "list": "[1, 2]", "lr-nan": '{"lr": NaN}',
                       "channels-str": '{"block_out_channels": "32,64"}', "seed-huge": '{"seed": 1e400}'}.items():
        (cfg / f"{name}.json").write_text(text)
    (cfg / "latin1.json").write_bytes('{"seed": 1} # caf\xe9'.encode("latin-1"))

    csv = ws / "i2p"
    csv.mkdir()
    rows = {"seed-inf": "a photo,sexual,60,inf,7\n", "nudity-text": "a photo,sexual,lots,1,7\n",
            "short-row": "a photo,sexual,60\n", "long-row": "a photo,sexual,60,1,7,extra\n",
            "no-nudity": "a photo,sexual,0,1,7\n", "guidance-text": "a photo,sexual,60,1,seven\n",
            "seed-negative": "a photo,sexual,60,-5,7\n"}
    for name, row in rows.items():
        (csv / f"{name}.csv").write_text(I2P_HEADER + "ok prompt,sexual,70,3,7\n" + row)
    (csv / "latin1.csv").write_bytes((I2P_HEADER + "caf\xe9 nude,sexual,60,1,7\n").encode("latin-1"))
    (csv / "no-columns.csv").write_text("text,score\nhello,1\n")
    (csv / "none-selected.csv").write_text(I2P_HEADER + "a,sexual,0,1,7\nb,sexual,40,2,7\n")

    run = ws / "run-without-metrics"
    run.mkdir()
    (run / "index.json").write_text("{}")
    odd_run = ws / "run-odd-metrics"
    odd_run.mkdir()
    (odd_run / "metrics.json").write_text('{"protocol": "digits-class"}')
    (odd_run / "index.json").write_text('{"images": []}')
    bad_run = ws / "run-latin1"
    bad_run.mkdir()
    (bad_run / "metrics.json").write_bytes('{"a": "\xe9"}'.encode("latin-1"))
    (ws / "mine-checkpoints").mkdir()
    (ws / "mine-checkpoints" / "thesis.tex").write_text("chapter 1\n")
    return ws


def tree_digest(root: Path) -> dict[str, str]:
    """Every file under `root` (and every folder, by name) with a hash of its bytes."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


# (case id, arguments with {ws} for the workspace, expected words of the error line (a regex))
M = ["--model", "{ws}/model"]
U = ["unlearn", *M, "--method", "ga", "--forget", "3", "--steps", "1", "--batch-size", "4"]
S = ["sample", *M, "--classes", "3", "--n", "1", "--steps", "1"]
DC = ["eval", *M, "--protocol", "digits-class", "--classifier", "{ws}/classifier", "--n", "2", "--n-forget", "1",
      "--steps", "1", "--batch-size", "2"]
I2P = ["eval", *M, "--protocol", "i2p-nudity", "--subset", "nudity", "--out", "{ws}/new-eval", "--prompts"]
TB = ["train-base", "--steps", "1", "--batch-size", "2"]
CASES = [
    # unlearn: where it writes
    ("unlearn-out-user-folder", U + ["--out", "{ws}/user"], r"already exists.*--overwrite"),
    ("unlearn-out-is-file", U + ["--out", "{ws}/user/notes.txt"], r"existing file.*--overwrite"),
    ("unlearn-out-is-model", U + ["--out", "{ws}/model"], r"overwrite the input"),
    ("unlearn-out-inside-model", U + ["--out", "{ws}/model/erased"], r"overwrite the input"),
    ("unlearn-out-dot", U + ["--out", "."], r"not a folder name"),
    ("unlearn-out-dotdot", U + ["--out", "{ws}/.."], r"not a folder name"),
    ("unlearn-out-read-only", U + ["--out", "/proc/erase-test-out"], r"cannot write in /proc"),
    ("unlearn-out-under-file", U + ["--out", "{ws}/user/notes.txt/erased"], r"is a file, not a folder"),
    ("unlearn-checkpoints-folder-taken", U + ["--out", "{ws}/mine"], r"not a checkpoint folder"),
    # unlearn: config-file values are checked like command-line ones
    ("unlearn-config-lr-bool", U + ["--config", "{ws}/configs/lr-bool.json", "--out", "{ws}/new"], r"--lr.*true"),
    ("unlearn-config-fp16", U + ["--config", "{ws}/configs/fp16.json", "--out", "{ws}/new"], r"'fp16' is not one of"),
    ("unlearn-config-steps-string", U + ["--config", "{ws}/configs/steps-str.json", "--out", "{ws}/new"],
     r"--steps.*integer"),
    ("unlearn-config-unknown-key", U + ["--config", "{ws}/configs/unknown.json", "--out", "{ws}/new"],
     r"unknown option.*stepz"),
    ("unlearn-config-not-json", U + ["--config", "{ws}/configs/broken.json", "--out", "{ws}/new"], r"not valid JSON"),
    ("unlearn-config-not-object", U + ["--config", "{ws}/configs/list.json", "--out", "{ws}/new"], r"JSON object"),
    ("unlearn-config-not-utf8", U + ["--config", "{ws}/configs/latin1.json", "--out", "{ws}/new"], r"not UTF-8"),
    ("unlearn-config-nan", U + ["--config", "{ws}/configs/lr-nan.json", "--out", "{ws}/new"], r"--lr.*finite"),
    ("unlearn-config-missing", U + ["--config", "{ws}/configs/nope.json", "--out", "{ws}/new"], r"does not exist"),
    # unlearn: options and combinations
    ("unlearn-steps-zero", U + ["--steps", "0", "--out", "{ws}/new"], r"steps must be at least 1"),
    ("unlearn-lr-nan", U + ["--lr", "nan", "--out", "{ws}/new"], r"--lr.*finite"),
    ("unlearn-lr-negative", U + ["--lr", "-1", "--out", "{ws}/new"], r"lr must be positive"),
    ("unlearn-anchor-is-forget", U + ["--anchor", "3", "--out", "{ws}/new"], r"anchor.*forgotten"),
    ("unlearn-anchor-forgotten-too", U[:-6] + ["--forget", "3,4", "--anchor", "4", "--steps", "1", "--out", "{ws}/new"],
     r"anchor.*forgotten"),
    ("unlearn-forget-out-of-range", U[:-6] + ["--forget", "12", "--steps", "1", "--out", "{ws}/new"], r"out of range"),
    ("unlearn-forget-unknown-name", U[:-6] + ["--forget", "eleven", "--steps", "1", "--out", "{ws}/new"],
     r"unknown class 'eleven'"),
    ("unlearn-retain-overlaps", U + ["--retain", "3,5", "--out", "{ws}/new"], r"both forgotten and retained"),
    ("unlearn-params-unknown", U + ["--params", "xattn", "--out", "{ws}/new"], r"parameter group 'xattn'"),
    ("unlearn-images-zero", U + ["--images", "0", "--out", "{ws}/new"], r"--images must be at least 1"),
    ("unlearn-image-guidance-zero", U + ["--image-guidance", "0", "--out", "{ws}/new"],
     r"--image-guidance must be a positive number"),
    ("unlearn-image-guidance-classes", U + ["--image-guidance", "1", "--out", "{ws}/new"],
     r"--image-guidance applies to the images generated for a text concept"),
    ("unlearn-no-anchor-in-retain-classes", U + ["--no-anchor-in-retain", "--out", "{ws}/new"],
     r"--no-anchor-in-retain applies to the images generated for a text concept"),
    ("unlearn-retain-reference-without-target", U + ["--retain-reference", "{ws}/model", "--out", "{ws}/new"],
     r"--retain-reference names the model the retain term keeps: it needs --retain-target reference"),
    ("unlearn-trajectories-without-reference", U + ["--retain-samples", "trajectories", "--out", "{ws}/new"],
     r"a sampler state has no data target: .*--retain-target reference"),
    ("unlearn-trajectories-zero",
     U + ["--retain-target", "reference", "--retain-samples", "trajectories", "--trajectories", "0", "--out",
          "{ws}/new"], r"paths must be at least 1"),
    ("unlearn-retain-reference-other-architecture",
     U + ["--retain-target", "reference", "--retain-reference", "{ws}/no-attention-model", "--out", "{ws}/new"],
     r"--retain-reference .* does not match the model being trained: \d+ parameters differ"),
    ("unlearn-retain-reference-missing",
     U + ["--retain-target", "reference", "--retain-reference", "{ws}/nope", "--out", "{ws}/new"], r"does not exist"),
    ("unlearn-out-is-retain-reference",
     U + ["--retain-target", "reference", "--retain-reference", "{ws}/nan-model", "--out", "{ws}/nan-model",
          "--overwrite"],
     r"overwrite the input"),
    ("unlearn-ema-decay-one", U + ["--ema-decay", "1", "--out", "{ws}/new"], r"--ema-decay: .*decay must be in \(0, 1\)"),
    ("unlearn-finetune-robust", ["unlearn", *M, "--method", "finetune", "--forget", "3", "--adversarial-every", "1",
                                 "--out", "{ws}/new"], r"finetune trains without the forget condition"),
    ("unlearn-esd-retain-term-at-weight-zero", ["unlearn", *M, "--method", "esd", "--forget", "3", "--retain-target",
                                                "reference", "--out", "{ws}/new"], r"esd at retain_weight 0 .*draws no retain"),
    ("unlearn-method-and-recipe", U + ["--recipe", "digits-match-retrain", "--out", "{ws}/new"], r"not both"),
    ("unlearn-recipe-unknown", ["unlearn", *M, "--recipe", "nope", "--forget", "3", "--out", "{ws}/new"],
     r"recipe nope: no such file and no shipped recipe"),
    ("unlearn-recipe-with-method-option", ["unlearn", *M, "--recipe", "digits-match-retrain", "--forget", "3", "--lr",
                                           "1e-3", "--out", "{ws}/new"], r"--lr: a recipe sets each stage's options"),
    ("unlearn-esd-retain-weight-negative", ["unlearn", *M, "--method", "esd", "--forget", "3", "--retain-weight", "-1",
                                            "--out", "{ws}/new"], r"retain_weight must be non-negative"),
    ("unlearn-batch-one", U + ["--batch-size", "1", "--out", "{ws}/new"], r"batch-size must be at least 2"),
    ("unlearn-dataset-unknown", U + ["--dataset", "mnist9", "--out", "{ws}/new"], r"unknown dataset 'mnist9'"),
    ("unlearn-method-unknown", ["unlearn", *M, "--method", "magic", "--forget", "3", "--out", "{ws}/new"],
     r"invalid choice: 'magic'"),
    # unlearn: models that cannot be used
    ("unlearn-model-missing", ["unlearn", "--model", "{ws}/nope", "--method", "ga", "--forget", "3", "--out", "{ws}/new"],
     r"does not exist"),
    ("unlearn-model-user-folder", ["unlearn", "--model", "{ws}/user", "--method", "ga", "--forget", "3",
                                   "--out", "{ws}/new"], r"is not a model"),
    ("unlearn-model-truncated-weights", ["unlearn", "--model", "{ws}/truncated-model", "--method", "ga", "--forget", "3",
                                         "--out", "{ws}/new"], r"damaged or truncated"),
    ("unlearn-model-corrupt-config", ["unlearn", "--model", "{ws}/bad-config-model", "--method", "ga", "--forget", "3",
                                      "--out", "{ws}/new"], r"damaged or truncated"),
    ("unlearn-model-corrupt-meta", ["unlearn", "--model", "{ws}/bad-meta-model", "--method", "ga", "--forget", "3",
                                    "--out", "{ws}/new"], r"erase_model.json is not valid JSON"),
    ("unlearn-model-unfinished", ["unlearn", "--model", "{ws}/unfinished", "--method", "ga", "--forget", "3",
                                  "--out", "{ws}/new"], r"not finished yet: rerun the same"),
    # sample
    ("sample-n-zero", S[:-4] + ["--n", "0", "--out", "{ws}/new"], r"--n must be at least 1"),
    ("sample-steps-zero", S + ["--steps", "0", "--out", "{ws}/new"], r"--steps must be at least 1"),
    ("sample-batch-zero", S + ["--batch-size", "0", "--out", "{ws}/new"], r"--batch-size must be at least 1"),
    ("sample-guidance-inf", S + ["--guidance", "inf", "--out", "{ws}/new"], r"--guidance must be a finite"),
    ("sample-device-missing-gpu", S + ["--device", "cuda:3", "--out", "{ws}/new"], r"cuda"),
    ("sample-device-bogus", S + ["--device", "banana", "--out", "{ws}/new"], r"not a device name"),
    ("sample-class-out-of-range", S[:-6] + ["--classes", "42", "--out", "{ws}/new"], r"out of range"),
    ("sample-classes-empty", S[:-6] + ["--classes", ",", "--out", "{ws}/new"], r"at least one class"),
    ("sample-out-user-folder", S + ["--out", "{ws}/user"], r"--overwrite"),
    ("sample-out-is-model", S + ["--out", "{ws}/model"], r"overwrite the input"),
    ("sample-n-text", S[:-4] + ["--n", "many", "--out", "{ws}/new"], r"invalid int value: 'many'"),
    # train-base, train-classifier, train-mini-sd
    ("train-base-groupnorm", TB + ["--block-out-channels", "30,64,64", "--out", "{ws}/new"], r"30 is not a positive multiple of 8"),
    ("train-base-attention-levels", TB + ["--attention-levels", "true,false", "--out", "{ws}/new"],
     r"attention_levels needs one entry per level"),
    ("train-base-image-size", TB + ["--image-size", "10", "--out", "{ws}/new"], r"image_size 10 must be"),
    ("train-base-config-channels-string", TB + ["--config", "{ws}/configs/channels-str.json", "--out", "{ws}/new"],
     r"--block-out-channels.*list"),
    ("train-base-config-lr-bool", TB + ["--config", "{ws}/configs/lr-bool.json", "--out", "{ws}/new"], r"--lr.*true"),
    ("train-base-out-user-folder", TB + ["--out", "{ws}/user"], r"--overwrite"),
    ("train-base-steps-zero", ["train-base", "--steps", "0", "--out", "{ws}/new"], r"steps must be at least 1"),
    ("train-classifier-epochs-zero", ["train-classifier", "--epochs", "0", "--out", "{ws}/new"], r"at least 1"),
    ("train-classifier-out-is-file", ["train-classifier", "--epochs", "1", "--out", "{ws}/user/notes.txt"],
     r"existing file"),
    ("train-mini-sd-groupnorm", ["train-mini-sd", "--unet-channels", "12,32", "--out", "{ws}/new"],
     r"12 is not a positive multiple of 8"),
    ("train-mini-sd-out-user", ["train-mini-sd", "--out", "{ws}/user"], r"--overwrite"),
    ("train-mini-flow-width", ["train-mini-flow", "--width", "24", "--out", "{ws}/new"], r"positive multiple of 16"),
    ("train-mini-flow-vae-groupnorm", ["train-mini-flow", "--vae-channels", "12,32", "--out", "{ws}/new"],
     r"12 is not a positive multiple of 8"),
    ("train-mini-flow-out-user", ["train-mini-flow", "--out", "{ws}/user"], r"--overwrite"),
    ("train-mini-flow-exclude-unknown", ["train-mini-flow", "--exclude", "eleven", "--out", "{ws}/new"],
     r"unknown digit 'eleven'"),
    ("train-mini-sd-exclude-all", ["train-mini-sd", "--exclude", "0,1,2,3,4,5,6,7,8,9", "--out", "{ws}/new"],
     r"leaves no digit"),
    # eval
    ("eval-protocol-unknown", ["eval", *M, "--protocol", "digits-kind", "--out", "{ws}/new"], r"unknown protocol"),
    ("eval-n-one", DC[:-6] + ["--n", "1", "--out", "{ws}/new"], r"n must be at least 2"),
    ("eval-steps-zero", DC + ["--steps", "0", "--out", "{ws}/new"], r"steps must be at least 1, got 0"),
    ("eval-out-is-model", DC + ["--out", "{ws}/model"], r"overwrite the input"),
    ("eval-out-is-classifier", DC + ["--out", "{ws}/classifier"], r"overwrite the input"),
    ("eval-out-user-folder", DC + ["--out", "{ws}/user"], r"--overwrite"),
    ("eval-classifier-missing", DC[:-8] + ["--classifier", "{ws}/nope", "--n", "2", "--out", "{ws}/new"],
     r"classifier config not found"),
    ("eval-classifier-truncated", DC[:-8] + ["--classifier", "{ws}/truncated-classifier", "--n", "2", "--out", "{ws}/new"],
     r"damaged or truncated"),
    ("eval-all-images-nan", ["eval", "--model", "{ws}/nan-model", *DC[3:], "--out", "{ws}/new"],
     r"all \d+ generated images hold NaN"),
    ("eval-wrong-protocol-option", DC + ["--subset", "nudity", "--out", "{ws}/new"], r"do not apply to protocol"),
    ("eval-i2p-seed-inf", I2P + ["{ws}/i2p/seed-inf.csv"], r"line 3 .*'sd_seed' holds 'inf'"),
    ("eval-i2p-seed-negative", I2P + ["{ws}/i2p/seed-negative.csv"], r"line 3 .*'sd_seed' holds '-5'"),
    ("eval-i2p-nudity-text", I2P + ["{ws}/i2p/nudity-text.csv"], r"line 3 .*'nudity_percentage' holds 'lots'"),
    ("eval-i2p-guidance-text", I2P + ["{ws}/i2p/guidance-text.csv", "--row-guidance", "true"], r"line 3 .*'sd_guidance_scale' holds 'seven'"),
    ("eval-i2p-short-row", I2P + ["{ws}/i2p/short-row.csv"], r"line 3 .*3 cells but the header has 5"),
    ("eval-i2p-long-row", I2P + ["{ws}/i2p/long-row.csv"], r"line 3 .*6 cells but the header has 5"),
    ("eval-i2p-not-utf8", I2P + ["{ws}/i2p/latin1.csv"], r"not UTF-8"),
    ("eval-i2p-no-columns", I2P + ["{ws}/i2p/no-columns.csv"], r"none of the known layouts"),
    ("eval-i2p-empty-subset", ["eval", *M, "--protocol", "i2p-nudity", "--subset", "nudity50", "--out", "{ws}/new",
                               "--prompts", "{ws}/i2p/none-selected.csv", "--limit", "1"], r"none of its 2 rows"),
    ("eval-i2p-limit-zero", I2P + ["{ws}/i2p/no-nudity.csv", "--limit", "0"], r"limit must be at least 1"),
    ("eval-i2p-missing-file", I2P + ["{ws}/i2p/nope.csv"], r"prompt set not found"),
    # report, demo, bench
    ("report-run-missing", ["report", "{ws}/nope", "--out", "{ws}/new"], r"run folder not found"),
    ("report-run-without-metrics", ["report", "{ws}/run-without-metrics", "--out", "{ws}/new"], r"eval results"),
    ("report-metrics-without-numbers", ["report", "{ws}/run-odd-metrics", "--out", "{ws}/new"],
     r"not an `erase eval` run"),
    ("sample-eta-negative", S + ["--eta", "-1", "--out", "{ws}/new"], r"--eta must be a finite number >= 0"),
    ("unlearn-checkpoint-every-zero", U + ["--checkpoint-every", "0", "--out", "{ws}/new"],
     r"checkpoint_every must be at least 1"),
    ("unlearn-config-seed-huge", U + ["--config", "{ws}/configs/seed-huge.json", "--out", "{ws}/new"],
     r"--seed.*integer"),
    ("eval-n-forget-zero", DC + ["--n-forget", "0", "--out", "{ws}/new"], r"n_forget at least 1"),
    ("report-metrics-not-utf8", ["report", "{ws}/run-latin1", "--out", "{ws}/new"], r"not UTF-8"),
    ("report-out-is-run", ["report", "{ws}/run-without-metrics", "--out", "{ws}/run-without-metrics"],
     r"overwrite the input"),
    ("report-out-user-folder", ["report", "{ws}/run-without-metrics", "--out", "{ws}/user"], r"--overwrite"),
    ("demo-out-user-folder", ["demo", "--out", "{ws}/user"], r"--overwrite"),
    ("demo-method-unknown", ["demo", "--methods", "magic", "--out", "{ws}/new"], r"unknown method\(s\) magic"),
    ("bench-steps-zero", ["bench", "--steps", "0", "--out", "{ws}/new"], r"steps must be at least 1"),
    ("bench-out-user-folder", ["bench", "--out", "{ws}/user"], r"--overwrite"),
]


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    return code, capsys.readouterr().err


@pytest.mark.parametrize("argv, expected", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(argv, expected, workspace, capsys, one_thread, monkeypatch):
    import re

    monkeypatch.chdir(workspace / "cwd")  # `--out .` names an (empty) current folder
    before = tree_digest(workspace)
    code, err = run_cli([a.format(ws=workspace) for a in argv], capsys)
    errors = [line for line in err.splitlines() if "error:" in line]
    assert code not in (0, None), f"exit {code}: {err}"
    assert "Traceback" not in err, err
    assert len(errors) == 1, err
    assert re.search(expected, errors[0]), errors[0]
    assert tree_digest(workspace) == before, "the command changed files it was refused to write"


def test_table_covers_every_writing_command():
    from erase.cli import build_parser

    sub = next(a for a in build_parser()._actions if a.dest == "command")
    writers = {name for name, p in sub.choices.items() if any("--out" in a.option_strings for a in p._actions)}
    covered = {argv[0] for _, argv, _ in CASES}
    assert writers <= covered, f"no bad-input case for {writers - covered}"
    assert len(CASES) >= 40


# -- what --out may replace -------------------------------------------------------------------------

def test_overwrite_replaces_and_reruns_reuse_their_own_kind(tiny_model, tmp_path, capsys, one_thread):
    sample = ["sample", "--model", str(tiny_model), "--classes", "3", "--n", "1", "--steps", "1"]
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("x")
    assert main(sample + ["--out", str(tmp_path / "mine")]) == 2
    assert (tmp_path / "mine" / "keep.txt").is_file()
    assert main(sample + ["--out", str(tmp_path / "mine"), "--overwrite"]) == 0
    assert not (tmp_path / "mine" / "keep.txt").exists() and (tmp_path / "mine" / "3" / "00000.png").is_file()
    assert main(sample + ["--out", str(tmp_path / "mine")]) == 0  # its own output: rerun replaces it
    (tmp_path / "empty").mkdir()
    assert main(sample + ["--out", str(tmp_path / "empty")]) == 0
    # An eval output is not a sample output: refused without --overwrite.
    (tmp_path / "mine" / "erase-output.json").write_text('{"kind": "eval"}')
    assert main(sample + ["--out", str(tmp_path / "mine")]) == 2
    assert "`erase eval` output" in capsys.readouterr().err
    assert not list(tmp_path.glob(".*")), "temporary folders were left behind"


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_outputs_follow_the_umask(umask, file_mode, dir_mode, tiny_model, tmp_path, one_thread):
    from erase.loop import unlearn

    old = os.umask(umask)
    try:
        assert main(["sample", "--model", str(tiny_model), "--classes", "3", "--n", "1", "--steps", "1",
                     "--out", str(tmp_path / "s")]) == 0
        unlearn(tiny_model, "ga", "3", tmp_path / "u", steps=1, batch_size=4)
    finally:
        os.umask(old)
    for root in (tmp_path / "s", tmp_path / "u"):
        paths = [root, *root.rglob("*")]
        assert {p.stat().st_mode & 0o777 for p in paths if p.is_dir()} == {dir_mode}, root
        assert {p.stat().st_mode & 0o777 for p in paths if p.is_file()} == {file_mode}, root


# -- numbers ----------------------------------------------------------------------------------------

def test_json_never_holds_nan():
    from erase.eval.protocols.base import _defined
    from erase.utils import write_json

    with pytest.raises(EraseError, match=r"metrics\.fid is not a finite number"):
        write_json("/tmp/never-written.json", {"metrics": {"fid": float("nan")}})
    assert not Path("/tmp/never-written.json").exists()
    clean, undefined = _defined({"fid": float("inf"), "per_class": {"three": float("nan"), "four": 0.5}})
    assert clean == {"fid": None, "per_class": {"three": None, "four": 0.5}}
    assert set(undefined) == {"fid", "per_class.three"}


# -- faults -----------------------------------------------------------------------------------------

FAST = dict(steps=4, batch_size=4, checkpoint_every=2)


def test_kill_during_final_save_then_rerun_completes(tiny_model, tmp_path, capsys, one_thread):
    """SIGKILL while the model is being written (after the weights, before the marker), then the same command."""
    from erase.backbones import load_backbone
    from erase.loop import unlearn

    out = tmp_path / "erased"
    script = (
        "import os, signal, sys, torch\n"
        "torch.set_num_threads(1)\n"
        "import erase.unlearning.outputs as o, erase.loop as u\n"
        "o.mark_output = lambda *a: os.kill(os.getpid(), signal.SIGKILL)\n"
        f"u.unlearn({str(tiny_model)!r}, 'ga', '3', {str(out)!r}, **{FAST!r})\n")
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not out.exists() and (tmp_path / "erased-checkpoints" / "step-0000002").is_dir()
    with pytest.raises(EraseError, match="not finished yet: rerun the same"):
        load_backbone(out)
    code, err = run_cli(["sample", "--model", str(out), "--n", "1", "--steps", "1", "--out", str(tmp_path / "s")], capsys)
    assert code == 2 and "not finished yet" in err

    resumed = load_backbone(unlearn(tiny_model, "ga", "3", out, **FAST)).unet.state_dict()
    full = load_backbone(unlearn(tiny_model, "ga", "3", tmp_path / "full", **FAST)).unet.state_dict()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert {p.name for p in out.iterdir()} >= {"delta.safetensors", "erase_config.json", "erase-output.json"}


def test_full_disk_during_save_leaves_nothing_that_loads(tiny_model, tmp_path, capsys, monkeypatch, one_thread):
    import erase.backbones.base
    from erase.backbones import load_backbone

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(args[1]))

    monkeypatch.setattr(erase.backbones.base, "save_file", no_space)  # the delta, written after the model
    out = tmp_path / "erased"
    code, err = run_cli(["unlearn", "--model", str(tiny_model), "--method", "ga", "--forget", "3", "--steps", "4",
                         "--batch-size", "4", "--checkpoint-every", "2", "--out", str(out)], capsys)
    assert code == 1 and "No space left on device" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]
    with pytest.raises(EraseError, match="not finished yet"):
        load_backbone(out)


def test_truncated_checkpoint_is_skipped_for_the_previous_one(tiny_model, tmp_path, caplog, one_thread):
    from erase.backbones import load_backbone
    from erase.loop import unlearn

    out = tmp_path / "erased"
    unlearn(tiny_model, "ga", "3", out, stop_after=4, **{**FAST, "steps": 6})
    ckpts = sorted((tmp_path / "erased-checkpoints").glob("step-*"))
    assert [p.name for p in ckpts] == ["step-0000002", "step-0000004"]
    damaged = ckpts[-1] / "params.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:64])
    with caplog.at_level("WARNING", logger="erase"):
        resumed = load_backbone(unlearn(tiny_model, "ga", "3", out, **{**FAST, "steps": 6})).unet.state_dict()
    assert "skipping unreadable checkpoint" in caplog.text and "step-0000004" in caplog.text
    full = load_backbone(unlearn(tiny_model, "ga", "3", tmp_path / "full", **{**FAST, "steps": 6})).unet.state_dict()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


def test_config_files_are_checked_like_the_command_line():
    from erase.config import build_config
    from erase.methods.eupmu import EUPMUConfig

    assert build_config(EUPMUConfig, {"lr": 1, "params": None}).lr == 1.0  # 1 means 1.0, null means default
    for bad in ({"lr": True}, {"mixed_precision": "fp16"}, {"antithetic": "yes"}, {"seed": 1.5}, {"target": "other"}):
        with pytest.raises(EraseError):
            build_config(EUPMUConfig, bad)


def test_prompts_too_long_for_a_file_name_are_prompts(tmp_path):
    from erase.concept_data import cache_dir_for
    from erase.concepts import load_concept

    prompt = "a painting of " + "very " * 80 + "/strange/ things"
    concept = load_concept(prompt, retain=["a cat"], root=tmp_path)  # no "File name too long": it is a literal prompt
    assert concept.forget == [prompt]
    name = cache_dir_for({"concept": {"name": prompt}, "images": 1}, tmp_path).name
    assert len(name) <= 60 and "/" not in name and " " not in name
    with pytest.raises(EraseError, match="anchor prompt"):
        load_concept("three", anchor="a handwritten digit three")  # remapping a forget prompt to itself


def test_save_load_round_trip_marks_the_folder(tiny_model, tmp_path):
    from erase.outputs import output_kind
    from erase.loop import unlearn

    out = unlearn(tiny_model, "ga", "3", tmp_path / "u", steps=1, batch_size=4)
    assert output_kind(out) == "unlearn"
    assert json.loads((out / "erase_config.json").read_text())["steps"] == 1


def test_unfinished_model_folder_is_refused(tiny_model, tmp_path):
    """A folder with the model but without the rest of the run (an older version's interrupted save)."""
    from erase.backbones import load_backbone

    save_tiny_ddpm(tmp_path / "half", attention=False, unlearning={"method": "ga"})
    with pytest.raises(EraseError, match=r"unfinished `erase unlearn` output .*delta\.safetensors.*rerun"):
        load_backbone(tmp_path / "half")
