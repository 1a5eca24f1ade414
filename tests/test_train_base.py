"""`erase train-base`: a killed run resumes from its checkpoint and ends where an uninterrupted one does."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from erase.backbones import load_backbone
from erase.training.train_base import TrainBaseConfig, train_base
from erase.utils import EraseError

TINY = ["--dataset", "digits", "--block-out-channels", "8,16", "--attention-levels", "false,true",
        "--batch-size", "8", "--num-train-timesteps", "100", "--warmup-steps", "5"]


def run_cli(args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "erase.cli", "train-base", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)


def unet_weights(path):
    return load_file(path / "unet" / "diffusion_pytorch_model.safetensors")


def test_killed_run_resumes_and_matches_uninterrupted(tmp_path):
    steps = ["--steps", "300", "--checkpoint-every", "20"]
    reference = run_cli([*TINY, *steps, "--out", str(tmp_path / "ref")])
    assert reference.wait(timeout=600) == 0, reference.stdout.read()

    killed = run_cli([*TINY, *steps, "--out", str(tmp_path / "run")])
    ckpts = tmp_path / "run-checkpoints"
    deadline = time.time() + 300
    while not any(ckpts.glob("step-*/state.json")) and time.time() < deadline:
        time.sleep(0.02)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "run").exists(), "the run finished before it could be killed"
    assert any(ckpts.glob("step-*/state.json"))

    resumed = run_cli([*TINY, *steps, "--out", str(tmp_path / "run")])
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    assert "resuming from" in output
    assert not ckpts.exists(), "checkpoints are removed once the model is saved"
    ref, run = unet_weights(tmp_path / "ref"), unet_weights(tmp_path / "run")
    assert ref.keys() == run.keys()
    for k in ref:
        assert torch.equal(ref[k], run[k]), k
    record = load_backbone(tmp_path / "run").info["training"]
    assert record["steps"] == 300 and record["config"]["batch_size"] == 8


def test_resume_with_other_settings_is_refused(tmp_path):
    config = TrainBaseConfig(steps=4, batch_size=4, block_out_channels=(8, 16),
                             attention_levels=(False, False), num_train_timesteps=50, checkpoint_every=2)
    # Leave a checkpoint behind as an interrupted run would.
    train_base(config, tmp_path / "m", keep_checkpoints=True)
    other = TrainBaseConfig(**{**config.__dict__, "lr": 1e-4})
    with pytest.raises(EraseError, match="settings differ.*lr"):
        train_base(other, tmp_path / "m")


def test_training_lowers_the_loss(tmp_path):
    config = TrainBaseConfig(steps=60, batch_size=16, lr=3e-3, warmup_steps=5, block_out_channels=(8, 16),
                             attention_levels=(False, False), num_train_timesteps=100, ema_decay=0.0)
    torch.manual_seed(config.seed)
    train_base(config, tmp_path / "m")
    model = load_backbone(tmp_path / "m")
    # The smoothed loss starts near 1 (an untrained UNet predicts almost no noise).
    assert model.info["training"]["final_loss"] < 0.8


def test_ema_warm_up_keeps_no_trace_of_the_random_init(tmp_path):
    # diffusers' EMAModel with warm-up: the first update copies the weights (decay 0), so after one
    # step the EMA equals the trained weights; a constant 0.999 decay would keep 99.9% of the init.
    tiny = dict(steps=1, batch_size=4, block_out_channels=(8, 16), attention_levels=(False, False),
                num_train_timesteps=50, warmup_steps=1)
    train_base(TrainBaseConfig(**tiny), tmp_path / "ema")
    train_base(TrainBaseConfig(**tiny, ema_decay=0.0), tmp_path / "raw")
    ema, raw = unet_weights(tmp_path / "ema"), unet_weights(tmp_path / "raw")
    for k in raw:
        assert torch.equal(ema[k], raw[k]), k
    assert load_backbone(tmp_path / "ema").info["training"]["ema_final_decay"] == 0.0


def test_exclude_trains_without_those_classes_and_keeps_the_class_table(tmp_path):
    from erase.data import load_dataset

    labels = load_dataset("digits", "train").labels
    config = TrainBaseConfig(steps=2, batch_size=4, block_out_channels=(8, 16), attention_levels=(False, False),
                             num_train_timesteps=50, exclude=("3", "seven"))
    train_base(config, tmp_path / "m")
    model = load_backbone(tmp_path / "m")
    record = model.info["training"]
    assert record["excluded_classes"] == [3, 7]
    assert record["train_images"] == int(((labels != 3) & (labels != 7)).sum())
    assert model.num_classes == 10 and model.class_index("seven") == 7
    with pytest.raises(EraseError, match="unknown class"):
        train_base(TrainBaseConfig(**{**config.__dict__, "exclude": ("eleven",)}), tmp_path / "bad")


def test_bad_config_values():
    with pytest.raises(ValueError, match="class_dropout"):
        TrainBaseConfig(class_dropout=1.5)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        TrainBaseConfig(steps=0)
