"""Single-file (original LDM layout) checkpoints: the test writes one from a tiny pipeline (with the
renaming `erase export --format single-file` uses) and loads it back through
`StableDiffusionPipeline.from_single_file`, offline, with the component configs of a local pipeline folder."""

import pytest
import torch
from safetensors.torch import save_file

from erase.backbones import StableDiffusionBackbone, ldm_layout, load_backbone
from erase.utils import EraseError
from test_sd_backbone import tiny_pipeline

def to_ldm_state_dict(pipe) -> dict:
    """A pipeline's weights in the original LDM single-file layout (what `erase export` writes)."""
    return ldm_layout.to_ldm_state_dict(pipe.unet, pipe.vae, pipe.text_encoder)


@pytest.fixture(scope="module")
def single_file(tmp_path_factory):
    root = tmp_path_factory.mktemp("single")
    pipe = tiny_pipeline(seed=3)
    # The configs of a same-architecture pipeline folder, as a user would pass with `config=`.
    StableDiffusionBackbone(tiny_pipeline(seed=4)).save_pretrained(root / "configs")
    save_file(to_ldm_state_dict(pipe), str(root / "model.safetensors"))
    return root, pipe


def test_single_file_loads_offline_with_local_configs(single_file):
    root, pipe = single_file
    model = load_backbone(root / "model.safetensors", config=root / "configs")
    assert isinstance(model, StableDiffusionBackbone)
    for name, module in (("unet", pipe.unet), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder)):
        loaded = getattr(model, name).state_dict()
        for key, value in module.state_dict().items():
            assert torch.equal(loaded[key], value), f"{name}.{key}"
    expected = StableDiffusionBackbone(pipe).sample(["the number 3"], [5], steps=3, batch_size=1)
    assert torch.equal(model.sample(["the number 3"], [5], steps=3, batch_size=1), expected)


def test_single_file_errors(single_file, tmp_path):
    root, _ = single_file
    with pytest.raises(EraseError, match="not a diffusers pipeline folder"):
        load_backbone(root / "model.safetensors", config=tmp_path)
    # An LDM checkpoint of another architecture than the config folder: the shapes do not fit.
    from erase.training.mini_sd import build_pipeline, build_tokenizer, caption_words
    bigger = build_pipeline(build_tokenizer(caption_words()), vae_channels=(8, 16), unet_channels=(16, 32),
                            text_hidden=16)
    save_file(to_ldm_state_dict(bigger), str(tmp_path / "bigger.safetensors"))
    with pytest.raises(EraseError, match="could not load a StableDiffusionPipeline"):
        load_backbone(tmp_path / "bigger.safetensors", config=root / "configs")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(EraseError, match="is a file but not a checkpoint"):
        load_backbone(tmp_path / "notes.txt")
