"""Every method on every text-to-image backbone (tiny pipelines; the class-conditional DDPM has its
own table in test_methods.py): weights move only in the chosen group, `delta.safetensors` is exactly
the change, and a resumed run equals an uninterrupted one."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from erase.backbones import load_backbone
from erase.methods import METHODS
from erase.loop import unlearn
from conftest import assert_trained_only, saved_with_data
from test_export import BACKBONES

pytestmark = pytest.mark.usefixtures("one_thread")

RUN = dict(steps=3, batch_size=4, checkpoint_every=2, params="condition", progress=False)


@pytest.fixture(scope="module", params=list(BACKBONES))
def backbone(request, tmp_path_factory):
    """(saved pipeline folder, forget/retain data): random latents with real prompt conditions."""
    return saved_with_data(*BACKBONES[request.param], tmp_path_factory.mktemp(request.param) / "model")


@pytest.mark.parametrize("method", list(METHODS))
def test_method_on_backbone(method, backbone, tmp_path):
    path, data = backbone
    before = load_backbone(path).denoiser.state_dict()
    out = unlearn(path, method, out=tmp_path / "full", data=data, **RUN)
    trained = load_backbone(out)
    after = trained.denoiser.state_dict()
    assert_trained_only(set(trained.trainable_parameters("condition")), before, after,
                        load_file(out / "delta.safetensors"), method)

    unlearn(path, method, out=tmp_path / "resumed", data=data, stop_after=2, **RUN)
    resumed = load_backbone(unlearn(path, method, out=tmp_path / "resumed", data=data, **RUN)).denoiser.state_dict()
    assert all(torch.equal(after[k], resumed[k]) for k in after), f"{method}: the resumed run differs"


def test_esd_samples_its_own_xt_on_every_backbone(backbone, tmp_path):
    """ESD's x_t from partial sampling (DDIM, or flow-match Euler on SD3) trains and resumes exactly."""
    path, data = backbone
    options = dict(RUN, xt="sample", sample_steps=3)
    full = load_backbone(unlearn(path, "esd", out=tmp_path / "full", data=data, **options)).denoiser.state_dict()
    unlearn(path, "esd", out=tmp_path / "resumed", data=data, stop_after=2, **options)
    resumed = load_backbone(unlearn(path, "esd", out=tmp_path / "resumed", data=data, **options)).denoiser.state_dict()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    cached = load_backbone(unlearn(path, "esd", out=tmp_path / "cached", data=data, **RUN)).denoiser.state_dict()
    assert any(not torch.equal(full[k], cached[k]) for k in full)


def test_trajectory_retain_samples_on_every_backbone(backbone, tmp_path):
    """The retain term on the reference's sampling paths (DDIM, or flow-match Euler on SD3): against
    the input model's own paths a retain-only run has nothing to learn (its loss is exactly 0), a
    method with a forget term trains and resumes exactly, and the caller's data is left as given."""
    path, data = backbone
    options = dict(RUN, terms={"retain": {"teacher": "input", "samples": "paths", "paths": 2}})
    still = unlearn(path, "finetune", out=tmp_path / "still", data=data, **options)
    assert not load_file(still / "delta.safetensors")
    full = load_backbone(unlearn(path, "eupmu", out=tmp_path / "full", data=data, **options)).denoiser.state_dict()
    unlearn(path, "eupmu", out=tmp_path / "resumed", data=data, stop_after=2, **options)
    resumed = load_backbone(unlearn(path, "eupmu", out=tmp_path / "resumed", data=data, **options)).denoiser.state_dict()
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert data.retain_paths is None


def test_the_concept_recipe_equals_its_stages_and_resumes_exactly_on_every_backbone(backbone, tmp_path):
    """The shape of the shipped `concept-forget` recipe (gradtau, then a repair distilling the original on
    its sampling paths), short: one recipe run = the two stages run by hand with the old options, bit
    for bit, and a recipe killed inside its second stage resumes to the same weights."""
    path, data = backbone
    config = {k: v for k, v in RUN.items() if k != "progress"}
    recipe = {"name": "short-concept", "target": "forget", "stages": [
        {"method": "gradtau", "config": config},
        {"method": "finetune", "config": config, "terms": {"retain": {"teacher": "original", "samples": "paths",
                                                                      "paths": 2}}}]}
    full = unlearn(path, out=tmp_path / "recipe", data=data, recipe=recipe, progress=False)
    first = unlearn(path, "gradtau", out=tmp_path / "s1", data=data, **RUN)
    with pytest.warns(FutureWarning, match="deprecated"):
        second = unlearn(first, "finetune", out=tmp_path / "s2", data=data, retain_target="reference",
                         retain_reference=str(path), retain_samples="trajectories", trajectories=2, **RUN)
    a, b = load_backbone(full).denoiser.state_dict(), load_backbone(second).denoiser.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    unlearn(path, out=tmp_path / "resumed", data=data, recipe=recipe, stop_after=4, progress=False)
    resumed = load_backbone(unlearn(path, out=tmp_path / "resumed", data=data, recipe=recipe,
                                    progress=False)).denoiser.state_dict()
    assert all(torch.equal(a[k], resumed[k]) for k in a)
