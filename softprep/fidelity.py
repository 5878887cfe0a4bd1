"""``softprep fidelity``: how much of the truth each label strategy keeps, per class.

Every level's labels are taken back to full resolution and scored against the
full-resolution labels, as if a model reproduced its training labels perfectly:

- ``soft``: the stored soft labels, probabilities up-sampled bilinearly (align_corners
  False, as training up-samples logits), then the argmax;
- ``soft-argmax``: the stored soft labels' argmax (slot 0), up-sampled by nearest neighbour;
- ``nn`` / ``nn-floor``: nearest-neighbour labels of both phases (centre / top-left),
  down-sampled from the full-resolution labels, up-sampled by nearest neighbour.

Nearest up-sampling is centre-aligned, ``src = floor((i + 0.5) h / H)``. Void never wins
an argmax; a pixel whose label holds only void counts as a miss. Cost grows with pixels x
K (``kernels.bilinear_argmax``), never with the number of classes.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from softprep.build import BuildOptions, level_size
from softprep.datasets import decode_label, labelled_pairs
from softprep.manifest import VOID
from softprep.quantize import decode_planes
from softprep.resample import Resampler, axis_weights
from softprep.store import SoftStore, StoreError, scale_label

SOFT = ("soft", "soft-argmax")
NEAREST = {"nn": "nearest", "nn-floor": "nearest-floor"}


def nearest_up(small: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(h, w) label -> (H, W), centre-aligned nearest neighbour (exact integer arithmetic)."""
    return Resampler.make(small.shape, hw, "nearest").nearest_label(small)


def soft_bilinear_argmax(index: np.ndarray, prob: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(K, h, w) uint8 top-K soft label -> (H, W) uint8 argmax of its bilinear up-sampling
    as torch's ``align_corners=False`` (255 where only void has mass)."""
    from softprep import kernels  # compiled: numba is imported only when needed

    rows = axis_weights(index.shape[1], hw[0], "bilinear", antialias=False)
    cols = axis_weights(index.shape[2], hw[1], "bilinear", antialias=False)
    return kernels.bilinear_argmax(
        index, prob, rows.index[:, 0], rows.index[:, 1], rows.weight[:, 1],
        cols.index[:, 0], cols.index[:, 1], cols.weight[:, 1], VOID,
    )  # fmt: skip


def hard_argmax(index: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """(K, h, w) top-K soft label -> (h, w) uint8: the first non-void slot with mass (slots
    are sorted by probability), 255 where there is none."""
    usable = (index != VOID) & (prob > 0)
    first = usable.argmax(axis=0)
    label = np.take_along_axis(index, first[None], axis=0)[0]
    return np.where(usable.any(axis=0), label, VOID).astype(np.uint8)


def strategy_labels(index, prob, label, scale, options, strategies) -> dict[str, np.ndarray]:
    """{strategy: (H, W) uint8 label back at full resolution} for one image and level.
    ``index``/``prob``: its stored top-K soft label; ``label``: (H, W) full-resolution truth."""
    hw = label.shape
    out = {}
    for s in strategies:
        if s == "soft":
            out[s] = soft_bilinear_argmax(index, prob, hw)
        elif s == "soft-argmax":
            out[s] = nearest_up(hard_argmax(index, prob), hw)
        else:
            size = level_size(hw, scale, options.short_side)
            small = Resampler.make(hw, size, NEAREST[s]).nearest_label(label)
            out[s] = nearest_up(small, hw)
    return out


@dataclass
class FidelityReport:
    """Per level and strategy, the (C, C+1) confusion of the labels against the truth
    (rows: truth; columns: label, the last one "void only")."""

    classes: list[str]
    split: str
    images: int
    confusion: dict[str, dict[str, np.ndarray]]

    @property
    def levels(self) -> list[str]:
        return list(self.confusion)

    @property
    def strategies(self) -> list[str]:
        return list(next(iter(self.confusion.values())))

    def iou(self, level: str, strategy: str) -> np.ndarray:
        """(C,) IoU per class; NaN where a class is neither true nor labelled."""
        m = self.confusion[level][strategy].astype(np.float64)
        tp = np.diag(m[:, : len(self.classes)])
        union = m.sum(1) + m[:, : len(self.classes)].sum(0) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def miou(self, level: str, strategy: str) -> float:
        iou = self.iou(level, strategy)
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def records(self) -> list[dict]:
        rows = []
        for level in self.levels:
            for s in self.strategies:
                for c, (name, v) in enumerate(zip(self.classes, self.iou(level, s))):
                    rows.append(
                        {"split": self.split, "level": level, "strategy": s, "class_id": c,
                         "class": name, "iou": None if np.isnan(v) else float(v)}
                    )  # fmt: skip
        return rows

    def summary(self) -> list[dict]:
        return [
            {"level": level, "strategy": s, "mIoU": self.miou(level, s)}
            for level in self.levels
            for s in self.strategies
        ]

    def write_csv(self, path: Path) -> None:
        rows = self.records()
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    def write_json(self, path: Path) -> None:
        doc = {"split": self.split, "images": self.images, "summary": self.summary()}
        Path(path).write_text(json.dumps(doc | {"rows": self.records()}, indent=1))

    def plot(self, path: Path) -> None:
        """Per-class IoU of each strategy, one panel per level."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        n = len(self.classes)
        fig, axes = plt.subplots(
            len(self.levels), 1, figsize=(max(8, 0.3 * n * len(self.strategies) / 2), 3.2 * len(self.levels)), squeeze=False
        )  # fmt: skip
        width = 0.8 / len(self.strategies)
        x = np.arange(n)
        for ax, level in zip(axes[:, 0], self.levels):
            for j, s in enumerate(self.strategies):
                offset = (j - (len(self.strategies) - 1) / 2) * width
                label = f"{s} (mIoU {100 * self.miou(level, s):.1f})"
                ax.bar(x + offset, np.nan_to_num(self.iou(level, s)) * 100, width, label=label)
            ax.set_title(f"{level}: labels scored at full resolution ({self.split})")
            ax.set_ylabel("IoU (%)")
            ax.set_ylim(0, 100)
            ax.set_xticks(x, self.classes, rotation=90, fontsize=7)
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _score(conf: dict, truth, index, prob, scale, options, strategies, c: int) -> None:
    """Add one image at one level to every strategy's confusion matrix."""
    labels = strategy_labels(index, prob, truth, scale, options, strategies)
    for s, predicted in labels.items():
        _accumulate(conf[scale_label(scale)][s], truth, predicted, c)


def _accumulate(confusion: np.ndarray, truth: np.ndarray, labels: np.ndarray, c: int) -> None:
    keep = truth != VOID
    pred = np.where(labels[keep] == VOID, c, labels[keep]).astype(np.int64)
    confusion += np.bincount(
        truth[keep].astype(np.int64) * (c + 1) + pred, minlength=c * (c + 1)
    ).reshape(c, c + 1)


def _strategies(compare: list[str]) -> list[str]:
    unknown = [s for s in compare if s not in NEAREST and s not in SOFT]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; compare with nn, nn-floor")
    return list(SOFT) + [s for s in compare if s not in SOFT]


def from_store(
    store: SoftStore, compare: list[str] = ("nn", "nn-floor"), split: str = "val", progress=None
) -> FidelityReport:
    """Fidelity of a store's soft labels (and of nearest-neighbour labels of the same
    images) on an evaluation split, against its full-resolution labels."""
    strategies = _strategies(list(compare))
    if split not in store.meta.get("eval_splits", []) or split not in store.splits:
        raise StoreError(
            f"{store.url}: split '{split}' has no full-resolution labels to score against "
            f"(evaluation splits: {', '.join(store.meta.get('eval_splits', [])) or 'none'})"
        )
    items = np.flatnonzero((store.split_of() == split) & store.done())
    c = store.num_classes
    options = BuildOptions(scales=tuple(store.scales), short_side=store.meta.get("short_side"))
    conf = {
        scale_label(s): {k: np.zeros((c, c + 1), np.int64) for k in strategies}
        for s in store.scales
    }
    for n, i in enumerate(items):
        truth = store.read_full_label(int(i))
        for scale in store.scales:
            index, prob = store.read_soft(scale, int(i))
            _score(conf, truth, index, prob, scale, options, strategies, c)
        if progress:
            progress(n + 1, len(items))
    return FidelityReport(store.manifest.class_names, split, len(items), conf)


def from_dataset(
    manifest, root, options: BuildOptions, compare: list[str] = ("nn", "nn-floor"),
    split: str = "val", progress=None,
) -> FidelityReport:  # fmt: skip
    """The same report from the label files, soft labels computed (and quantised) as a
    build with ``options`` would store them."""
    strategies = _strategies(list(compare))
    pairs = labelled_pairs(manifest, root, split)
    c = manifest.num_classes
    conf = {
        scale_label(s): {k: np.zeros((c, c + 1), np.int64) for k in strategies}
        for s in options.scales
    }
    for n, pair in enumerate(pairs):
        truth = decode_label(pair.label, manifest)
        for scale in options.scales:
            size = level_size(truth.shape, scale, options.short_side)
            r = Resampler.make(truth.shape, size, options.kernel, options.antialias)
            index, prob = decode_planes(r.soft_planes(truth, options.k)[0])
            _score(conf, truth, index, prob, scale, options, strategies, c)
        if progress:
            progress(n + 1, len(pairs))
    return FidelityReport(manifest.class_names, split, len(pairs), conf)
