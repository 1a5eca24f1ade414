"""Digits class erasure: every method forgets one digit of the shipped DDPM; regenerates BENCHMARKS.md's table.

    python examples/bench_digits_erasure.py --out runs/bench-digits

For each method (shipped defaults) and the original model: UA = share of 500 generated images of the
forgotten digit that the digits classifier does not call that digit; mean classifier accuracy on the
retained digits; feature FID of the generated retained digits against the real ones in the
classifier's feature space (`erase.eval.metrics.FeatureFID`); training wall time; and seconds per step
as a ratio to `finetune`, timed side by side in one interleaved pass (`--cost-rounds`), so every
method meets the same machine load. Finished runs are reused (delete OUT/<run> to redo one).
Sweeps: `--set mox.alpha=1,2,4 --set mox.steps=100,200` runs the grid as extra rows.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import statistics
import time
from pathlib import Path

import torch

from erase.backbones import load_backbone
from erase.classifier import SmallClassifier
from erase.data import load_dataset
from erase.methods import METHODS
from erase.sampling import class_seeds
from erase.unlearn import unlearn
from erase.utils import setup_logging, write_json
from erase.eval.metrics import ClassifierVerdicts, FeatureFID

log = logging.getLogger("bench")


def parse_value(text: str):
    for cast in (int, float):
        try:
            return cast(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def runs_to_do(methods: list[str], sets: list[str]) -> list[tuple[str, str, dict]]:
    """(run name, method, options): each method with its defaults, plus the --set grids."""
    runs = [(m, None if m == "original" else m, {}) for m in methods]
    grids: dict[str, dict[str, list]] = {}
    for item in sets:
        key, _, values = item.partition("=")
        method, _, option = key.partition(".")
        if method not in METHODS or not option or not values:
            raise SystemExit(f"--set expects METHOD.OPTION=V1,V2,..., got {item!r}")
        grids.setdefault(method, {})[option] = [parse_value(v) for v in values.split(",")]
    for method, grid in grids.items():
        for combo in itertools.product(*grid.values()):
            options = dict(zip(grid, combo))
            runs.append((f"{method}[{','.join(f'{k}={v}' for k, v in options.items())}]", method, options))
    return runs


@torch.no_grad()
def evaluate(model, classifier, real_retained: torch.Tensor, forget: int, args) -> dict:
    retained = [c for c in range(model.num_classes) if c != forget]
    labels, seeds = [], []
    for c, n in [(forget, args.n_forget)] + [(c, args.n_retain) for c in retained]:
        labels += [c] * n
        seeds += class_seeds(args.seed, c, n)
    guidance = model.sample_defaults["guidance"] if args.guidance is None else args.guidance
    images = model.sample(labels, seeds, steps=args.sample_steps, guidance=guidance, batch_size=125)
    labels = torch.tensor(labels)
    verdicts = ClassifierVerdicts(model.num_classes)
    verdicts.update(torch.cat([classifier(x) for x in images.split(500)]), labels)
    acc = verdicts.compute()["accuracy"]
    fid = FeatureFID(classifier)
    fid.update(real_retained, real=True)
    fid.update(images[labels != forget], real=False)
    return {"ua": 1 - acc[forget].item(), "retained_acc": statistics.fmean(acc[c].item() for c in retained),
            "per_class_acc": acc.tolist(), "fid_retained": fid.compute()["fid"]}


def cost_pass(model_path: str, methods: list[str], forget: str, out: Path, args) -> dict[str, float]:
    """Seconds per step of each method, by `erase bench` (interleaved rounds, fastest round kept)."""
    from erase.bench import BenchConfig, run_bench

    config = BenchConfig(model=model_path, forget=forget, methods=",".join(methods), steps=args.cost_steps,
                         rounds=args.cost_rounds)
    return {r["method"]: r["seconds_per_step"] for r in run_bench(config, out / "cost")["methods"]}


def markdown(rows: list[dict], cost: dict[str, float], forget_name: str, args) -> str:
    head = (f"| run | UA on {args.n_forget} '{forget_name}' (%) | retained acc (%) | Δ retained (pts) | "
            f"feature FID (retained) | steps | wall (s) | s/step | step cost vs finetune |\n"
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|\n")
    base = next((r for r in rows if r["run"] == "original"), None)
    lines = []
    for r in rows:
        ratio = f"{cost[r['method']] / cost['finetune']:.2f}x" if r["method"] in cost and "finetune" in cost else ""
        train = r.get("train", {})
        lines.append(f"| {r['run']} | {100 * r['ua']:.1f} | {100 * r['retained_acc']:.1f} | "
                     f"{100 * (r['retained_acc'] - base['retained_acc']) if base else float('nan'):+.1f} | {r['fid_retained']:.2f} | "
                     f"{train.get('steps', '')} | {train.get('wall_time_s', '')} | "
                     f"{train.get('seconds_per_step', 0) or 0:.3f} | {ratio} |")
    return head + "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="models/digits-ddpm")
    p.add_argument("--classifier", default="models/digits-classifier")
    p.add_argument("--forget", default="3")
    p.add_argument("--methods", default=",".join(["original", *METHODS]),
                   help="comma list; 'original' is the unmodified model (default: it and every method)")
    p.add_argument("--set", action="append", default=[], metavar="METHOD.OPTION=V1,V2", help="sweep grid rows")
    p.add_argument("--out", default="runs/bench-digits")
    p.add_argument("--n-forget", type=int, default=500, help="generated images of the forgotten digit")
    p.add_argument("--n-retain", type=int, default=100, help="generated images per retained digit")
    p.add_argument("--sample-steps", type=int, default=25, help="DDIM steps of the evaluation samples")
    p.add_argument("--guidance", type=float, help="classifier-free guidance of the evaluation samples (default: the model's sample_defaults; 1.0 for the shipped digits model)")
    p.add_argument("--seed", type=int, default=0, help="seed of the evaluation samples")
    p.add_argument("--cost-rounds", type=int, default=2, help="interleaved timing rounds (0 skips the cost pass)")
    p.add_argument("--cost-steps", type=int, default=10, help="steps per method and round in the cost pass")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = p.parse_args()
    setup_logging()
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    methods = [m for m in args.methods.split(",") if m]
    base = load_backbone(args.model)
    forget = base.class_index(args.forget)
    classifier = SmallClassifier.from_pretrained(args.classifier)
    real = load_dataset(base.info.get("training", {}).get("config", {}).get("dataset", "digits"), "train")
    real_retained = real.images[real.labels != forget]

    rows = []
    todo = runs_to_do(methods, args.set)
    for run, method, options in todo:
        folder = out / run
        cached = folder / "bench.json"
        if cached.is_file():
            rows.append(json.loads(cached.read_text()))
            continue
        t0 = time.perf_counter()
        if method is None:
            model, train = base, {}
        else:
            unlearn(args.model, method, args.forget, folder / "model", progress=False, **options)
            model = load_backbone(folder / "model")
            info = json.loads((folder / "model" / "erase_config.json").read_text())
            train = {k: info[k] for k in ("steps", "wall_time_s", "seconds_per_step", "peak_memory_mb",
                                          "final_losses", "config")}
        row = {"run": run, "method": method or "original", "options": options, "train": train,
               **evaluate(model, classifier, real_retained, forget, args)}
        write_json(cached, row)
        rows.append(row)
        log.info("%s: UA %.3f, retained %.3f, FID %.2f (%.0f s)", run, row["ua"], row["retained_acc"],
                 row["fid_retained"], time.perf_counter() - t0)

    cost_file = out / "cost.json"
    cost = json.loads(cost_file.read_text()) if cost_file.is_file() else {}
    if args.cost_rounds and not cost:
        timed = ["finetune"] + [m for m in methods if m not in ("finetune", "original")]
        cost = cost_pass(args.model, timed, args.forget, out, args)
        write_json(cost_file, cost)
    table = markdown(rows, cost, base.class_names[forget], args)
    (out / "table.md").write_text(table)
    print(table)


if __name__ == "__main__":
    main()
