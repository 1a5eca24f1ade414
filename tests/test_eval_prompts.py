"""Prompt sources: plain-text files and the two I2P CSV layouts."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest

from erase.utils import EraseError, derive_seed
from erase.eval.prompts import read_i2p_csv, read_prompt_file

# The published file where a reference copy is at hand: a `shared/data` folder beside the repository's folder,
# or the folder ERASE_PROMPT_SETS names.
DATA = Path(os.environ.get("ERASE_PROMPT_SETS") or Path(__file__).resolve().parents[2] / "shared" / "data")
REAL_I2P = DATA / "i2p" / "unsafe-prompts4703.csv"

ROWS = [  # prompt, categories, nudity_percentage, seed, guidance
    ("a nude figure", "sexual", 80.0, 11, 7),
    ("a beach at dawn, oil", "violence, sexual", 10.0, 12, 9),
    ("a street fight", "violence", 0.0, 13, 255),
    ("a bathing scene", "hate,sexual", 60.0, 4261553411, 13),
]

ORIGINAL = ["prompt", "categories", "hard", "inappropriate_percentage", "nudity_percentage", "q16_percentage",
            "sd_safety_percentage", "prompt_toxicity", "lexica_url", "sd_seed", "sd_guidance_scale",
            "sd_image_width", "sd_image_height", "sd_model"]


def write_i2p(path: Path, layout: str) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        if layout == "original":
            w.writerow(ORIGINAL)
            for p, c, nud, s, g in ROWS:
                w.writerow([p, c, 1, 50.0, nud, 0.0, 0.0, 0.1, "url", s, g, 512, 512, "sd-1.4"])
        else:  # the unsafe-prompts4703.csv copy: unnamed index first, renamed seed/guidance, case_number last
            renamed = {"sd_seed": "evaluation_seed", "sd_guidance_scale": "evaluation_guidance"}
            header = [""] + [renamed.get(c, c) for c in ORIGINAL] + ["case_number"]
            w.writerow(header)
            for i, (p, c, nud, s, g) in enumerate(ROWS):
                w.writerow([i, p, c, 1, 50.0, nud, 0.0, 0.0, 0.1, "url", s, g, 512, 512, "sd-1.4", i])
    return path


@pytest.mark.parametrize("layout", ["original", "copy4703"])
def test_i2p_both_layouts_give_the_rows_seeds_and_guidance(tmp_path, layout):
    items = read_i2p_csv(write_i2p(tmp_path / "i2p.csv", layout))
    assert [(i.prompt, i.seed, i.guidance, i.source_row) for i in items] == [
        (p, s, float(g), k) for k, (p, _, _, s, g) in enumerate(ROWS)]


@pytest.mark.parametrize("layout", ["original", "copy4703"])
@pytest.mark.parametrize("subset,rows", [("all", [0, 1, 2, 3]), ("sexual", [0, 1, 3]), ("nudity", [0, 1, 3]),
                                         ("nudity50", [0, 3])])
def test_i2p_subsets(tmp_path, layout, subset, rows):
    items = read_i2p_csv(write_i2p(tmp_path / "i2p.csv", layout), subset)
    assert [i.source_row for i in items] == rows


def test_i2p_overrides_seed_and_guidance(tmp_path):
    items = read_i2p_csv(write_i2p(tmp_path / "i2p.csv", "original"), seed=5, guidance=7.5)
    assert {(i.seed, i.guidance) for i in items} == {(5, 7.5)}


def test_i2p_missing_columns_are_named(tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text("text,categories\nhello,sexual\n")
    with pytest.raises(EraseError) as err:
        read_i2p_csv(path)
    message = str(err.value)
    assert "prompt" in message and "sd_seed or evaluation_seed" in message
    assert "sd_guidance_scale or evaluation_guidance" in message
    # With fixed seed and guidance only the prompt column is required, and still missing.
    with pytest.raises(EraseError, match="missing column.*prompt"):
        read_i2p_csv(path, seed=0, guidance=7.5)
    with pytest.raises(EraseError, match="nudity_percentage"):
        read_i2p_csv(tmp_path / "bad.csv", "nudity50", seed=0, guidance=7.5)


def test_i2p_unknown_subset_and_missing_file(tmp_path):
    with pytest.raises(EraseError, match="unknown I2P subset 'violent'.*all, sexual, nudity, nudity50"):
        read_i2p_csv(write_i2p(tmp_path / "i2p.csv", "original"), "violent")
    with pytest.raises(EraseError, match="not found"):
        read_i2p_csv(tmp_path / "nope.csv")


def test_prompt_file_skips_comments_and_blank_lines(tmp_path):
    path = tmp_path / "p.txt"
    path.write_text("# provenance: test\n\na cat\n  a dog  \n# another\na red car\n")
    items = read_prompt_file(path, seed=3, guidance=5.0)
    assert [i.prompt for i in items] == ["a cat", "a dog", "a red car"]
    assert [i.seed for i in items] == [derive_seed(3, k) for k in range(3)]
    assert [i.source_row for i in items] == [2, 3, 5]
    assert {i.guidance for i in items} == {5.0}


def test_prompt_file_errors(tmp_path):
    with pytest.raises(EraseError, match="prompt file not found"):
        read_prompt_file(tmp_path / "missing.txt")
    (tmp_path / "empty.txt").write_text("# nothing\n\n")
    with pytest.raises(EraseError, match="no prompts"):
        read_prompt_file(tmp_path / "empty.txt")


@pytest.mark.skipif(not REAL_I2P.is_file(), reason=f"the real I2P file is not at {REAL_I2P}")
def test_real_unsafe_prompts_4703():
    counts = {s: len(read_i2p_csv(REAL_I2P, s)) for s in ("all", "sexual", "nudity", "nudity50")}
    assert counts == {"all": 4703, "sexual": 931, "nudity": 854, "nudity50": 95}
    hf_layout = REAL_I2P.with_name("nudity-benchmark-hf-layout.csv")
    if hf_layout.is_file():
        assert len(read_i2p_csv(hf_layout, "nudity")) == 854
