"""`cifar10-class`: CIFAR-10 class erasure as SalUn and Selective Amnesia report it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from erase.config import field

from .class_erasure import ClassErasure


@dataclass
class Cifar10Class(ClassErasure):
    """CIFAR-10 class erasure as SalUn / SA report it: 500 forgotten-class samples, Inception FID."""

    name: ClassVar[str] = "cifar10-class"
    n: int = field(5000, "samples per retained class (the papers: 5,000)")
    n_forget: int | None = field(500, "samples of the forgotten class for UA (the papers: 500)")
    steps: int = field(1000, "DDIM steps (the papers: 1,000; state fewer when you use fewer)")
    eta: float = field(1.0, "DDIM eta (the papers: 1.0)")
    guidance: float | None = field(3.0, "guidance scale s; the papers write (1 + w)ε_c − wε_∅ with w = 2, i.e. s = 3")
    fid_features: str = field("inception", "FID feature space: 'inception' or 'classifier'",
                              choices=("classifier", "inception"))
    dataset: str = field("cifar10", "reference training images for FID")
    fid_bootstrap: int = field(50, "bootstrap resamples over generated images for FID's 95% interval (0: none; "
                                   "each costs a 2048-d matrix square root)")
