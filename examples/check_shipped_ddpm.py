"""How well the shipped digits DDPM draws each digit, judged by two classifiers.

    python examples/check_shipped_ddpm.py [--guidance 1.0] [--n 20]

Samples N images per digit (50 DDIM steps) and prints, per digit, the fraction recognised by the
shipped classifier and by an independent SVC trained on scikit-learn's original 8x8 digits (the
samples are average-pooled to 8x8 for it).
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from sklearn.svm import SVC

from erase.backbones import load_backbone
from erase.classifier import SmallClassifier
from erase.sampling import class_seeds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/digits-ddpm")
    parser.add_argument("--classifier", default="models/digits-classifier")
    parser.add_argument("--guidance", type=float, default=1.0)
    parser.add_argument("--n", type=int, default=20)
    args = parser.parse_args()

    model = load_backbone(args.model)
    labels = [c for c in range(10) for _ in range(args.n)]
    seeds = [s for c in range(10) for s in class_seeds(0, c, args.n)]
    images = model.sample(labels, seeds, steps=50, guidance=args.guidance, batch_size=100)

    with torch.no_grad():
        shipped = SmallClassifier.from_pretrained(args.classifier)(images).argmax(1).numpy()
    digits = load_digits()
    svc = SVC(gamma=0.001).fit(digits.data, digits.target)
    independent = svc.predict(F.avg_pool2d((images + 1) * 8, 2).reshape(len(images), -1).numpy())

    y = np.array(labels)
    for name, pred in [("shipped classifier", shipped), ("independent SVC", independent)]:
        per_digit = [float((pred[y == c] == c).mean()) for c in range(10)]
        print(f"{name:>18}: mean {np.mean(per_digit):.3f}  per digit "
              + " ".join(f"{v:.2f}" for v in per_digit))


if __name__ == "__main__":
    main()
