"""How well the shipped miniature Stable Diffusion draws each digit, with stock diffusers only.

    python examples/check_shipped_mini_sd.py [--model models/mini-sd] [--n 20] [--guidance 3]

Loads the pipeline with `StableDiffusionPipeline.from_pretrained` (nothing from this project), asks
for "a handwritten digit N" and for the held-out paraphrase "a picture of a handwritten N", and
prints the fraction of images that an independent SVC, trained on scikit-learn's original 8x8
digits, recognises as N (images average-pooled to 8x8 grey). The same check works on an erased
pipeline folder written by `erase unlearn`.
"""

import argparse

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from sklearn.datasets import load_digits
from sklearn.svm import SVC

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = ("a handwritten digit {}", "a picture of a handwritten {}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/mini-sd")
    parser.add_argument("--n", type=int, default=20, help="images per digit and prompt")
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=25)
    args = parser.parse_args()

    pipe = StableDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    digits = load_digits()
    svc = SVC(gamma=0.001).fit(digits.data, digits.target)
    for template in TEMPLATES:
        per_digit = []
        for c in range(10):
            images = pipe([template.format(NAMES[c])] * args.n, num_inference_steps=args.steps,
                          guidance_scale=args.guidance, output_type="np",
                          generator=[torch.Generator().manual_seed(1000 * c + i) for i in range(args.n)]).images
            grey = images.mean(axis=-1)  # (n, 16, 16) in [0, 1]
            pooled = grey.reshape(args.n, 8, 2, 8, 2).mean(axis=(2, 4)) * 16  # the 8x8 digits' 0..16 scale
            per_digit.append(float((svc.predict(pooled.reshape(args.n, -1)) == c).mean()))
        print(f"{template.format('N'):>32}: mean {np.mean(per_digit):.3f}  per digit "
              + " ".join(f"{v:.2f}" for v in per_digit))


if __name__ == "__main__":
    main()
