"""`erase export`: a finished `erase unlearn` run in the formats people deploy.

- `diffusers-lora`: a folder that stock `pipe.load_lora_weights(folder)` loads onto the run's input
  model. The change of every Linear and Conv2d weight (the run's weight minus its input model's) is
  factored by SVD into PEFT's LoRA layers (`lora_B @ lora_A`, alpha = rank, so scale 1 reproduces
  it): exactly where the change has rank <= `rank` (the default, no `rank`, keeps every layer's
  numerical rank: exact everywhere), by its best rank-`rank` approximation otherwise (truncated SVD,
  Eckart-Young). The names and the file come from PEFT (`get_peft_model_state_dict` of the input
  model with the adapter injected) and diffusers (`save_lora_weights`), not from a key map of ours.
- `webui-lora`: the same adapter as one `.safetensors` file in the kohya layout that AUTOMATIC1111,
  ComfyUI and kohya's scripts read, renamed by diffusers' `convert_state_dict_to_kohya`. diffusers
  converts only from kohya, so the file is verified by reading it back through diffusers' own
  kohya converter (`lora_state_dict`) to the same tensors before it is written.
- `single-file`: the run's merged weights as one `.safetensors` in the original SD 1.x layout,
  which `StableDiffusionPipeline.from_single_file(file, config=RUN)` loads (verified by diffusers'
  single-file converters before writing, `erase.backbones.ldm_layout`).
- `pipeline`: the run's input model with the exported LoRA fused at `scale` through the stock loader
  (`load_lora_weights`, `fuse_lora(lora_scale=...)`): a model folder that `erase eval` measures, which
  is how a LoRA's scale is seen to dial the erasure (scale 0 is the input model).

What a LoRA cannot carry: a stock loader applies LoRA layers to Linear and Conv2d weights only, so
changed biases, normalisation weights and embeddings are left out of the LoRA formats (the run
folder and the single file keep them). The report beside every export (`export_report.json`, or
`FILE.report.json` beside a file) lists them with the size of their change, and gives each LoRA
layer's relative approximation error ‖ΔW − BA‖_F / ‖ΔW‖_F, worst and mean.
"""

from __future__ import annotations

import math
import os
import statistics
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .outputs import MARKER, UNLEARN_DELTA, check_finished, check_output, mark_output, output_kind
from .utils import EraseError, _umask, atomic_dir, logger, read_json, write_json

FORMATS = ("diffusers-lora", "webui-lora", "single-file", "pipeline")
FILE_FORMATS = ("webui-lora", "single-file")
REPORT_FILE = "export_report.json"
INFO_FILE = "erase_info.json"


@dataclass
class LoraLayer:
    """One Linear or Conv2d weight's change, factored: `lora_B @ lora_A` (convolutions flattened)."""

    name: str  # the module's name in the denoiser
    rank: int
    full_rank: int  # min(out, in·kh·kw): the largest rank the layer's change can have
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    error: float  # relative Frobenius error of the factored change


@dataclass
class LoraExport:
    layers: list[LoraLayer]
    left_out: dict[str, float] = field(default_factory=dict)  # tensor -> ‖ΔW‖_F / ‖W‖_F, not in the LoRA
    rank: int | None = None

    def summary(self) -> dict:
        errors = [layer.error for layer in self.layers]
        worst = max(self.layers, key=lambda layer: layer.error, default=None)
        return {"rank": self.rank if self.rank is not None else "exact (each layer's numerical rank)",
                "lora_layers": len(self.layers),
                "ranks": {layer.name: layer.rank for layer in self.layers},
                "relative_error": {"worst": max(errors, default=0.0), "mean": statistics.fmean(errors) if errors else 0.0,
                                   "worst_layer": worst.name if worst else None,
                                   "per_layer": {layer.name: layer.error for layer in self.layers}},
                "left_out": {"tensors": len(self.left_out), "relative_change": self.left_out,
                             "why": "stock LoRA loaders apply LoRA to Linear and Conv2d weights only (no biases, "
                                    "norms or embeddings); the run folder and the single file keep them"}}


# -- the run --------------------------------------------------------------------------------------------
def check_run(run: str | Path) -> dict:
    """The recorded info of a finished `erase unlearn` output, or one line saying what is wrong."""
    run = Path(run)
    check_finished(run)  # a run that has not reached its end: say how to finish it
    if not run.is_dir():
        raise EraseError(f"{run} is not a folder: give the --out folder of a finished `erase unlearn` run")
    if output_kind(run) != "unlearn" or not (run / INFO_FILE).is_file():
        raise EraseError(f"{run} is not an `erase unlearn` output (no {MARKER} naming unlearn): export takes the "
                         "--out folder of a finished `erase unlearn` run")
    recorded = read_json(run / INFO_FILE, what="model info")
    check_finished(run, recorded.get("info", {}))
    if "unlearning" not in recorded.get("info", {}):
        raise EraseError(f"{run} records no unlearning run in {INFO_FILE}: export takes the --out folder of a "
                         "finished `erase unlearn` run")
    return recorded


def check_format(fmt: str, backbone_name: str, out: str | Path) -> None:
    """Refuse a format the backbone's converters do not cover, or a file name that does not fit it."""
    from .backbones import get_backbone

    if fmt not in FORMATS:
        raise EraseError(f"unknown export format {fmt!r}: choose one of {', '.join(FORMATS)}")
    covered = get_backbone(backbone_name).EXPORT_FORMATS
    needs = "diffusers-lora" if fmt == "pipeline" else fmt
    if needs not in covered:
        raise EraseError(f"--format {fmt} is not available for a {backbone_name} model: diffusers' converters cover "
                         f"{', '.join(covered) or 'no export format'} for it"
                         + ("" if covered else " (the run folder itself is the model to deploy)"))
    if fmt in FILE_FORMATS and Path(out).suffix != ".safetensors":
        raise EraseError(f"--format {fmt} writes one file: give --out a name ending in .safetensors, e.g. "
                         f"--out {Path(out).with_suffix('.safetensors').name}")
    if fmt in FILE_FORMATS and Path(out).is_dir():
        raise EraseError(f"--out {out} is a folder: --format {fmt} writes one .safetensors file")


def base_model_path(run: Path, info: dict, base: str | Path | None) -> str:
    """The model the run started from: `base`, else the one recorded in the run."""
    recorded = info["unlearning"].get("base_model")
    chosen = base if base is not None else recorded
    if chosen is None or not Path(chosen).expanduser().exists():
        raise EraseError(f"the model {run} was erased from ({recorded}) is not found here: pass --base PATH, "
                         "the model the run started from")
    return str(chosen)


def run_change(run: Path, base_path: str):
    """(the input model, the run's changed tensors, their original values), with the run checked against
    its input model: every tensor outside the delta must be unchanged, else the base is not the run's."""
    from safetensors.torch import load_file

    from .backbones import load_backbone

    changed = load_file(str(run / UNLEARN_DELTA))
    base, erased = load_backbone(base_path), load_backbone(run)
    if type(base) is not type(erased):
        raise EraseError(f"--base {base_path} is a {base.name} model but {run} is a {erased.name} one: pass the "
                         "model the run started from")
    original = base.denoiser.state_dict()
    for name, value in erased.denoiser.state_dict().items():
        ours = changed.get(name, original.get(name))
        if ours is None or ours.shape != value.shape or not torch.equal(ours, value.cpu()):
            raise EraseError(f"{run} does not match its input model {base_path} plus its {UNLEARN_DELTA} (first "
                             f"difference: {name}): pass the model the run started from as --base")
    return base, changed, {n: original[n] for n in changed}


# -- factoring the change -------------------------------------------------------------------------------
def numerical_rank(singular: torch.Tensor, shape: tuple[int, int]) -> int:
    """numpy's matrix_rank tolerance, for float32 weights: σ > σ_max · max(m, n) · eps."""
    if singular.numel() == 0 or singular[0] == 0:
        return 0
    tol = singular[0] * max(shape) * torch.finfo(torch.float32).eps
    return int((singular > tol).sum())


def factor_change(name: str, delta: torch.Tensor, rank: int | None) -> LoraLayer | None:
    """The change of one weight as LoRA factors (None where it is numerically zero)."""
    matrix = delta.double().reshape(delta.shape[0], -1)
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    keep = numerical_rank(s, tuple(matrix.shape))
    if rank is not None:
        keep = min(keep, rank)
    if keep == 0:
        return None
    root = s[:keep].sqrt()
    lora_B = (u[:, :keep] * root).float()
    lora_A = (root[:, None] * vh[:keep]).float()
    approx = lora_B.double() @ lora_A.double()
    error = float(torch.linalg.norm(matrix - approx) / torch.linalg.norm(matrix))
    if delta.dim() == 4:  # Conv2d: lora_A is a kh x kw convolution to `keep` channels, lora_B a 1x1 one
        lora_A = lora_A.reshape(keep, *delta.shape[1:])
        lora_B = lora_B.reshape(delta.shape[0], keep, 1, 1)
    return LoraLayer(name, keep, min(matrix.shape), lora_A.contiguous(), lora_B.contiguous(), error)


def changed_weight_shapes(delta_file: Path) -> list[tuple[int, ...]]:
    """Shapes of the matrix and convolution weights in a delta file, read from its header."""
    from safetensors import safe_open

    with safe_open(str(delta_file), framework="pt") as f:
        shapes = [tuple(f.get_slice(k).get_shape()) for k in f.keys() if k.endswith(".weight")]
    return [s for s in shapes if len(s) in (2, 4)]


def check_rank(rank: int, shapes: list[tuple[int, ...]]) -> None:
    """A rank must be at least 1 and no larger than the widest changed layer allows (layers narrower than
    it are exported at their full rank, exactly)."""
    widest = max((min(s[0], math.prod(s[1:])) for s in shapes), default=0)
    if rank < 1:
        raise EraseError(f"--rank must be at least 1, got {rank}")
    if shapes and rank > widest:
        raise EraseError(f"--rank {rank} is larger than any changed layer: the widest allows at most {widest}; "
                         f"choose --rank between 1 and {widest}, or leave it out for an exact LoRA")


def factor_run(denoiser: torch.nn.Module, changed: dict, original: dict, rank: int | None) -> LoraExport:
    """Every changed Linear/Conv2d weight factored; every other changed tensor listed as left out."""
    modules = dict(denoiser.named_modules())
    loraable = {n.rsplit(".", 1)[0] for n in changed
                if n.endswith(".weight") and isinstance(modules.get(n.rsplit(".", 1)[0]), (torch.nn.Linear, torch.nn.Conv2d))}
    if rank is not None:
        check_rank(rank, [tuple(changed[m + ".weight"].shape) for m in loraable])
    layers, left_out = [], {}
    for name in sorted(changed):
        delta = changed[name].double() - original[name].double()
        module = name.rsplit(".", 1)[0]
        if name.endswith(".weight") and module in loraable:
            layer = factor_change(module, delta, rank)
            if layer is not None:
                layers.append(layer)
        elif delta.abs().max() > 0:
            left_out[name] = float(delta.norm() / original[name].double().norm().clamp_min(1e-30))
    if not layers:
        raise EraseError("the run changed no Linear or Conv2d weight, so a LoRA has nothing to carry: export "
                         "--format single-file, or deploy the run folder")
    return LoraExport(layers, left_out, rank)


def peft_state_dict(denoiser: torch.nn.Module, export: LoraExport) -> tuple[dict[str, torch.Tensor], dict]:
    """PEFT's own state dict and config of the factored change: the adapter injected into `denoiser`
    (a copy of the input model's) with the factors as its weights."""
    import copy

    from peft import LoraConfig, get_peft_model_state_dict

    denoiser = copy.deepcopy(denoiser)
    top = max(layer.rank for layer in export.layers)
    ranks = {layer.name: layer.rank for layer in export.layers if layer.rank != top}
    config = LoraConfig(r=top, lora_alpha=top, target_modules=[layer.name for layer in export.layers],
                        rank_pattern=ranks, alpha_pattern=ranks)  # alpha = rank: every layer at scale 1
    denoiser.add_adapter(config)
    modules = dict(denoiser.named_modules())
    with torch.no_grad():
        for layer in export.layers:
            module = modules[layer.name]
            module.lora_A["default"].weight.copy_(layer.lora_A)
            module.lora_B["default"].weight.copy_(layer.lora_B)
    state = {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(denoiser).items()}
    metadata = config.to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])  # a set, which JSON cannot hold
    return state, metadata


# -- writing --------------------------------------------------------------------------------------------
def _save_diffusers_lora(base, folder: Path, state: dict, metadata: dict) -> None:
    kind = base.DENOISER
    base.pipeline_class().save_lora_weights(str(folder), **{f"{kind}_lora_layers": state,
                                                            f"{kind}_lora_adapter_metadata": metadata})


def _to_kohya(base, state: dict) -> dict[str, torch.Tensor]:
    from diffusers.utils import convert_state_dict_to_kohya

    return {k: v.contiguous() for k, v in convert_state_dict_to_kohya(
        {f"{base.DENOISER}.{k}": v for k, v in state.items()}).items()}


def _read_back_kohya(base, kohya: dict, lora: LoraExport) -> tuple[list[str], list[str]]:
    """Load `kohya` through diffusers' kohya converter (the stock `load_lora_weights`) onto the input
    model: (layers it did not load, layers it loaded to other factors than ours or not at scale 1)."""
    pipe = base.pipeline()
    pipe.load_lora_weights(dict(kohya), adapter_name="check")
    modules = dict(base.denoiser.named_modules())
    missing, differ = [], []
    for layer in lora.layers:
        module = modules[layer.name]
        if "check" not in getattr(module, "lora_A", {}):
            missing.append(layer.name)
        elif not (torch.equal(module.lora_A["check"].weight, layer.lora_A) and
                  torch.equal(module.lora_B["check"].weight, layer.lora_B) and module.scaling["check"] == 1.0):
            differ.append(layer.name)
    pipe.unload_lora_weights()
    return missing, differ


def pad_to_one_rank(lora: LoraExport) -> None:
    """Give every layer the largest rank, with zero rows of `lora_A` and zero columns of `lora_B` (the
    product is unchanged). The kohya layout stores an alpha per layer, and diffusers (0.42) reads
    differing alphas back under names that miss its attention layers, which then load at another
    scale; with one rank every alpha is the same and none is looked up by name."""
    top = max(layer.rank for layer in lora.layers)
    for layer in lora.layers:
        extra = top - layer.rank
        if extra:
            layer.lora_A = torch.cat([layer.lora_A, layer.lora_A.new_zeros(extra, *layer.lora_A.shape[1:])])
            layer.lora_B = torch.cat([layer.lora_B, layer.lora_B.new_zeros(layer.lora_B.shape[0], extra,
                                                                           *layer.lora_B.shape[2:])], dim=1)
            layer.rank = top


def webui_lora(base, lora: LoraExport, changed: dict, original: dict) -> dict[str, torch.Tensor]:
    """The LoRA in the kohya layout, renamed by diffusers and verified by loading it back through
    diffusers' kohya converter. Layers the kohya layout has no name for that diffusers reads back
    (e.g. SDXL's `add_embedding`) move to the left-out list; any other difference is refused."""
    pad_to_one_rank(lora)
    kohya = _to_kohya(base, peft_state_dict(base.denoiser, lora)[0])
    missing, differ = _read_back_kohya(base, kohya, lora)
    if missing and not differ:
        for name in missing:
            weight = f"{name}.weight"
            lora.left_out[weight] = float((changed[weight].double() - original[weight].double()).norm()
                                          / original[weight].double().norm().clamp_min(1e-30))
        lora.layers = [layer for layer in lora.layers if layer.name not in missing]
        kohya = _to_kohya(base, peft_state_dict(base.denoiser, lora)[0])
        missing, differ = _read_back_kohya(base, kohya, lora)
    if missing or differ:
        raise EraseError(f"diffusers does not read the kohya layout back to the same LoRA ({len(missing + differ)} "
                         f"layers differ, first {(missing + differ)[0]}): export --format diffusers-lora instead")
    return kohya


def _write_file(path: Path, tensors: dict, metadata: dict[str, str]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files
        os.replace(tmp, path)  # a reader never sees half a file
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _fused_pipeline(base, lora_folder: Path, scale: float):
    """The input model with the LoRA fused at `scale` through the stock loader."""
    pipe = base.pipeline()
    pipe.load_lora_weights(str(lora_folder))
    pipe.fuse_lora(lora_scale=scale)
    pipe.unload_lora_weights()
    return pipe


def export(run: str | Path, fmt: str, out: str | Path, rank: int | None = None, base: str | Path | None = None,
           scale: float = 1.0, overwrite: bool = False) -> dict:
    """Export the finished `erase unlearn` output `run` as `fmt` to `out`; returns the report."""
    run, out = Path(run), Path(out)
    recorded = check_run(run)
    check_format(fmt, recorded.get("backbone", ""), out)
    if rank is not None and fmt == "single-file":
        raise EraseError("--rank applies to the LoRA formats: a single file holds the merged weights, exactly")
    if fmt != "pipeline" and scale != 1.0:
        raise EraseError("--scale applies to --format pipeline (a LoRA's scale is set where it is loaded)")
    base_path = None if fmt == "single-file" else base_model_path(run, recorded["info"], base)
    if rank is not None:  # from the delta's header, before any model is loaded
        check_rank(rank, changed_weight_shapes(run / UNLEARN_DELTA))
    check_output(out, "export", overwrite, inputs=[run, base_path])
    report = {"run": str(run), "format": fmt, "base_model": base_path}
    if fmt == "single-file":
        _export_single_file(run, out, report)
        return report
    model, changed, original = run_change(run, base_path)
    lora = factor_run(model.denoiser, changed, original, rank)
    report |= lora.summary()
    if fmt == "webui-lora":
        kohya = webui_lora(model, lora, changed, original)
        report |= lora.summary()
        write_json(out.with_name(out.name.removesuffix(".safetensors") + ".report.json"), report)
        _write_file(out, kohya, {"ss_network_module": "networks.lora", "erase_run": str(run)})
        return report
    state, metadata = peft_state_dict(model.denoiser, lora)
    with atomic_dir(out) as tmp:
        if fmt == "diffusers-lora":
            _save_diffusers_lora(model, tmp, state, metadata)
        else:
            with tempfile.TemporaryDirectory(dir=tmp) as lora_folder:
                _save_diffusers_lora(model, Path(lora_folder), state, metadata)
                fused = type(model)(_fused_pipeline(model, Path(lora_folder), scale))
            report["scale"] = scale
            fused.info = {**model.info, "export": {"run": str(run), "rank": report["rank"], "scale": scale}}
            fused.save_pretrained(tmp / "model")
            for item in (tmp / "model").iterdir():
                item.rename(tmp / item.name)
            (tmp / "model").rmdir()
        write_json(tmp / REPORT_FILE, report)
        mark_output(tmp, "export")
    return report


def _export_single_file(run: Path, out: Path, report: dict) -> None:
    from .backbones import load_backbone

    model = load_backbone(run)
    state = model.single_file_state_dict()
    write_json(out.with_name(out.name.removesuffix(".safetensors") + ".report.json"),
               {**report, "tensors": len(state), "load_with": f"from_single_file(file, config={run})"})
    _write_file(out, state, {"format": "LDM single file", "erase_run": str(run)})


def describe(report: dict) -> str:
    """What the command prints: where the export went and how close it is."""
    if "relative_error" not in report:
        return f"wrote {report['format']} of {report['run']}"
    err = report["relative_error"]
    rank = report["rank"] if isinstance(report["rank"], int) else "exact"
    lines = [f"{report['format']}: {report['lora_layers']} LoRA layers (rank {rank}), relative error "
             f"||dW - BA||/||dW||: worst {err['worst']:.3g} ({err['worst_layer']}), mean {err['mean']:.3g}"]
    left = report["left_out"]["tensors"]
    if left:
        sizes = report["left_out"]["relative_change"].values()
        lines.append(f"left out of the LoRA: {left} changed biases/norms/embeddings (largest relative change "
                     f"{max(sizes):.3g}); the single file and the run folder keep them")
    return "\n".join(lines)


def add_commands(subparsers) -> None:
    p = subparsers.add_parser("export")
    p.add_argument("run", help="the --out folder of a finished `erase unlearn` run")
    p.add_argument("--format", required=True, choices=FORMATS, dest="fmt",
                   help="diffusers-lora (folder for load_lora_weights), webui-lora (kohya .safetensors), "
                        "single-file (SD 1.x .safetensors for from_single_file), pipeline (a model folder: the "
                        "input model with the LoRA fused at --scale)")
    p.add_argument("--out", required=True, help="folder (diffusers-lora, pipeline) or .safetensors file to write")
    p.add_argument("--rank", type=int, help="LoRA rank: layers whose change has a higher rank are approximated by "
                                            "truncated SVD (default: exact, each layer at its own rank)")
    p.add_argument("--base", help="the model the run started from (default: the one recorded in the run)")
    p.add_argument("--scale", type=float, default=1.0, help="--format pipeline: the LoRA scale to fuse at "
                                                            "(0 is the input model, 1 the exported LoRA)")
    p.set_defaults(func=cmd_export)


def cmd_export(args) -> None:
    report = export(args.run, args.fmt, args.out, rank=args.rank, base=args.base, scale=args.scale,
                    overwrite=args.overwrite)
    print(describe(report))
    print(f"wrote {args.out}")
    logger.debug("export report: %s", report)
