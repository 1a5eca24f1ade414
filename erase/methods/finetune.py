"""FT: fine-tune on the retained data only (the baseline of Fan et al., SalUn, arXiv 2310.12508).

It forgets only through catastrophic forgetting, so it mostly measures how far plain training on
the rest of the data moves the model.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import field
from .base import Method, MethodConfig
from .losses import denoise


@dataclass
class FinetuneConfig(MethodConfig):
    lr: float = field(1e-4, "Adam learning rate")


class Finetune(Method):
    name = "finetune"
    Config = FinetuneConfig
    forget_share = 0.0

    def loss(self, batch):
        loss = denoise(self.model, batch.retain)
        return loss, {"retain": loss.detach()}
