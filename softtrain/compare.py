"""``softtrain compare``: the paper's Tables I and III on the user's own data, in one call.

Each *arm* is a store and a loss (``bilinear.zarr``, ``bilinear.zarr:ce-hard:exclude``,
``nearest.zarr``, ...). Every arm is trained with the same model and schedule (one
``FitConfig``) for each seed, as ordinary ``fit`` runs in ``<out>/<arm>/seed<N>``: a
finished run is read back, not retrained, and an interrupted one resumes. The report holds
the mean and spread over seeds of the final mIoU and per-class IoU, and each store's label
fidelity at the evaluation level (``softprep.fidelity``, the soft decoder).
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from softprep.fidelity import from_store as fidelity_from_store
from softprep.store import SoftStore, parse_scale, scale_label
from softtrain.checkpoint import load_checkpoint
from softtrain.config import LOSSES, MC_MODES, NO_EVAL, FitConfig
from softtrain.runlog import read_metrics


@dataclass(frozen=True)
class Arm:
    """One store trained with one loss; ``Arm.parse("s.zarr:ce-hard:exclude")``."""

    store: str
    loss: str = "soft"
    mc: str = "include"

    @classmethod
    def parse(cls, text: str) -> Arm:
        """``STORE[:LOSS[:MC]]``; a colon that belongs to the store (a URL) stays in it."""
        parts = text.split(":")
        mc = parts.pop() if len(parts) > 2 and parts[-1] in MC_MODES else "include"
        loss = parts.pop() if len(parts) > 1 and parts[-1] in LOSSES else "soft"
        return cls(":".join(parts), loss, mc)

    @property
    def name(self) -> str:
        return f"{Path(self.store.rstrip('/')).stem}-{self.loss}" + (
            "-mc-excluded" if self.mc == "exclude" else ""
        )


@dataclass
class CompareReport:
    """Per arm: final mIoU and per-class IoU of every seed, and the store's fidelity."""

    classes: list[str]
    level: str
    arms: list[str]
    seeds: list[int]
    miou: dict[str, list[float]]  # arm -> per seed
    iou: dict[str, np.ndarray]  # arm -> (seeds, C), NaN where undefined
    fidelity: dict[str, float]  # arm -> its store's soft-label fidelity mIoU at ``level``

    def rows(self) -> list[dict]:
        """One row per arm: mean and standard deviation over seeds, fidelity, per class."""
        out = []
        for arm in self.arms:
            per_class = _nanmean(self.iou[arm])
            out.append(
                {
                    "arm": arm,
                    "seeds": len(self.miou[arm]),
                    "mIoU_mean": float(np.mean(self.miou[arm])),
                    "mIoU_std": float(np.std(self.miou[arm])),
                    "fidelity_mIoU": self.fidelity[arm],
                }
                | {f"IoU {c}": _finite(v) for c, v in zip(self.classes, per_class)}
            )
        return out

    def write_csv(self, path: Path) -> None:
        rows = self.rows()
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    def write_json(self, path: Path) -> None:
        doc = {"level": self.level, "seeds": self.seeds, "rows": self.rows()}
        Path(path).write_text(json.dumps(doc, indent=1, allow_nan=False))

    def plot(self, path: Path) -> None:
        """mIoU per arm (bars: mean over seeds, with the standard deviation as an error bar
        when there are several seeds) beside its store's label fidelity (hatched bars: what
        the labels themselves score, an upper bound), and per-class IoU per arm (classes
        without an IoU, absent from the split, are left out)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rows = self.rows()
        fig, (left, right) = plt.subplots(
            1, 2, figsize=(7 + 0.3 * len(self.classes) * len(self.arms) / 2, 4.5),
            gridspec_kw={"width_ratios": [1, 3]}, layout="constrained",
        )  # fmt: skip
        x = np.arange(len(rows))
        several = [r["seeds"] > 1 for r in rows]
        spread = [100 * r["mIoU_std"] if s else np.nan for r, s in zip(rows, several)]
        left.bar(
            x - 0.2, [100 * r["mIoU_mean"] for r in rows], 0.4, label="model mIoU",
            yerr=spread if any(several) else None, error_kw={"elinewidth": 1, "capsize": 3},
        )  # fmt: skip
        left.bar(
            x + 0.2, [100 * r["fidelity_mIoU"] for r in rows], 0.4, color="white",
            edgecolor="grey", hatch="//", label="label fidelity",
        )  # fmt: skip
        left.set_xticks(x, [r["arm"] for r in rows], rotation=30, ha="right", fontsize=8)
        seeds = sorted({r["seeds"] for r in rows})
        over = "one seed" if seeds == [1] else f"mean ± std over {'/'.join(map(str, seeds))} seeds"
        left.set_ylabel(f"mIoU (%) at {self.level}, {over}")
        left.set_ylim(0, 100)
        left.legend(fontsize=7, loc="upper left")
        width = 0.8 / len(rows)
        cx = np.arange(len(self.classes))
        for j, r in enumerate(rows):
            values = np.array([np.nan if r[f"IoU {c}"] is None else 100 * r[f"IoU {c}"]
                               for c in self.classes])  # fmt: skip
            shown = ~np.isnan(values)
            at = cx + (j - (len(rows) - 1) / 2) * width
            right.bar(at[shown], values[shown], width, label=r["arm"], color=f"C{j}")
        right.set_xticks(cx, self.classes, rotation=90, fontsize=7)
        right.set_ylabel("IoU (%)" + ("" if seeds == [1] else ", mean over seeds"))
        right.set_ylim(0, 100)
        right.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _finite(v) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)


def _nanmean(a: np.ndarray) -> np.ndarray:
    """Column means ignoring NaN (NaN where a column has no value), without warnings."""
    finite = np.isfinite(a)
    counts = finite.sum(axis=0)
    return np.where(counts > 0, np.where(finite, a, 0).sum(axis=0) / np.maximum(counts, 1), np.nan)


def _final_eval(out: Path, iters: int) -> dict | None:
    """The eval record of a finished run (its last step), or None."""
    evals = [r for r in read_metrics(out / "metrics.jsonl") if r.get("type") == "eval"]
    if (out / "last.pt").exists() and evals and evals[-1]["step"] == iters:
        return evals[-1]
    return None


def compare(base: FitConfig, arms: list[Arm], seeds: list[int], out: Path, on_run=None):
    """Train every arm for every seed (or read back finished runs) and report.

    ``base``: the shared model and schedule (its store, loss, mc, seed and out are set per
    run). ``on_run(arm, seed, status)`` reports each run: "trained", "resumed" or "done".
    """
    from softtrain.fit import fit

    if not arms or not seeds:
        raise ValueError("give at least one arm (--arm STORE[:loss[:mc]]) and one seed")
    if base.run.eval_split == NO_EVAL:
        raise ValueError(f"--eval-split {NO_EVAL}: compare scores every run on it; give a split")
    stores = {a.store: SoftStore(a.store) for a in arms}
    tables = {json.dumps(s.classes) for s in stores.values()}
    if len(tables) > 1:
        raise ValueError("the arms' stores have different class tables; compare one dataset")
    names = [a.name for a in arms]
    if len(set(names)) < len(names):
        raise ValueError(f"two arms share a name ({names}); give stores distinct file names")
    first = next(iter(stores.values()))
    levels = base.data.levels
    level = base.run.eval_level or scale_label(
        max(parse_scale(v) for v in levels) if levels else max(first.scales)
    )
    classes = first.manifest.class_names
    miou, iou, fidelity = {}, {}, {}
    for arm in arms:
        miou[arm.name], rows = [], []
        for seed in seeds:
            run = out / arm.name / f"seed{seed}"
            cfg = base.with_flat(store=arm.store, loss=arm.loss, mc=arm.mc, seed=seed, out=str(run))
            iters = cfg.optim.iters
            record = _final_eval(run, iters)
            if record is None:
                resume = (run / "last.pt").exists() and load_checkpoint(run / "last.pt")[
                    "step"
                ] < iters
                fit(cfg, resume=resume, overwrite=not resume)
                record = _final_eval(run, iters)
                status = "resumed" if resume else "trained"
            else:
                status = "done"
            if record is None or record["mIoU"] is None:
                raise ValueError(f"{arm.store}: no evaluation split to score the runs on")
            if on_run:
                on_run(arm.name, seed, status)
            miou[arm.name].append(record["mIoU"])
            rows.append([np.nan if r["iou"] is None else r["iou"] for r in record["classes"]])
        iou[arm.name] = np.array(rows, dtype=np.float64)
        report = fidelity_from_store(stores[arm.store], [], base.run.eval_split)
        fidelity[arm.name] = report.miou(level, "soft")
    return CompareReport(classes, level, names, list(seeds), miou, iou, fidelity)
