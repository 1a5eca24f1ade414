"""The miniature Stable Diffusion: its tokenizer, its training command, and the shipped model."""

import subprocess
import sys
from pathlib import Path

import pytest

from erase.cli import main
from erase.digits import HELDOUT_TEMPLATES, TRAIN_TEMPLATES
from erase.training.mini_sd import build_tokenizer, caption_words

SHIPPED = Path(__file__).resolve().parent.parent / "models" / "mini-sd"

# Stock diffusers only: what a user without this project runs.
STOCK_LOAD = """
import sys, torch
from diffusers import StableDiffusionPipeline
pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])
assert pipe.safety_checker is None
out = pipe(["a handwritten digit three"], num_inference_steps=3, output_type="np",
           generator=torch.Generator().manual_seed(0)).images
print(out.shape)
"""


def test_every_caption_word_is_one_token():
    words = caption_words()
    tokenizer = build_tokenizer(words)
    for word in words:
        assert tokenizer.tokenize(word) == [word + "</w>"]
    ids = tokenizer("the number 3").input_ids
    assert len(ids) == 5 and ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert not set(TRAIN_TEMPLATES) & set(HELDOUT_TEMPLATES)


def test_tokenizer_training_is_deterministic(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        build_tokenizer(caption_words(), folder=tmp_path / name)
    for file in ("vocab.json", "merges.txt"):
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes()


def test_shipped_and_trained_tokenizers_split_every_caption_into_its_words():
    """The shipped tokenizer (hand-built before `tokenizers` trained it) stays: its text encoder was trained on
    its ids, which the trained one does not reproduce (183 entries rather than 212). Both cut every training
    caption and paraphrase of every digit, and the prompts of the `three` concept, into the same whole words."""
    from transformers import CLIPTokenizer

    from erase.concepts import load_concept
    from erase.data import DIGITS_NAMES

    shipped = CLIPTokenizer.from_pretrained(SHIPPED / "tokenizer")
    trained = build_tokenizer(caption_words())
    concept = load_concept("three")
    texts = [t.format(w=DIGITS_NAMES[c], d=c) for t in TRAIN_TEMPLATES + HELDOUT_TEMPLATES for c in range(10)]
    for text in texts + concept.forget + concept.retain + [concept.anchor]:
        words = [w + "</w>" for w in text.lower().split()]
        assert shipped.tokenize(text) == trained.tokenize(text) == words, text
    assert len(shipped) == 212 and len(trained) < len(shipped)


def test_train_command_writes_a_stock_pipeline(tmp_path):
    out = tmp_path / "mini"
    assert main(["train-mini-sd", "--out", str(out), "--vae-steps", "2", "--steps", "2", "--batch-size", "8",
                 "--eval-images", "0"]) == 0
    assert (out / "tokenizer" / "vocab.json").is_file() and (out / "tokenizer" / "merges.txt").is_file()
    result = subprocess.run([sys.executable, "-c", STOCK_LOAD, str(out)], cwd=tmp_path, capture_output=True,
                            text=True, env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(1, 16, 16, 3)" in result.stdout


def test_exclude_drops_the_digit_from_training(tmp_path):
    import json

    from erase.data import load_dataset

    labels = load_dataset("digits", "train").labels
    out = tmp_path / "mini"
    assert main(["train-mini-sd", "--out", str(out), "--vae-steps", "1", "--steps", "1", "--batch-size", "4",
                 "--eval-images", "0", "--exclude", "three"]) == 0
    record = json.loads((out / "erase_info.json").read_text())["info"]["training"]
    assert record["excluded_digits"] == [3]
    assert record["train_images"] == int((labels != 3).sum())


@pytest.mark.slow
def test_shipped_model_draws_the_digits_it_is_asked_for():
    from erase.backbones import load_backbone
    from erase.training.mini_sd import digit_accuracy

    model = load_backbone(SHIPPED)
    defaults = model.info["sample_defaults"]
    acc = digit_accuracy(model, ("a handwritten digit {w}", "a drawing of the number {w}"), n=4,
                         steps=defaults["steps"], guidance=defaults["guidance"])
    assert acc["mean"] >= 0.8, acc  # the target (measured: 1.0, models/mini-sd/README.md)
