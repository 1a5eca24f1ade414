"""Erase nudity from Stable Diffusion with EUPMU and ESD, then measure both against the original.

The README's GPU recipe as one script: `erase unlearn` for each method with its paper's SD settings,
the `i2p-nudity` protocol (NudeNet on the I2P prompts with nudity, one image per prompt with its
seed) on the original and the erased models, the `t2i-utility` protocol (FID and CLIP score on COCO
captions) when its files are given, and one report.

    python examples/erase_nudity_sd.py --model CompVis/stable-diffusion-v1-4 \\
        --i2p unsafe-prompts4703.csv --out runs/sd14-nudity \\
        [--coco-captions captions.txt --coco-images coco/ --clip-model clip-vit-base-patch32/ \\
         --fid-weights pt_inception-2015-12-05-6726825d.pth]

Finished steps are reused when it is run again. `--limit`, `--steps` and `--images` shorten
everything for a quick check (the tests run it on a tiny pipeline that way).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from erase.loop import unlearn
from erase.utils import setup_logging
from erase.eval.protocols import I2PNudity, T2IUtility
from erase.eval.report import build_report

# Each method's SD nudity settings from its paper or the authors' code (docs/methods.md).
SD_SETTINGS = {
    # The authors' script: 100 steps of 8 forget + 8 retain images, the objective divided by 1 + w,
    # the remap target the trained model's own anchor prediction.
    "eupmu": dict(w_lr=10.0, eps=0.5, lr=1e-5, batch_size=16, steps=100, normalize=True, target="current"),
    "esd": dict(params="noxattn", lr=1e-5, batch_size=1, steps=1000),  # ESD-u, the nudity variant
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="CompVis/stable-diffusion-v1-4", help="hub id, pipeline folder or single file")
    p.add_argument("--i2p", required=True, help="I2P CSV, either layout (docs/data.md says where to get it)")
    p.add_argument("--out", default="runs/sd-nudity")
    p.add_argument("--methods", default="eupmu,esd", help=f"comma list from {', '.join(SD_SETTINGS)}")
    p.add_argument("--subset", default="nudity", help="I2P subset (nudity: the 854 prompts with nudity > 0)")
    p.add_argument("--coco-captions", help="captions file for t2i-utility (skipped without it)")
    p.add_argument("--coco-images", help="reference images for t2i-utility's FID")
    p.add_argument("--clip-model", help="local CLIP model folder for t2i-utility's CLIP score")
    p.add_argument("--fid-weights", help="local Inception weights file")
    p.add_argument("--limit", type=int, help="only the first N prompts of each evaluation (quick check)")
    p.add_argument("--steps", type=int, help="unlearning steps for every method (default: each one's setting)")
    p.add_argument("--images", type=int, default=800, help="generated images per prompt set (SalUn/EUPMU: 800)")
    p.add_argument("--eval-steps", type=int, default=50, help="denoising steps of the evaluations")
    args = p.parse_args()
    setup_logging()
    out = Path(args.out)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in SD_SETTINGS]
    if unknown:
        raise SystemExit(f"no SD settings for {', '.join(unknown)}: choose from {', '.join(SD_SETTINGS)}")
    utility = args.coco_captions is not None

    models = {"original": args.model}
    for method in methods:
        folder = out / method / "model"
        if not (folder / "erase_config.json").is_file():
            settings = SD_SETTINGS[method] | ({"steps": args.steps} if args.steps else {})
            unlearn(args.model, method, "nudity", folder, images=args.images, **settings)
        models[method] = folder

    sections: dict[str, list[Path]] = {"Nudity: NudeNet on I2P": [], "Utility: FID and CLIP score on COCO": []}
    for name, model in models.items():
        run = out / name / "i2p"
        if not (run / "metrics.json").is_file():
            I2PNudity(prompts=args.i2p, subset=args.subset, steps=args.eval_steps, limit=args.limit).run(model, run)
        sections["Nudity: NudeNet on I2P"].append(run)
        if utility:
            run = out / name / "coco"
            if not (run / "metrics.json").is_file():
                T2IUtility(prompts=args.coco_captions, reference=args.coco_images, clip_model=args.clip_model,
                           fid_weights=args.fid_weights, steps=args.eval_steps, limit=args.limit).run(model, run)
            sections["Utility: FID and CLIP score on COCO"].append(run)
    md, html = build_report({k: v for k, v in sections.items() if v}, out / "report",
                            title="Nudity erasure on Stable Diffusion")
    print(f"report: {html} (and {md})")


if __name__ == "__main__":
    main()
