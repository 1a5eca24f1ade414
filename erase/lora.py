"""LoRA training through PEFT (`--lora-rank R`, `--lora-alpha A`), for every method on every backbone.

The chosen parameter group names the layers: every Linear and Conv2d whose weight is in the group
gets a PEFT LoRA adapter (`inject_adapter_in_model`), and the adapter's `lora_A` / `lora_B` are the
trained parameters; everything else, the group's own weights included, stays frozen. To a method
nothing changes: it receives the trainable parameters by name, as with full weights, so
checkpoints, exact resume, EMA and data parallelism work unchanged. At the end the adapter is
merged into the weights (PEFT's `merge`, then the LoRA layers are unwrapped), so the run's outputs
are what a full fine-tuning writes (the pipeline folder, `delta.safetensors` of the merged weights
against the original), plus the adapter itself in `lora/`: for a pipeline, diffusers'
`save_lora_weights` file that `pipe.load_lora_weights(RUN/lora)` loads; for the class-conditional
DDPM (no diffusers LoRA loader), PEFT's `adapter_model.safetensors` + `adapter_config.json`. In a
recipe, each LoRA stage's adapter goes to `stages/N-METHOD/lora/` instead (docs/recipes.md).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from .utils import EraseError, step_generator, write_json

ADAPTER_FOLDER = "lora"
LORA_LAYERS = (torch.nn.Linear, torch.nn.Conv2d)


def target_modules(denoiser: torch.nn.Module, params: dict[str, torch.nn.Parameter], group: str) -> list[str]:
    """The Linear and Conv2d modules whose weight is in the parameter group."""
    modules = dict(denoiser.named_modules())
    targets = sorted({n.removesuffix(".weight") for n in params
                      if n.endswith(".weight") and isinstance(modules.get(n.removesuffix(".weight")), LORA_LAYERS)})
    if not targets:
        raise EraseError(f"parameter group {group!r} has no Linear or Conv2d layer for LoRA to adapt: choose "
                         "another --params, or train the full weights (leave out --lora-rank)")
    return targets


class LoraTraining:
    """A PEFT LoRA adapter on the denoiser's layers of one parameter group, from injection to merge."""

    def __init__(self, model, params: dict[str, torch.nn.Parameter], group: str, rank: int, alpha: float | None,
                 seed: int):
        from peft import LoraConfig, inject_adapter_in_model

        self.model = model
        self.base_names = list(params)  # the group's weights, as they are named again after the merge
        targets = target_modules(model.denoiser, params, group)
        self.layers = len(targets)  # PEFT may rewrite a long target list as the shortest name suffixes
        self.config = LoraConfig(r=rank, lora_alpha=alpha if alpha is not None else rank, target_modules=targets)
        for p in model.denoiser.parameters():
            p.requires_grad_(False)
        inject_adapter_in_model(self.config, model.denoiser)
        self.params = {n: p for n, p in model.denoiser.named_parameters() if ".lora_" in n}
        g = step_generator(seed, -1)  # PEFT's initialisation drawn from the run's seed, not the global RNG
        with torch.no_grad():
            for name, p in self.params.items():
                if ".lora_A." in name:  # PEFT's default: Kaiming-uniform A, zero B (the adapter starts as a no-op)
                    bound = 1 / math.sqrt(p[0].numel())
                    p.copy_(torch.rand(p.shape, generator=g) * 2 * bound - bound)
                else:
                    p.zero_()
        for p in self.params.values():
            p.requires_grad_(True)

    def summary(self) -> dict:
        return {"rank": self.config.r, "alpha": self.config.lora_alpha, "layers": self.layers,
                "trainable_parameters": sum(p.numel() for p in self.params.values())}

    def merge(self) -> tuple[dict[str, torch.Tensor], dict[str, torch.nn.Parameter]]:
        """Merge the adapter into the weights and remove it: (the adapter's PEFT state dict, the group's
        merged weights by their usual names)."""
        from peft import get_peft_model_state_dict
        from peft.tuners.tuners_utils import BaseTunerLayer

        adapter = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(self.model.denoiser).items()}
        modules = dict(self.model.denoiser.named_modules())
        for name, module in modules.items():
            if isinstance(module, BaseTunerLayer):
                module.merge()
                parent, _, child = name.rpartition(".")
                setattr(modules[parent] if parent else self.model.denoiser, child, module.get_base_layer())
        if "peft_config" in vars(self.model.denoiser):  # gone with its layers: a later stage's adapter starts anew
            del self.model.denoiser.peft_config
        weights = dict(self.model.denoiser.named_parameters())
        return adapter, {n: weights[n] for n in self.base_names}

    def save_adapter(self, folder: Path, adapter: dict[str, torch.Tensor]) -> None:
        """The adapter as the stock loaders read it (see the module docstring)."""
        metadata = self.config.to_dict()
        metadata["target_modules"] = sorted(metadata["target_modules"])  # a set, which JSON cannot hold
        folder.mkdir(parents=True, exist_ok=True)
        if "diffusers-lora" in type(self.model).EXPORT_FORMATS:
            kind = self.model.DENOISER
            self.model.pipeline_class().save_lora_weights(str(folder), **{f"{kind}_lora_layers": adapter,
                                                                          f"{kind}_lora_adapter_metadata": metadata})
        else:
            from safetensors.torch import save_file

            save_file(adapter, str(folder / "adapter_model.safetensors"))
            write_json(folder / "adapter_config.json", metadata)
