"""What every closed-form edit shares: the config, the rows it solves on, and applying the solution.

An edit reads, for each text entry of the backbone (`Backbone.text_entries`: layers that read the
same rows, e.g. the cross-attention keys and values on the token rows, or SD3's pooled-text
projection on one row per prompt), the rows of text embeddings those layers see, solves for one
d x d matrix `M` per entry (`erase.edits.algebra`), and rewrites each of the entry's layers as
`W' = W M`. No image is drawn and nothing is trained: the cost is
one text-encoder forward per prompt and one solve. `apply_edit` changes a model in memory and
returns the changed tensors (a stage of a recipe); `erase.edits.run.run_edit` is `erase unlearn
--method NAME` for an edit.

Which rows (`edit_rows`): for each forget prompt, the rows from its last word to the end of the
sequence, aligned at the last word with its concept's anchor prompt (UCE's choice, see
`erase.backbones.base.TextRows`); for each retain prompt, every row it feeds the layers, so that the
prompts kept are kept whole.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import torch

from ..config import field
from ..utils import EraseError
from .algebra import adversarial_rows, output_error


@dataclass
class EditConfig:
    """Fields every edit has."""

    lamb: float = field(0.1, "weight that keeps the edited weights near the original ones (λ of the closed form)")
    harden: int = field(0, "RECE-style hardening rounds: derive in closed form the embedding that still "
                           "regenerates each erased row under the edited weights, erase it too, solve again")
    harden_reg: float = field(0.1, "hardening: regularizer of the adversarial embedding, relative to the edited "
                                   "layers' mean eigenvalue (λ of RECE's closed form)")

    def __post_init__(self):
        if not self.lamb > 0:
            raise ValueError(f"lamb must be positive, got {self.lamb}")
        if self.harden < 0:
            raise ValueError(f"harden must be 0 (off) or more rounds, got {self.harden}")
        if not self.harden_reg > 0:
            raise ValueError(f"harden_reg must be positive, got {self.harden_reg}")


@dataclass
class EditRows:
    """The rows an edit solves on (float64, one row per token): `erase[i]` must act like `anchor[i]`."""

    erase: torch.Tensor
    anchor: torch.Tensor
    preserve: torch.Tensor


def _aligned(forget, anchor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per forget prompt: its rows from its last word on, and its anchor's rows aligned at the last word."""
    erase, target = [], []
    length = forget.embeddings.shape[1]
    for i in range(len(forget.embeddings)):
        f, a = int(forget.last_token[i]), int(anchor.last_token[i])
        far = max(f, a)
        erase.append(forget.embeddings[i, f:length - (far - f)])
        target.append(anchor.embeddings[i, a:length - (far - a)])
    return erase, target


def edit_rows(inputs, pairs: list[tuple[str, str]], retain: list[str], extra_preserve: list[str] = ()) -> EditRows:
    """The rows of (forget prompt, anchor prompt) `pairs` and of the `retain` (+ `extra_preserve`) prompts,
    as `inputs` (a `TextEntry`'s, e.g. `model.text_entry_inputs`) gives them."""
    forget_inputs = inputs([f for f, _ in pairs])
    anchor_inputs = inputs([a for _, a in pairs])
    erase, target = [], []
    for forget, anchor in zip(forget_inputs, anchor_inputs):
        e, t = _aligned(forget, anchor)
        erase += e
        target += t
    preserve = [seg.embeddings.reshape(-1, seg.embeddings.shape[-1])
                for seg in inputs(list(retain) + list(extra_preserve))]
    return EditRows(torch.cat(erase).double(), torch.cat(target).double(), torch.cat(preserve).double())


class Edit:
    """Base class of the closed-form edits. Subclasses set `name` and `Config` and write `transform`."""

    name: str = ""
    Config: type = EditConfig
    #: prompts every edit of this kind also preserves (the null text of classifier-free guidance)
    preserve_null_text: bool = False
    # What `erase methods` prints beside the fine-tuning methods.
    forget_share: float = 0.0

    def __init__(self, config: EditConfig):
        self.config = config

    @classmethod
    def paper(cls) -> str:
        return (sys.modules[cls.__module__].__doc__ or "").strip().splitlines()[0]

    @classmethod
    def params_description(cls) -> str:
        return ("the layers where text enters (cross-attention to_k/to_v; SD3: context_embedder and the pooled-text "
                "projection), closed form")

    def transform(self, rows: EditRows) -> torch.Tensor:
        """M (d x d, float64) with `W' = W M` for every text-entry layer."""
        raise NotImplementedError

    def solve(self, rows: EditRows, weight_gram: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
        """M after the hardening rounds, and each round's residuals (the first is the plain edit)."""
        transform = self.transform(rows)
        history = [self._residuals(rows, rows, transform, weight_gram)]
        current = rows
        for _ in range(self.config.harden):
            found = adversarial_rows(rows.erase, transform, weight_gram, self.config.harden_reg)
            current = EditRows(torch.cat([current.erase, found]), torch.cat([current.anchor, rows.anchor]),
                               rows.preserve)
            history[-1]["adversarial_error"] = output_error(found, rows.erase, transform, weight_gram)
            transform = self.transform(current)
            history.append(self._residuals(rows, current, transform, weight_gram))
        if self.config.harden:  # how well the adversary of the final weights still regenerates the concept
            found = adversarial_rows(rows.erase, transform, weight_gram, self.config.harden_reg)
            history[-1]["adversarial_error"] = output_error(found, rows.erase, transform, weight_gram)
        return transform, history

    @staticmethod
    def _residuals(rows: EditRows, current: EditRows, transform, weight_gram) -> dict:
        eye = torch.eye(transform.shape[0], dtype=transform.dtype)
        return {"erase_rows": len(current.erase),
                "erase_error": output_error(rows.erase, rows.anchor, transform, weight_gram),
                "preserve_change": output_error(rows.preserve, rows.preserve, transform, weight_gram),
                "weight_change": float(torch.linalg.matrix_norm(transform - eye) / torch.linalg.matrix_norm(eye))}


def apply_edit(model, edit: Edit, pairs: list[tuple[str, str]], retain: list[str]) -> tuple[dict, dict]:
    """Edit `model` in place so that each forget prompt of `pairs` acts like its anchor prompt while the
    `retain` prompts act as before: one solve per text entry of the backbone (`Backbone.text_entries`).
    Returns the changed tensors (by denoiser state-dict name) and a summary (per entry: its layers,
    rows and residuals per round; seconds)."""
    started = time.perf_counter()
    entries = model.text_entries()  # refuses a backbone without such layers, before any work
    if not pairs:
        raise EraseError("nothing to erase: no forget prompts")
    extra = [""] if edit.preserve_null_text else []
    rows = {name: edit_rows(entry.inputs, pairs, retain, list(dict.fromkeys(extra + list(entry.always_preserved))))
            for name, entry in entries.items()}
    encoded = time.perf_counter()
    changed, details = {}, {}
    for name, entry in entries.items():
        tensors, history = _edit_entry(edit, entry.layers, rows[name])
        changed |= tensors
        details[name] = {"layers": len(entry.layers), "row_dim": rows[name].erase.shape[1],
                         "forget_rows": len(rows[name].erase), "preserve_rows": len(rows[name].preserve),
                         "rounds": history}
    done = time.perf_counter()
    summary = {"entries": details, "layers": sum(d["layers"] for d in details.values()),
               "encode_s": round(encoded - started, 3), "solve_s": round(done - encoded, 3)}
    return changed, summary


def _edit_entry(edit: Edit, layers: dict, rows: EditRows) -> tuple[dict, list[dict]]:
    """Solve on `rows` and rewrite every layer of one text entry as `W' = W M`: the changed tensors and
    the residuals of each round."""
    weights = {name: layer.weight.detach().double().cpu() for name, layer in layers.items()}
    dims = {w.shape[1] for w in weights.values()}
    if dims != {rows.erase.shape[1]}:
        raise EraseError(f"the text-entry layers read {sorted(dims)}-dim rows but the prompts give "
                         f"{rows.erase.shape[1]}-dim ones: the backbone's contract is broken")
    weight_gram = sum(w.T @ w for w in weights.values())
    transform, history = edit.solve(rows, weight_gram)
    changed = {}
    with torch.no_grad():
        for name, layer in layers.items():
            new = (weights[name] @ transform).to(layer.weight.dtype)
            layer.weight.copy_(new.to(layer.weight.device))
            changed[f"{name}.weight"] = layer.weight.detach().cpu().contiguous()
    if not all(torch.isfinite(t).all() for t in changed.values()):
        raise EraseError(f"{edit.name}: the edited weights are not finite; raise --lamb (now {edit.config.lamb})")
    return changed, history
