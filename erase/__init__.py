"""erase: concept erasure (machine unlearning) for diffusion models."""

__version__ = "0.1.0"
