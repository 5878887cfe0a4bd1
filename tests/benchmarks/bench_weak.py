"""Weak supervision on generated street scenes (issue 16): mIoU after the same training steps
with labelled blocks only (CE on the labelled pixels, the baseline), with soft
self-labelling, with dense Potts on the predictions (both after a third of the steps of CE
on the labelled pixels), and with full labels (upper bound).

    python tests/benchmarks/bench_weak.py [--images 24] [--steps 150] [--weak blocks:0.1:32]
        [--sigma 3] [--lam 1] [--eta 1]

Prints each regime's validation mIoU and its ratio to the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from softprep.build import BuildOptions, build
from softprep.manifest import load_manifest
from softprep.sample import write_sample
from softtrain.config import FitConfig
from softtrain.fit import fit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=24)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--weak", default="blocks:0.1:32")
    ap.add_argument("--solver-steps", type=int, default=50)
    # the paper's 3: at 1/4 scale, neighbours in one segment get w ~ 0.7, across an edge ~ 0.01
    ap.add_argument("--sigma", type=float, default=3.0)
    ap.add_argument("--lam", type=float, default=1.0, help="weight of the Potts term")
    ap.add_argument("--eta", type=float, default=1.0, help="weight of H(y, s)")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--only", nargs="+", default=["full", "potts", "self-label"],
        help="regimes besides the baseline: full, potts, self-label",
    )  # fmt: skip
    args = ap.parse_args()
    cityscapes = load_manifest("cityscapes")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "cs"
        write_sample(cityscapes, root, {"train": args.images, "val": 4}, seed=2)
        stores = {}
        for name, weak in (("full", None), ("weak", args.weak)):
            stores[name] = str(Path(tmp) / f"{name}.zarr")
            build(cityscapes, root, stores[name], BuildOptions(scales=(0.25,), weak=weak), jobs=2)
        runs = [
            ("full", "full labels (upper bound)", "full", "none"),
            ("baseline", "labelled pixels only (baseline)", "weak", "none"),
            ("potts", "dense Potts on predictions", "weak", "potts"),
            ("self-label", "soft self-labelling", "weak", "self-label"),
        ]
        results = {}
        for key, title, store, regime in runs:
            if key not in ("baseline", *args.only):
                continue
            cfg = FitConfig(
                store=stores[store],
                out=str(Path(tmp) / f"run-{store}-{regime}"),
                model="deeplabv3plus_r18",
                crop="64x128",
                batch_size=4,
                iters=args.steps,
                lr=0.02,
                workers=2,
                device=args.device,
                weak_loss=regime,
                weak_steps=args.solver_steps,
                weak_sigma=args.sigma,
                weak_lambda=args.lam,
                weak_eta=args.eta,
                weak_start=args.steps // 3,  # CE on the labelled pixels first, as the paper
            )
            start = time.perf_counter()
            results[title] = (fit(cfg)["last_miou"], time.perf_counter() - start)
    baseline = results["labelled pixels only (baseline)"][0]
    print(
        f"weak labels {args.weak}, {args.images} training images, {args.steps} steps each, "
        f"sigma {args.sigma:g}, lambda {args.lam:g}, eta {args.eta:g}, solver steps "
        f"{args.solver_steps}"
    )
    for title, (miou, seconds) in results.items():
        print(
            f"{title:34s} mIoU {100 * miou:5.1f}  {miou / baseline:5.2f}x baseline  {seconds:6.1f} s"
        )


if __name__ == "__main__":
    main()
