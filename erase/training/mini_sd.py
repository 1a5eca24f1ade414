"""`erase train-mini-sd`: a miniature Stable Diffusion trained on captioned handwritten digits.

It is a real `StableDiffusionPipeline` (AutoencoderKL, CLIPTextModel + CLIPTokenizer,
UNet2DConditionModel with cross-attention, DDIM scheduler), only tiny: 16x16 grey images drawn as
3-channel RGB, 4x8x8 latents, a 2-layer text encoder over a vocabulary of its own in which every
caption word is one token. Prompt-based erasure ("three", "the number 3", ...) therefore runs
through exactly the code path of SD 1.x, on a CPU, in minutes.

Training has two phases, sized for about 15 minutes on two idle CPU cores (the shipped model took 46
minutes on a heavily shared machine; see models/mini-sd/README.md): the VAE alone (reconstruction
plus a small KL term), then the UNet and the text encoder jointly on the frozen VAE's latents, with
10% of captions dropped to the empty prompt for classifier-free guidance.
"""

from __future__ import annotations

import copy
import json
import math
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..config import check_channels, config_dict, field
from ..data import DIGITS_NAMES, digit_class, load_dataset
from ..digits import HELDOUT_TEMPLATES, TRAIN_TEMPLATES, captions, classify_digits, default_classifier_path
from ..outputs import mark_output
from ..utils import EraseError, atomic_dir, atomic_write_text, logger, package_versions, step_generator, write_json

from .command import add_training_command
from .train_base import learning_rate

# Extra words the tokenizer knows although no training caption uses them, so that prompts of other
# concepts (nudity, objects, styles) tokenize to something other than unknown tokens on this model.
EXTRA_WORDS = ("photo", "person", "nude", "naked", "wearing", "clothes", "painting", "style", "by", "van",
               "gogh", "car", "dog", "cat", "church", "parachute", "with", "in", "and", "sketch", "art")
NORM_GROUPS = 8  # GroupNorm groups of the miniature VAE and UNet
SPECIAL_TOKENS = ("<|startoftext|>", "<|endoftext|>")


def caption_words() -> list[str]:
    words = {w for t in TRAIN_TEMPLATES + HELDOUT_TEMPLATES for c in range(10)
             for w in t.format(w=DIGITS_NAMES[c], d=c).split()}
    return sorted(words | set(EXTRA_WORDS))


# -- tokenizer -------------------------------------------------------------------------------------
def _clip_tokenizer(folder: Path, vocab: dict[str, int], merges: list[str], max_length: int):
    from transformers import CLIPTokenizer

    write_json(folder / "vocab.json", vocab)
    atomic_write_text(folder / "merges.txt", "#version: 0.2\n" + "\n".join(merges) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=max_length,
                         pad_token="<|endoftext|>")


def build_tokenizer(words: list[str], max_length: int = 16, folder: str | Path | None = None):
    """A CLIPTokenizer over `words` (lower-case letters and digits) in which every word is one token.

    The BPE merges are trained by the `tokenizers` library on the words, with CLIP's end-of-word
    suffix `</w>`, until no pair is left to merge: each word then ends as the single token
    `word</w>`. Training is deterministic (same words, same files). vocab.json and merges.txt are
    written to `folder` (kept: older transformers read these rather than tokenizer.json), or to a
    temporary folder. The shipped models/mini-sd/tokenizer predates this trainer (a hand-written
    BPE, 212 entries numbered differently): its files stay as they are, since its text encoder was
    trained on its ids; both cut every caption into the same words (tests/test_sd_mini.py).
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    chars = sorted({ch for word in words for ch in word})
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    bpe.train_from_iterator(words, trainers.BpeTrainer(
        vocab_size=1 << 20,  # never reached: merging stops when every word is whole
        min_frequency=0, initial_alphabet=chars, end_of_word_suffix="</w>", show_progress=False,
        # The end-of-word characters (`e</w>`) are listed with the special tokens only to fix their ids:
        # the trainer otherwise numbers them in hash-map order, and merges of equal count are ranked
        # by id, so the same words gave different files from run to run.
        special_tokens=[*SPECIAL_TOKENS, *(ch + "</w>" for ch in chars)]))
    trained = json.loads(bpe.to_str())["model"]
    # tokenizers writes a merge as a pair ["a", "b"] (older versions: "a b"); merges.txt wants "a b".
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in trained["merges"]]
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = _clip_tokenizer(Path(folder or tmp), trained["vocab"], merges, max_length)
    split = sorted(w for w in words if tokenizer.tokenize(w) != [w + "</w>"])
    if split:
        raise EraseError(f"these words are not single tokens of the trained tokenizer: {split} "
                         "(the mini-SD's words must be lower-case letters and digits)")
    return tokenizer


# -- model construction -----------------------------------------------------------------------------
def build_vae(image_size: int = 16, vae_channels=(16, 32), latent_channels: int = 4, norm_groups: int = 8, **extra):
    """The miniature's AutoencoderKL: one 2x downsampling per extra level, no mid-block attention."""
    from diffusers import AutoencoderKL

    levels = len(vae_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D",) * levels, up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=tuple(vae_channels), layers_per_block=1, norm_num_groups=norm_groups,
        sample_size=image_size, mid_block_add_attention=False, **extra)  # attention buys nothing at 8x8


def build_pipeline(tokenizer, image_size: int = 16, vae_channels=(16, 32), unet_channels=(16, 32),
                   text_hidden: int = 32, text_layers: int = 2, latent_channels: int = 4,
                   norm_groups: int = NORM_GROUPS):
    """A fresh, untrained StableDiffusionPipeline of the miniature architecture (also used by tests)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    levels = len(vae_channels)
    vae = build_vae(image_size, vae_channels, latent_channels, norm_groups)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=2 * text_hidden,
        num_hidden_layers=text_layers, num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id))
    n = len(unet_channels)
    unet = UNet2DConditionModel(
        sample_size=image_size // 2 ** (levels - 1), in_channels=latent_channels, out_channels=latent_channels,
        block_out_channels=tuple(unet_channels), layers_per_block=1, norm_num_groups=norm_groups,
        down_block_types=("CrossAttnDownBlock2D",) * n, up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=text_hidden, attention_head_dim=8)
    # SD 1.x's schedule and sampler settings, so that the code path is the real one.
    scheduler = DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                              steps_offset=1, prediction_type="epsilon")
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


# -- training -------------------------------------------------------------------------------------
@dataclass
class MiniTrainingConfig:
    """What the miniature trainers share (`train-mini-sd`, `train-mini-flow`): the VAE phase, the
    denoiser + text phase, caption dropout, EMA and the accuracy check after training."""

    vae_steps: int = field(400, "VAE training steps (phase 1)")
    vae_lr: float = field(1e-3, "VAE AdamW learning rate")
    vae_kl_weight: float = field(1e-4, "weight of the KL term of the VAE (keeps latents near N(0, I))")
    steps: int = field(2500, "denoiser + text encoder training steps (phase 2)")
    batch_size: int = field(64, "images per step")
    lr: float = field(1.5e-3, "peak AdamW learning rate of phase 2 (warm-up, cosine decay to 10%)")
    warmup_steps: int = field(200, "linear warm-up steps of phase 2")
    caption_dropout: float = field(0.1, "probability of training on the empty prompt (classifier-free guidance)")
    ema_decay: float = field(0.999, "EMA of the denoiser and text encoder weights; the EMA weights are saved")
    vae_channels: tuple[int, ...] = field((16, 32), "VAE channels per level (one 2x downsampling per extra level)")
    text_hidden: int = field(32, "text encoder width")
    eval_images: int = field(20, "images per digit for the accuracy check after training (0 skips it)")
    eval_guidance: float = field(3.0, "guidance scale of the accuracy check")
    eval_steps: int = field(25, "sampling steps of the accuracy check")
    seed: int = field(0, "seed of weights, batches, noise and timesteps")
    exclude: tuple[str, ...] = field((), "digits (0-9 or names) whose images and captions are left out: the "
                                         "retrained reference for erasing them")

    def __post_init__(self):
        if len({digit_class(d) for d in self.exclude}) == 10:  # also rejects unknown digits, by name
            raise ValueError("--exclude leaves no digit to train on")
        for name in ("vae_steps", "steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not 0 <= self.caption_dropout < 1:
            raise ValueError(f"caption_dropout must be in [0, 1), got {self.caption_dropout}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        check_channels("vae_channels", self.vae_channels, NORM_GROUPS)
        if self.text_hidden < 2 or self.text_hidden % 2:
            raise ValueError(f"text_hidden must be an even number (two attention heads), got {self.text_hidden}")
        if self.eval_images < 0 or self.eval_steps < 1:
            raise ValueError("eval_images must be >= 0 and eval_steps >= 1")


@dataclass
class MiniSDConfig(MiniTrainingConfig):
    unet_channels: tuple[int, ...] = field((16, 32), "UNet channels per level (cross-attention at each)")
    text_hidden: int = field(32, "text encoder width (= UNet cross-attention dim)")

    def __post_init__(self):
        super().__post_init__()
        check_channels("unet_channels", self.unet_channels, NORM_GROUPS)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """Constant-decay EMA, the recipe the shipped miniature SD was trained (and measured) with."""
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p.detach().float(), 1 - decay)


def _train_vae(vae, images: torch.Tensor, config: MiniTrainingConfig) -> float:
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    vae.train()
    loss_avg = None
    for step in range(config.vae_steps):
        g = step_generator(config.seed, 0, step)
        x = images[torch.randint(len(images), (config.batch_size,), generator=g)]
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=g)
        loss = F.mse_loss(vae.decode(z).sample, x) + config.vae_kl_weight * posterior.kl().mean() / z[0].numel()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_avg = loss.item() if loss_avg is None else 0.98 * loss_avg + 0.02 * loss.item()
        if (step + 1) % 250 == 0:
            logger.info("vae step %d/%d: loss %.4f", step + 1, config.vae_steps, loss_avg)
    vae.eval().requires_grad_(False)
    return loss_avg


def training_digits(config: MiniTrainingConfig):
    """The digits train split without `config.exclude`'s digits, and those digits' sorted class ids.
    Their images go, and with them every caption naming them (captions follow the image labels)."""
    data = load_dataset("digits", "train")
    excluded = sorted({digit_class(d) for d in config.exclude})
    if excluded:
        data = data.subset([c for c in range(10) if c not in excluded])
        logger.info("training without digits %s: %d images left", excluded, len(data))
    return data, excluded


def train_mini_sd(config: MiniSDConfig, out: str | Path) -> dict:
    """Train the miniature SD on the digits train split and save it as a pipeline folder at `out`."""
    from ..backbones.stable_diffusion import StableDiffusionBackbone

    start = time.perf_counter()
    data, excluded = training_digits(config)
    images = data.images.expand(-1, 3, -1, -1).contiguous()  # grey digits as RGB, as SD expects
    torch.manual_seed(config.seed)
    tokenizer = build_tokenizer(caption_words())
    pipe = build_pipeline(tokenizer, image_size=images.shape[-1], vae_channels=config.vae_channels,
                          unet_channels=config.unet_channels, text_hidden=config.text_hidden)

    vae_loss = _train_vae(pipe.vae, images, config)
    with torch.no_grad():
        posterior = pipe.vae.encode(images).latent_dist
        # SD's scaling factor makes the latents unit-variance for the diffusion model (0.18215 for SD 1.x).
        scale = 1.0 / posterior.mean.std().item()
        pipe.vae.register_to_config(scaling_factor=scale)
        latents = posterior.mean * scale
    vae_time = time.perf_counter() - start
    logger.info("vae trained in %.0f s (loss %.4f, scaling factor %.4f)", vae_time, vae_loss, scale)

    unet, text_encoder = pipe.unet, pipe.text_encoder
    unet.train()
    text_encoder.train()
    ema_unet = copy.deepcopy(unet).requires_grad_(False)
    ema_text = copy.deepcopy(text_encoder).requires_grad_(False)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    alphas = pipe.scheduler.alphas_cumprod
    caption_table = [captions(c) for c in range(10)]
    # All distinct captions tokenized once; a step indexes into this table.
    flat = [c for per_class in caption_table for c in per_class] + [""]
    ids = tokenizer(flat, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    loss_avg = None
    for step in range(config.steps):
        g = step_generator(config.seed, 1, step)
        x0, caption, noise = draw_captioned_batch(latents, data.labels, config, g)
        t = torch.randint(len(alphas), (len(x0),), generator=g)
        a = alphas[t].view(-1, 1, 1, 1)
        x_t = a.sqrt() * x0 + (1 - a).sqrt() * noise
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        cond = text_encoder(ids[caption])[0]
        loss = F.mse_loss(unet(x_t, t, encoder_hidden_states=cond).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        update_ema(ema_unet, unet, config.ema_decay)
        update_ema(ema_text, text_encoder, config.ema_decay)
        value = loss.item()
        if not math.isfinite(value):
            raise EraseError(f"train-mini-sd: loss became {value} at step {step}; lower --lr (now {config.lr})")
        loss_avg = value if loss_avg is None else 0.98 * loss_avg + 0.02 * value
        if (step + 1) % 250 == 0:
            logger.info("unet step %d/%d: loss %.4f (%.0f s)", step + 1, config.steps, loss_avg,
                        time.perf_counter() - start)
    pipe.unet, pipe.text_encoder = ema_unet.eval(), ema_text.eval()
    train_time = time.perf_counter() - start

    backbone = StableDiffusionBackbone(pipe)
    report = {"config": config_dict(config), "train_images": len(images), "excluded_digits": excluded, "vae_final_loss": vae_loss,
              "vae_scaling_factor": scale, "final_loss": loss_avg, "vae_time_s": round(vae_time, 1),
              "train_time_s": round(train_time, 1), "train_templates": list(TRAIN_TEMPLATES),
              "heldout_templates": list(HELDOUT_TEMPLATES), "class_words": list(DIGITS_NAMES),
              "versions": package_versions()}
    return check_and_save(backbone, report, config, out, ("tokenizer",), "train-mini-sd")


def draw_captioned_batch(latents: torch.Tensor, labels: torch.Tensor, config, g: torch.Generator,
                         num_labels: int = 10):
    """(x0, caption index, noise) of one training step, all from `g`: random images, one of their digit's
    training captions each (index into `captions(0) + ... + captions(num_labels - 1) + [""]` when
    `labels` run over 0..num_labels-1), the empty caption with probability `caption_dropout`."""
    per_class = len(TRAIN_TEMPLATES)
    idx = torch.randint(len(latents), (config.batch_size,), generator=g)
    x0 = latents[idx]
    caption = labels[idx] * per_class + torch.randint(per_class, (len(idx),), generator=g)
    caption[torch.rand(len(idx), generator=g) < config.caption_dropout] = num_labels * per_class
    return x0, caption, torch.randn(x0.shape, generator=g)


def check_and_save(backbone, report: dict, config, out: str | Path, tokenizer_folders: tuple[str, ...],
                   command: str) -> dict:
    """The accuracy check after training (into `report`), then the pipeline folder at `out` with the
    output marker of `command`."""
    if config.eval_images > 0:
        report["accuracy"] = {
            name: digit_accuracy(backbone, templates, config.eval_images, config.eval_steps, config.eval_guidance)
            for name, templates in (("train_template", ("a handwritten digit {w}",)),
                                    ("heldout_templates", HELDOUT_TEMPLATES))}
        report["accuracy"]["settings"] = {"images_per_digit_and_template": config.eval_images,
                                          "steps": config.eval_steps, "guidance": config.eval_guidance}
        logger.info("digit accuracy: %s", report["accuracy"])
    with atomic_dir(out) as tmp:  # pipeline, tokenizer files and marker appear together
        backbone.save_pretrained(tmp, training=report,
                                 sample_defaults={"steps": config.eval_steps, "guidance": config.eval_guidance})
        # transformers 5 saves only tokenizer.json; older versions' CLIPTokenizer reads vocab.json + merges.txt.
        for name in tokenizer_folders:
            build_tokenizer(caption_words(), folder=tmp / name)
        mark_output(tmp, command)
    logger.info("saved %s (%.0f s of training)", out, report["train_time_s"])
    return report


def digit_accuracy(backbone, templates, n: int, steps: int, guidance: float, seed: int = 1234,
                   classifier_path: str | Path | None = None) -> dict:
    """Fraction of images of each digit that the shipped digits classifier recognises as that digit."""
    from ..classifier import SmallClassifier
    from ..utils import derive_seed

    classifier = SmallClassifier.from_pretrained(classifier_path or default_classifier_path())
    prompts, labels, seeds = [], [], []
    for c in range(10):
        for k, template in enumerate(templates):
            for i in range(n):
                prompts.append(template.format(w=DIGITS_NAMES[c], d=c))
                labels.append(c)
                seeds.append(derive_seed(seed, c, k, i))
    images = backbone.sample(prompts, seeds, steps=steps, guidance=guidance, batch_size=50)
    correct = (classify_digits(images, classifier) == torch.tensor(labels)).float()
    per_digit = [correct[torch.tensor(labels) == c].mean().item() for c in range(10)]
    return {"mean": sum(per_digit) / 10, "per_digit": [round(a, 3) for a in per_digit]}


# -- command line ---------------------------------------------------------------------------------
def add_commands(subparsers) -> None:
    add_training_command(subparsers, "train-mini-sd", MiniSDConfig, run=lambda c, a: train_mini_sd(c, a.out),
                         out_help="pipeline folder to write (loads with StableDiffusionPipeline)")
