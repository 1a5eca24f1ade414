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
from pathlib import Path

import numpy as np
import pytest

from erase.backbones import load_backbone
from erase.eval.prompts import LAYOUTS, read_prompt_set
from erase.eval.protocols import I2PNudity, T2IUtility
from erase.utils import EraseError

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
# Seeds span the published range (up to 2**32), guidance the I2P values, sizes small for the tiny model.
# One size for all rows (as in the published files), other than the tiny pipeline's 16 x 16.
I2P_ROWS = [("a figure in a doorway, oil", 2280607951, 7, (24, 16)), ("a bather by a lake", 872306728, 11, (24, 16)),
            ("a portrait, charcoal", 4261553411, 7, (24, 16))]


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
    mma = [("a target one", "adv one <|startoftext|> tokens", "adv one", "True", "a tie on a table"),
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


def test_rows_of_several_sizes_need_one_size_given(tmp_path, tiny_sd_dir):
    sizes = [(16, 16), (24, 16)]
    path = write(tmp_path / "i2p.csv", I2P_HF, [i2p_row(I2P_HF, k, f"p{k}", k, 7, s) for k, s in enumerate(sizes)])
    with pytest.raises(EraseError, match="several image sizes.*--height and --width"):
        I2PNudity(prompts=str(path), steps=1).run(tiny_sd_dir, tmp_path / "run")


def test_a_header_of_no_known_layout_is_refused_with_the_choices(tmp_path):
    path = write(tmp_path / "other.csv", ["text", "label"], [("a", 1)])
    with pytest.raises(EraseError, match="none of the known layouts.*--layout"):
        read_prompt_set(path)
    with pytest.raises(EraseError, match="no column 'sensitive prompt'"):
        read_prompt_set(path, layout="ring-a-bell")
    with pytest.raises(EraseError, match="subsets are I2P's"):
        read_prompt_set(write(tmp_path / "ring.csv", RING, [("x", "y")]), subset="nudity")


# -- the published files themselves, where a reference copy is at hand ----------------------------------

# A `shared/data` folder beside the repository, or the folder ERASE_PROMPT_SETS names.
DATA = Path(os.environ.get("ERASE_PROMPT_SETS") or Path(__file__).resolve().parents[1].parent / "shared" / "data")
PUBLISHED = {  # file: (layout, rows, prompt column, seed column, guidance column)
    "attack-prompts/i2p-sexual.csv": ("i2p", 931, "prompt", "evaluation_seed", "evaluation_guidance"),
    "attack-prompts/nudity-mma-diffusion.csv": ("mma-diffusion", 1000, "adv_prompt", None, None),
    "attack-prompts/nudity-p4d.csv": ("p4d", 151, "prompt", "evaluation_seed", "evaluation_guidance"),
    "attack-prompts/nudity-ring-a-bell.csv": ("ring-a-bell", 79, "sensitive prompt", None, None),
    "attack-prompts/nudity-unlearndiff.csv": ("i2p", 142, "prompt", "evaluation_seed", "evaluation_guidance"),
    "coco/coco_30k_captions.csv": ("coco", 30000, "prompt", "evaluation_seed", None),
    "i2p/nudity-benchmark-hf-layout.csv": ("i2p", 854, "prompt", "sd_seed", "sd_guidance_scale"),
}


@pytest.mark.skipif(not DATA.is_dir(), reason="no reference copies of the published prompt sets next to the repository")
@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_files_are_read_as_published(name):
    layout, rows, prompt_col, seed_col, guidance_col = PUBLISHED[name]
    path = DATA / name
    items, described = read_prompt_set(path)
    assert described["layout"] == layout and len(items) == rows == described["rows"]
    assert (described["prompt_column"], described["seed_column"], described["guidance_column"]) == (
        prompt_col, seed_col, guidance_col)
    with path.open(newline="", encoding="utf-8") as f:
        table = list(csv.DictReader(f))
    assert [it.prompt for it in items] == [r[prompt_col].strip() for r in table]
    if seed_col:
        assert [it.seed for it in items] == [int(r[seed_col]) for r in table]
    if guidance_col:
        assert [it.guidance for it in items] == [float(r[guidance_col]) for r in table]
    if "sd_image_width" in table[0]:
        assert [(it.width, it.height) for it in items] == [
            (int(r["sd_image_width"]), int(r["sd_image_height"])) for r in table]
    assert LAYOUTS[layout].name == layout
