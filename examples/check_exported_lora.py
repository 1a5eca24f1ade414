"""Do the exports of an erased miniature SD draw what the erased model draws? Stock diffusers only.

    python examples/check_exported_lora.py --run runs/mini-eupmu --base models/mini-sd \
        --lora runs/mini-eupmu-lora [--webui runs/mini-eupmu.safetensors] \
        [--single-file runs/mini-eupmu-single.safetensors] [--n 4]

Draws every digit with the 8 training caption templates of `erase eval --protocol digits-prompts`
(`--n` seeds each, 25 DDIM steps, guidance 3) from: the erased pipeline folder; a fresh stock
pipeline of `--base` with `load_lora_weights(--lora)` (and `--webui`); and
`from_single_file(--single-file, config=--run)`. The shipped digits classifier reads every image;
printed: the share of images each export draws as another digit than the erased model does (the
mismatch rate) and the largest pixel difference.
"""

import argparse

import torch
from diffusers import StableDiffusionPipeline

from erase.classifier import SmallClassifier
from erase.digits import TRAIN_TEMPLATES, classify_digits, default_classifier_path
from erase.data import DIGITS_NAMES


def draw(pipe, prompts, seeds, batch: int = 40) -> torch.Tensor:
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(prompts), batch):
        generators = [torch.Generator().manual_seed(s) for s in seeds[i:i + batch]]
        images = pipe(prompts[i:i + batch], generator=generators, num_inference_steps=25, guidance_scale=3.0,
                      output_type="pt").images
        out.append(images * 2 - 1)
    return torch.cat(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the erased model (an `erase unlearn` folder)")
    parser.add_argument("--base", required=True, help="the model it was erased from")
    parser.add_argument("--lora", help="`erase export --format diffusers-lora` folder")
    parser.add_argument("--webui", help="`erase export --format webui-lora` file")
    parser.add_argument("--single-file", help="`erase export --format single-file` file")
    parser.add_argument("--scale", type=float, default=1.0, help="LoRA scale (cross_attention_kwargs)")
    parser.add_argument("--n", type=int, default=4, help="seeds per digit and template")
    args = parser.parse_args()

    plan = [(c, t, s) for c in range(10) for t in TRAIN_TEMPLATES for s in range(args.n)]
    prompts = [t.format(w=DIGITS_NAMES[c], d=c) for c, t, _ in plan]
    seeds = [1000 * c + s for c, _, s in plan]
    classifier = SmallClassifier.from_pretrained(default_classifier_path())
    erased = draw(StableDiffusionPipeline.from_pretrained(args.run, safety_checker=None), prompts, seeds)
    reference = classify_digits(erased, classifier)
    threes = [i for i, (c, _, _) in enumerate(plan) if c == 3]
    print(f"erased model: {len(plan)} images, 'three' prompts drawn as 3: "
          f"{float((reference[threes] == 3).float().mean()):.1%}")

    exports = []
    for name, source in (("diffusers LoRA", args.lora), ("WebUI LoRA", args.webui)):
        if source:
            pipe = StableDiffusionPipeline.from_pretrained(args.base, safety_checker=None)
            pipe.load_lora_weights(source)
            pipe.set_adapters(pipe.get_active_adapters(), adapter_weights=[args.scale])
            exports.append((f"{name} (scale {args.scale})", pipe))
    if args.single_file:
        exports.append(("single file", StableDiffusionPipeline.from_single_file(
            args.single_file, config=args.run, local_files_only=True, safety_checker=None)))
    for name, pipe in exports:
        images = draw(pipe, prompts, seeds)
        labels = classify_digits(images, classifier)
        mismatch = (labels != reference).float().mean()
        print(f"{name}: mismatch {float(mismatch):.2%} ({int((labels != reference).sum())}/{len(plan)}), "
              f"'three' drawn as 3: {float((labels[threes] == 3).float().mean()):.1%}, "
              f"largest pixel difference {float((images - erased).abs().max()):.3g}")


if __name__ == "__main__":
    main()
