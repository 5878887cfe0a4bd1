"""Semi-supervised training on generated street scenes (issue 17): validation mIoU after the
same steps with the labelled share only (the baseline), hard pseudo-labels from an EMA
teacher, + ESL dynamic soft labels, + the IPixMatch inter-pixel loss, and with every image
labelled (the upper bound: how much the unlabelled images could add).

    python tests/benchmarks/bench_semi.py [--images 32] [--labeled 1/8] [--steps 100]

Prints each run's mIoU and its ratio to the baseline measured in the same run.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from softprep.build import BuildOptions, build
from softprep.datasets import discover
from softprep.manifest import load_manifest
from softprep.sample import write_sample
from softprep.store import SoftStore
from softtrain.config import FitConfig
from softtrain.fit import fit
from softtrain.semi import partition


def labelled_only(root: Path, store: str, labeled: str, seed: int, out: Path) -> Path:
    """A copy of the dataset whose training split holds only the labelled images."""
    s = SoftStore(store)
    items = np.flatnonzero(s.split_of() == "train")
    chosen, _ = partition(s.names(), items, labeled, seed)
    keep = {str(n).split("/", 1)[1] for n in s.names()[chosen]}
    pairs, _ = discover(load_manifest("cityscapes"), root)
    for p in pairs:
        if p.split != "train" or p.name in keep:
            for f in (p.image, p.label):
                target = out / f.relative_to(root)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(f, target)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--labeled", default="1/8")
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--model",
        default="deeplabv3plus_r18",
        help="a registered model or a factory, module:function (default %(default)s; the smoke "
        "test trains tests.tinynet:tinynet)",
    )
    args = ap.parse_args()
    cityscapes = load_manifest("cityscapes")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        root = tmp / "cs"
        write_sample(cityscapes, root, {"train": args.images, "val": 4}, seed=5)
        opts = BuildOptions(scales=(0.25,))
        full = str(tmp / "full.zarr")
        build(cityscapes, root, full, opts, jobs=2)
        few = str(tmp / "labelled.zarr")
        build(cityscapes, labelled_only(root, full, args.labeled, 0, tmp / "few"), few, opts)
        common = dict(
            model=args.model, crop="64x128", batch_size=4, iters=args.steps, lr=0.02,
            workers=2, device=args.device,
        )  # fmt: skip
        semi = dict(store=full, labeled=args.labeled, semi_ema=0.99, semi_threshold=0.9)
        runs = [
            ("every image labelled (upper bound)", dict(store=full)),
            ("labelled share only (baseline)", dict(store=few)),
            ("hard pseudo-labels (EMA teacher)", semi),
            ("+ dynamic soft labels (ESL)", semi | dict(semi_esl=True)),
            ("+ inter-pixel loss (IPixMatch, KL)", semi | dict(semi_esl=True, semi_ipix="kl")),
        ]
        results = {}
        for n, (title, options) in enumerate(runs):
            cfg = FitConfig.of(out=str(tmp / f"run{n}"), **common, **options)
            start = time.perf_counter()
            results[title] = (fit(cfg)["last_miou"], time.perf_counter() - start)
    baseline = results["labelled share only (baseline)"][0]
    print(f"{args.labeled} of {args.images} generated scenes labelled, {args.steps} steps each")
    for title, (miou, seconds) in results.items():
        print(
            f"{title:36s} mIoU {100 * miou:5.1f}  {miou / baseline:5.2f}x baseline  {seconds:6.1f} s"
        )


if __name__ == "__main__":
    main()
