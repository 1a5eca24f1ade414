"""The field's published prompt sets, read as published, reach the generator row by row.

Each layout's test file copies the published header and the shape of a few rows, with our own text
(the published files are not part of the repository). On a tiny pipeline, `metrics.json` must list
every prompt, seed, guidance and size that the backbone was asked for, and they must be the file's.
The last test reads reference copies of the published files from a `shared/data` folder beside the
repository (or in the folder `ERASE_PROMPT_SETS` names) where one exists, and is skipped otherwise.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from erase.backbones import load_backbone
from erase.eval.prompts import LAYOUTS, read_prompt_set
from erase.eval.protocols import I2PNudity, T2IUtility
from erase.eval.report import build_report
from erase.utils import EraseError, derive_seed

I2P_HF = ["prompt", "categories", "hard", "inappropriate_percentage", "nudity_percentage", "q16_percentage",
          "sd_safety_percentage", "prompt_toxicity", "lexica_url", "sd_seed", "sd_guidance_scale",
          "sd_image_width", "sd_image_height", "sd_model"]
I2P_COPY = ["", "prompt", "categories", "hard", "inappropriate_percentage", "nudity_percentage", "q16_percentage",
            "sd_safety_percentage", "prompt_toxicity", "lexica_url", "evaluation_seed", "evaluation_guidance",
            "sd_image_width", "sd_image_height", "sd_model", "case_number"]
UNLEARNDIFF = ["Unnamed: 0", *I2P_COPY[1:]]
MMA = ["target_prompt", "adv_prompt", "sanitized_adv_prompt", "success_against_sanitization_defense", "clean_prompt"]
P4D = ["", "prompt", "evaluation_seed", "evaluation_guidance", "case_number", "safe_model", "safe_level"]
RING = ["sensitive prompt", "normal prompt"]
COCO = ["case_number", "source", "prompt", "evaluation_seed", "coco_id"]


def i2p_row(columns, k, prompt, seed, guidance, size):
    values = {"": k, "Unnamed: 0": k, "prompt": prompt, "categories": "sexual", "hard": 1,
              "inappropriate_percentage": 80.0, "nudity_percentage": 60.0, "q16_percentage": 10.0,
              "sd_safety_percentage": 50.0, "prompt_toxicity": 0.2, "lexica_url": f"https://example.org/{k}",
              "sd_seed": seed, "evaluation_seed": seed, "sd_guidance_scale": guidance, "evaluation_guidance": guidance,
              "sd_image_width": size[0], "sd_image_height": size[1], "sd_model": "stable-diffusion-v1-4",
              "case_number": 100 + k}
    return [values[c] for c in columns]


# Each set: header, rows, and what the generator must get per row: (prompt, seed, guidance, size).
# Seeds span the published range (up to 2**32), guidance the I2P values, sizes small for the tiny model and
# mixed, as in the published I2P files (mostly 512 x 512, a few rows 384 x 512 or 512 x 256). The prompts
# keep what the published cells hold: a trailing space, a line break inside a quoted cell.
I2P_ROWS = [("a figure in a doorway, oil ", 2280607951, 7, (24, 16)),
            ("a bather\r\nby a lake", 872306728, 11, (24, 16)), ("a portrait, charcoal", 4261553411, 7, (16, 24))]


def write(path: Path, header, rows) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def sets(tmp_path) -> dict:
    """name -> (file, options, expected per row (prompt, seed, guidance, width, height) or None where derived)."""
    out = {}
    for name, header in (("i2p-hf", I2P_HF), ("i2p-sexual", I2P_COPY), ("unlearndiffatk", UNLEARNDIFF)):
        rows = [i2p_row(header, k, *r) for k, r in enumerate(I2P_ROWS)]
        out[name] = (write(tmp_path / f"{name}.csv", header, rows), {},
                     [(p, s, float(g), *size) for p, s, g, size in I2P_ROWS])
    p4d = [(0, "a statue garden at noon", 206205177, 7, 1172, "sld", "MAX"),
           (1, "a marble hall, soft light", 3693994600, 9, 2435, "esd", "STRONG")]
    out["p4d"] = (write(tmp_path / "p4d.csv", P4D, p4d), {}, [(r[1], r[2], float(r[3]), None, None) for r in p4d])
    mma = [("a target one", "adv one <|startoftext|> tokens ", "adv one", "True", "a tie on a table "),
           ("a target two", "adv two (( she", "adv two", "False", "a flag by a race car")]
    out["mma-diffusion"] = (write(tmp_path / "mma.csv", MMA, mma), {}, [(r[1], None, 7.5, None, None) for r in mma])
    out["mma-diffusion-clean"] = (tmp_path / "mma.csv", {"prompt_column": "clean_prompt"},
                                  [(r[4], None, 7.5, None, None) for r in mma])
    ring = [("A painting of a figure, bare shoulders.", "A painting of a figure in a coat."),
            ("A sketch of a bather.", "A sketch of a reader.")]
    out["ring-a-bell"] = (write(tmp_path / "ring.csv", RING, ring), {}, [(r[0], None, 7.5, None, None) for r in ring])
    return out


@pytest.fixture
def generator_calls(monkeypatch, tiny_sd_dir):
    """Every (prompt, seed, guidance, height, width) the tiny pipeline's backbone is asked to draw."""
    calls = []
    cls = type(load_backbone(tiny_sd_dir))
    original = cls.sample

    def recording(self, conditions, seeds, *args, **kwargs):
        for prompt, seed in zip(conditions, seeds):
            calls.append((prompt, seed, kwargs["guidance"], kwargs.get("height"), kwargs.get("width")))
        return original(self, conditions, seeds, *args, **kwargs)

    monkeypatch.setattr(cls, "sample", recording)
    return calls


class NoNudeNet:
    """NudeNet's place in the tests that check the prompts, not the detector."""

    def __init__(self, batch_size):
        pass

    def detect(self, images, progress=False):
        return [[] for _ in images]


@pytest.mark.parametrize("name", ["i2p-hf", "i2p-sexual", "unlearndiffatk", "p4d", "mma-diffusion",
                                  "mma-diffusion-clean", "ring-a-bell"])
def test_each_prompt_reaches_the_generator_with_its_own_seed_and_guidance(name, tmp_path, tiny_sd_dir,
                                                                          generator_calls, monkeypatch):
    import erase.eval.protocols.i2p_nudity as protocols

    monkeypatch.setattr(protocols, "NudeNet", NoNudeNet)
    path, options, expected = sets(tmp_path)[name]
    results = I2PNudity(prompts=str(path), steps=1, batch_size=2, **options).run(tiny_sd_dir, tmp_path / "run")
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    listed = [(g["prompt"], g["seed"], g["guidance"], g.get("width"), g.get("height")) for g in written["generated"]]
    # What the generator got, in the metrics' order (it draws grouped by guidance and size).
    got = {(p, s): (g, h, w) for p, s, g, h, w in generator_calls}
    assert len(generator_calls) == len(expected) == len(listed) == written["images"]
    for (prompt, seed, guidance, width, height), row in zip(expected, listed):
        assert row[0] == prompt and row[2] == guidance and (row[3], row[4]) == (width, height)
        if seed is not None:  # the file's own seed; a file without seeds gets derived ones, recorded
            assert row[1] == seed
        g, h, w = got[(prompt, row[1])]
        assert g == guidance and (h, w) == (height, width)
    assert len({row[1] for row in listed}) == len(listed)
    layout = "i2p" if name.startswith(("i2p", "unlearndiff")) else name.removesuffix("-clean")
    assert written["prompt_set"]["layout"] == layout and written["prompt_set"]["rows"] == len(expected)
    metrics = results["metrics"]
    assert metrics["images"] == len(expected) and len(metrics["fraction_with_any_ci95"]) == 2


def test_coco_captions_reach_the_generator_with_their_seeds(tmp_path, tiny_sd_dir, tiny_clip_dir,
                                                            tiny_classifier_dir, generator_calls):
    from PIL import Image

    rows = [(0, "coco-30k", "A bicycle by a wall.", 41337, 203564), (1, "coco-30k", "Two cups on a desk.", 63155, 179765),
            (2, "coco-30k", "A kite over a beach.", 78978, 322141)]
    path = write(tmp_path / "coco.csv", COCO, rows)
    (tmp_path / "ref").mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "ref" / f"{k}.png")
    T2IUtility(prompts=str(path), reference=str(tmp_path / "ref"), clip_model=str(tiny_clip_dir),
               fid_features="classifier", classifier=str(tiny_classifier_dir), fid_bootstrap=0, steps=1,
               batch_size=2).run(tiny_sd_dir, tmp_path / "run")
    written = json.loads((tmp_path / "run" / "metrics.json").read_text())
    expected = [(r[2], r[3], 7.5) for r in rows]
    assert [(g["prompt"], g["seed"], g["guidance"]) for g in written["generated"]] == expected
    assert sorted((p, s, g) for p, s, g, _, _ in generator_calls) == sorted(expected)
    assert written["prompt_set"]["layout"] == "coco"


def test_rows_of_several_sizes_are_each_drawn_at_their_own(tmp_path, tiny_sd_dir, generator_calls, no_nudenet):
    from PIL import Image

    sizes = [(16, 16), (24, 16), (16, 16)]  # (width, height); one prompt twice at two sizes, as in I2P's file
    prompts = ["p0", "p1", "p1"]
    path = write(tmp_path / "i2p.csv", I2P_HF, [i2p_row(I2P_HF, k, p, k, 7, s) for k, (p, s) in
                                                enumerate(zip(prompts, sizes))])
    I2PNudity(prompts=str(path), steps=1, batch_size=2).run(tiny_sd_dir, tmp_path / "run")
    assert sorted((p, s, h, w) for p, s, _, h, w in generator_calls) == [
        ("p0", 0, 16, 16), ("p1", 1, 16, 24), ("p1", 2, 16, 16)]
    index = json.loads((tmp_path / "run" / "index.json").read_text())["images"]
    assert [Image.open(tmp_path / "run" / e["file"]).size for e in index] == sizes
    # The report shows the prompt's two images side by side, at the first one's size.
    assert "p1" in build_report([tmp_path / "run"], tmp_path / "report")[0].read_text()
    # Given one size, every row is drawn at it.
    generator_calls.clear()
    I2PNudity(prompts=str(path), steps=1, batch_size=2, height=16, width=16).run(tiny_sd_dir, tmp_path / "one")
    assert {(h, w) for *_, h, w in generator_calls} == {(16, 16)}


def test_rows_of_several_sizes_need_one_size_for_the_clip_check(tmp_path, tiny_sd_dir, tiny_clip_dir):
    sizes = [(16, 16), (24, 16)]
    path = write(tmp_path / "i2p.csv", I2P_HF, [i2p_row(I2P_HF, k, f"p{k}", k, 7, s) for k, s in enumerate(sizes)])
    with pytest.raises(EraseError, match="several image sizes.*--height and --width"):
        I2PNudity(prompts=str(path), steps=1, reference=str(tmp_path), clip_model=str(tiny_clip_dir)).run(
            tiny_sd_dir, tmp_path / "run")


def test_a_header_of_no_known_layout_is_refused_with_the_choices(tmp_path):
    path = write(tmp_path / "other.csv", ["text", "label"], [("a", 1)])
    with pytest.raises(EraseError, match="none of the known layouts.*--layout"):
        read_prompt_set(path)
    with pytest.raises(EraseError, match="no column 'sensitive prompt'"):
        read_prompt_set(path, layout="ring-a-bell")
    with pytest.raises(EraseError, match="subsets are I2P's"):
        read_prompt_set(write(tmp_path / "ring.csv", RING, [("x", "y")]), subset="nudity")


# -- the published files themselves, where a reference copy is at hand ----------------------------------

# A `shared/data` folder beside the repository's folder, or the folder ERASE_PROMPT_SETS names.
DATA = Path(os.environ.get("ERASE_PROMPT_SETS") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
NO_DATA = pytest.mark.skipif(not DATA.is_dir(), reason=f"no reference copies of the published prompt sets at {DATA} "
                                                      "(set ERASE_PROMPT_SETS to their folder)")
# file, prompt column asked for (None: the layout's) -> (layout, rows, prompt column, seed column, guidance column)
PUBLISHED = {
    ("i2p/unsafe-prompts4703.csv", None): ("i2p", 4703, "prompt", "evaluation_seed", "evaluation_guidance"),
    ("i2p/nudity-benchmark-hf-layout.csv", None): ("i2p", 854, "prompt", "sd_seed", "sd_guidance_scale"),
    ("attack-prompts/i2p-sexual.csv", None): ("i2p", 931, "prompt", "evaluation_seed", "evaluation_guidance"),
    ("attack-prompts/nudity-mma-diffusion.csv", None): ("mma-diffusion", 1000, "adv_prompt", None, None),
    ("attack-prompts/nudity-mma-diffusion.csv", "clean_prompt"): ("mma-diffusion", 1000, "clean_prompt", None, None),
    ("attack-prompts/nudity-p4d.csv", None): ("p4d", 151, "prompt", "evaluation_seed", "evaluation_guidance"),
    ("attack-prompts/nudity-ring-a-bell.csv", None): ("ring-a-bell", 79, "sensitive prompt", None, None),
    ("attack-prompts/nudity-unlearndiff.csv", None): ("i2p", 142, "prompt", "evaluation_seed", "evaluation_guidance"),
    ("coco/coco_30k_captions.csv", None): ("coco", 30000, "prompt", "evaluation_seed", None),
}
# Rows drawn through the tiny pipeline: every row of the attack sets and of I2P's HF layout (about 60 images
# a second); of the full I2P file and of COCO-30k, the first 250 (among them rows of I2P's other sizes, the
# 89th is 384 x 512). Every row of every file is checked against the reader without drawing.
DRAWN = {"i2p/unsafe-prompts4703.csv": 250, "coco/coco_30k_captions.csv": 250}


def file_rows(name: str, column: str | None) -> list[tuple]:
    """(prompt, seed, guidance, height, width) per row, read from the file with the csv module alone: the
    cells as published; None for a seed the file does not give (one is derived), 7.5 for its guidance."""
    _, _, prompt_col, seed_col, guidance_col = PUBLISHED[name, column]
    with (DATA / name).open(newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    return [(r[prompt_col], int(r[seed_col]) if seed_col else None,
             float(r[guidance_col]) if guidance_col else 7.5,
             int(r["sd_image_height"]) if "sd_image_height" in r else None,
             int(r["sd_image_width"]) if "sd_image_width" in r else None) for r in table]


def matches(got: tuple, expected: tuple) -> bool:
    """A drawn (prompt, seed, guidance, height, width) against a file row's; a row without a seed takes any."""
    return got[:1] + got[2:] == expected[:1] + expected[2:] and expected[1] in (None, got[1])


@NO_DATA
@pytest.mark.parametrize("name, column", list(PUBLISHED), ids=[f"{n}:{c or 'default'}" for n, c in PUBLISHED])
def test_published_files_are_read_as_published(name, column):
    layout, rows, prompt_col, seed_col, guidance_col = PUBLISHED[name, column]
    items, described = read_prompt_set(DATA / name, column=column)
    assert described["layout"] == layout and len(items) == rows == described["rows"]
    assert (described["prompt_column"], described["seed_column"], described["guidance_column"]) == (
        prompt_col, seed_col, guidance_col)
    expected = file_rows(name, column)
    got = [(it.prompt, it.seed, it.guidance, it.height, it.width) for it in items]
    assert len(got) == len(expected) and all(matches(g, e) for g, e in zip(got, expected))
    assert [it.source_row for it in items] == list(range(rows))
    if seed_col is None:  # derived per row: (0, row), all different
        assert [it.seed for it in items] == [derive_seed(0, i) for i in range(rows)]


@pytest.fixture
def asked_for(monkeypatch, tiny_sd_dir):
    """Every (prompt, seed, guidance, height, width) the backbone is asked to draw, recorded as asked; the
    tiny pipeline then draws it at 16 x 16 (at I2P's 512 x 512 it takes minutes an image on a CPU)."""
    calls = []
    cls = type(load_backbone(tiny_sd_dir))
    original = cls.sample

    def recording(self, conditions, seeds, *args, **kwargs):
        calls.extend((p, s, kwargs["guidance"], kwargs.get("height"), kwargs.get("width"))
                     for p, s in zip(conditions, seeds))
        return original(self, conditions, seeds, *args, **kwargs | {"height": 16, "width": 16})

    monkeypatch.setattr(cls, "sample", recording)
    return calls


def reached_the_generator(run: Path, calls: list, expected: list) -> None:
    """metrics.json lists the file's rows in order, and the backbone was asked for exactly those."""
    generated = json.loads((run / "metrics.json").read_text())["generated"]
    listed = [(g["prompt"], g["seed"], g["guidance"], g.get("height"), g.get("width")) for g in generated]
    assert [g["source_row"] for g in generated] == list(range(len(expected)))
    assert len(listed) == len(expected) and all(matches(g, e) for g, e in zip(listed, expected))
    # What the backbone got, as a multiset (it draws grouped by guidance and size), is what was listed.
    assert Counter(calls) == Counter(listed)


@NO_DATA
@pytest.mark.parametrize("name, column", [k for k in PUBLISHED if PUBLISHED[k][0] != "coco"],
                         ids=[f"{n}:{c or 'default'}" for n, c in PUBLISHED if PUBLISHED[n, c][0] != "coco"])
def test_published_nudity_sets_reach_the_generator_row_by_row(name, column, tmp_path, tiny_sd_dir, asked_for,
                                                             no_nudenet):
    expected = file_rows(name, column)[:DRAWN.get(name)]
    results = I2PNudity(prompts=str(DATA / name), prompt_column=column, steps=1, batch_size=8,
                        limit=DRAWN.get(name)).run(tiny_sd_dir, tmp_path / "run")
    reached_the_generator(tmp_path / "run", asked_for, expected)
    assert results["metrics"]["images"] == len(expected) and len(results["metrics"]["fraction_with_any_ci95"]) == 2


@NO_DATA
def test_published_coco_captions_reach_the_generator_with_their_seeds(tmp_path, tiny_sd_dir, tiny_clip_dir,
                                                                      tiny_classifier_dir, asked_for):
    from PIL import Image

    name = "coco/coco_30k_captions.csv"
    (tmp_path / "ref").mkdir()
    rng = np.random.default_rng(0)
    for k in range(3):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / "ref" / f"{k}.png")
    T2IUtility(prompts=str(DATA / name), reference=str(tmp_path / "ref"), clip_model=str(tiny_clip_dir),
               fid_features="classifier", classifier=str(tiny_classifier_dir), fid_bootstrap=0, steps=1,
               batch_size=8, limit=DRAWN[name]).run(tiny_sd_dir, tmp_path / "run")
    reached_the_generator(tmp_path / "run", asked_for, file_rows(name, None)[:DRAWN[name]])
