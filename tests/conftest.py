"""Shared test fixtures: tiny models built from configs and saved to temporary folders."""

from __future__ import annotations

import json
import os

# The suite runs in pytest-xdist workers that share the machine's cores: each gets its share of
# threads (one each with two workers on two cores), inherited by the commands the tests start.
# Left at torch's default, every worker runs one OpenMP thread per core and they contend.
# Only a worker knows the count: the controller process that spawns them must not set the variable,
# or every worker inherits the controller's whole-machine value.
if "PYTEST_XDIST_WORKER" in os.environ:
    _WORKERS = int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import pytest  # noqa: E402
import torch  # noqa: E402

if "OMP_NUM_THREADS" in os.environ:
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

DIGIT_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="session")
def tiny_ddpm_dir(tmp_path_factory):
    """An untrained 8x8 grey class-conditional DDPM over the ten digit names, saved to disk."""
    return save_tiny_ddpm(tmp_path_factory.mktemp("models") / "tiny-ddpm", attention=False)


def save_tiny_ddpm(path, attention: bool, **info):
    """An untrained 8x8 digits DDPM (self-attention at the inner level if `attention`) saved at `path`."""
    from erase.backbones import ClassConditionalDDPM

    torch.manual_seed(0)
    model = ClassConditionalDDPM.create(DIGIT_NAMES, image_size=8, channels=1, block_out_channels=(8, 16),
                                        attention_levels=(False, attention), norm_num_groups=4)
    model.save_pretrained(path, **info)
    return path


@pytest.fixture(scope="session")
def tiny_classifier_dir(tmp_path_factory):
    """An 8x8 grey digits classifier, random but for its BatchNorm statistics (set on the digits), saved to disk."""
    from erase.classifier import ClassifierArch, SmallClassifier
    from erase.data import load_dataset

    torch.manual_seed(0)
    model = SmallClassifier(ClassifierArch(in_channels=1, image_size=8, num_classes=10, width=2), DIGIT_NAMES)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # cumulative average: one pass sets the statistics
    with torch.no_grad():
        model.train()(load_dataset("digits", "train", image_size=8).images)
    model.eval()
    path = tmp_path_factory.mktemp("models") / "tiny-classifier"
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def two_runs(tmp_path_factory, tiny_ddpm_dir, tiny_classifier_dir):
    """The tiny DDPM and a copy of it with the digit 3 erased by `ga` (4 steps), each evaluated by
    digits-class: (the original's eval folder, the erased model's); the erased model is saved beside them."""
    from erase.eval.protocols import DigitsClass
    from erase.loop import unlearn

    root = tmp_path_factory.mktemp("runs")
    erased = unlearn(tiny_ddpm_dir, "ga", "3", root / "models" / "ga", steps=4, batch_size=4, lr=1e-3,
                     progress=False)
    for name, model, forget in (("original", tiny_ddpm_dir, None), ("ga", erased, 3)):
        DigitsClass(forget=forget, classifier=str(tiny_classifier_dir), n=3, steps=2, batch_size=8,
                    fid_bootstrap=20).run(model, root / name)
    return root / "original", root / "ga"


def eval_digits_prompts(model, forget: str, classifier_dir, out) -> tuple[dict, list[dict], list[int]]:
    """`erase eval --protocol digits-prompts` at its smallest (one image per prompt, one step) on `model`,
    and what the classifier says about each saved image: (metrics.json, index.json's images, the class
    predicted for each of them in the index's order)."""
    from erase.classifier import SmallClassifier
    from erase.cli import main
    from erase.digits import classify_digits
    from erase.eval.generation import load_images

    assert main(["eval", "--model", str(model), "--protocol", "digits-prompts", "--forget", forget,
                 "--classifier", str(classifier_dir), "--n", "1", "--steps", "1", "--batch-size", "16",
                 "--guidance", "2", "--out", str(out)]) == 0
    results = json.loads((out / "metrics.json").read_text())
    index = json.loads((out / "index.json").read_text())["images"]
    images = load_images([out / e["file"] for e in index])
    return results, index, classify_digits(images, SmallClassifier.from_pretrained(classifier_dir)).tolist()


def _write_tiny_clip_tokenizer(path):
    """A CLIP BPE tokenizer whose vocabulary is single characters: enough for any ASCII prompt, offline."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(33, 127)]
    vocab = {tok: i for i, tok in enumerate(chars + [c + "</w>" for c in chars])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    path.mkdir(parents=True, exist_ok=True)
    (path / "vocab.json").write_text(json.dumps(vocab))
    (path / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(path / "vocab.json"), str(path / "merges.txt"), pad_token="<|endoftext|>",
                         model_max_length=77)


@pytest.fixture(scope="session")
def tiny_sd_dir(tmp_path_factory):
    """A tiny random StableDiffusionPipeline (16x16 images, 2x VAE downsampling), saved to disk."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tokenizer = _write_tiny_clip_tokenizer(root / "tok")
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=2, norm_num_groups=4)
    vae = AutoencoderKL(block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=4,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        norm_num_groups=4, sample_size=16)
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    path = root / "tiny-sd"
    pipe.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_flux_dir(tmp_path_factory):
    """The tiny guidance-distilled FluxPipeline of tests/tiny_pipelines.py (16x16 images), saved to disk."""
    from tiny_pipelines import tiny_flux_pipeline

    from erase.backbones import FluxBackbone

    path = tmp_path_factory.mktemp("models") / "tiny-flux"
    FluxBackbone(tiny_flux_pipeline()).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_clip_dir(tmp_path_factory):
    """A tiny random CLIPModel with its processor (same character tokenizer), saved to disk."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    tokenizer = _write_tiny_clip_tokenizer(root / "tok")
    config = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    processor = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                                 crop_size={"height": 32, "width": 32}),
                              tokenizer=tokenizer)
    path = root / "tiny-clip"
    CLIPModel(config).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.fixture
def no_nudenet(monkeypatch):
    """NudeNet replaced by a detector that finds nothing (its ONNX model is slow to load and beside
    the point where a test checks what reaches the generator or the report)."""
    import erase.eval.protocols.i2p_nudity as protocols

    class NoDetections:
        def __init__(self, batch_size):
            pass

        def detect(self, images, progress=False):
            return [[] for _ in images]

    monkeypatch.setattr(protocols, "NudeNet", NoDetections)


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and a busy machine slows them down less."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny digits DDPM with attention (so the `attn` group exists), as `erase unlearn` reads it."""
    return save_tiny_ddpm(tmp_path_factory.mktemp("tiny") / "model", attention=True,
                          training={"config": {"dataset": "digits"}})


def install_in_hub_cache(hf_home, repo_id: str, folder) -> None:
    """Put a saved pipeline folder into a Hugging Face cache under HF_HOME as the Hub's `repo_id`, in
    huggingface_hub's layout (hub/models--owner--name/snapshots/<commit>/ and refs/main), so that
    with HF_HUB_OFFLINE=1 the Hub id resolves to it as a downloaded model would."""
    import shutil
    from pathlib import Path

    commit = "0" * 40
    repo = Path(hf_home) / "hub" / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(folder, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)


def assert_trained_only(group: set[str], before: dict, after: dict, delta: dict, what: str) -> None:
    """Some weights moved, all of them in `group`, and `delta` holds exactly the moved tensors' new values."""
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert changed, f"{what} changed no weight"
    assert changed <= group, f"{what} changed weights outside the group: {sorted(changed - group)[:3]}"
    assert set(delta) == changed and all(torch.equal(delta[k], after[k]) for k in delta)


def random_latent_data(model):
    """Forget/retain data for a text-to-image `model` without drawing an image: random latents with real
    prompt conditions (forget "the number 3", anchor "the number 4", retain "the number 5" and "the digit 7")."""
    from erase.unlearn_data import UnlearnData

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(8, *model.latent_shape, generator=g)
    return UnlearnData(forget_x0=latents[:4], forget_cond=model.encode_conditions(["the number 3"] * 4).to("cpu"),
                       anchor_cond=model.encode_conditions(["the number 4"] * 4).to("cpu"), retain_x0=latents[4:],
                       retain_cond=model.encode_conditions(["the number 5", "the digit 7"] * 2).to("cpu"),
                       description={"kind": "test"})


def saved_with_data(backbone_cls, build, folder):
    """The tiny pipeline `build()` saved at `folder` by its backbone, and `random_latent_data` of it."""
    model = backbone_cls(build())
    model.save_pretrained(folder)
    return folder, random_latent_data(model)


def write_concept_folder(root, name, forget: list[str], anchor: str, retain: list[str]):
    """A concept folder as `prompts/three` is laid out: forget.txt, anchor.txt and retain.txt."""
    folder = root / name
    folder.mkdir(parents=True)
    (folder / "forget.txt").write_text("\n".join(forget) + "\n")
    (folder / "anchor.txt").write_text(anchor + "\n")
    (folder / "retain.txt").write_text("\n".join(retain) + "\n")
    return folder
