"""``softprep fidelity``: how much of the truth each label strategy keeps, per class.

Every level's labels are taken back to full resolution and scored against the
full-resolution labels, as if a model reproduced its training labels perfectly:

- ``soft``: the stored soft labels, probabilities up-sampled bilinearly (align_corners
  False, as training up-samples logits), then the argmax;
- ``soft-argmax``: the stored soft labels' argmax (slot 0), up-sampled by nearest neighbour;
- ``nn`` / ``nn-floor``: nearest-neighbour labels of both phases (centre / top-left),
  down-sampled from the full-resolution labels, up-sampled by nearest neighbour;
- ``soft-prior`` / ``soft-bias``: ``soft`` with a decode (``softprep.decode``) in place of
  the argmax, fitted per level on another split (``fit_split``) from its up-sampled
  probabilities (dense there: cost pixels x classes on the fit split only).

Nearest up-sampling is centre-aligned, ``src = floor((i + 0.5) h / H)``. Void never wins
an argmax; a pixel whose label holds only void counts as a miss. Cost grows with pixels x
K (``kernels.bilinear_argmax``), never with the number of classes.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from softprep import keep_freed_buffers
from softprep.datasets import decode_label, labelled_pairs
from softprep.decode import Decode, DecodeSample, fit_decode, iou
from softprep.manifest import VOID
from softprep.options import BuildOptions, level_size
from softprep.planes import decode_planes
from softprep.resample import Resampler, axis_weights, change_counts
from softprep.store import SoftStore, StoreError, scale_label

SOFT = ("soft", "soft-argmax")
NEAREST = {"nn": "nearest", "nn-floor": "nearest-floor"}
DECODED = {"prior": "soft-prior", "bias": "soft-bias"}
FIT_PIXELS = 20_000  # per image: pixels of several classes kept to fit a decode


def nearest_up(small: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """(h, w) label -> (H, W), centre-aligned nearest neighbour (exact integer arithmetic)."""
    return Resampler.make(small.shape, hw, "nearest").nearest_label(small)


def _bilinear_taps(shape: tuple[int, int], hw: tuple[int, int]):
    rows = axis_weights(shape[0], hw[0], "bilinear", antialias=False)
    cols = axis_weights(shape[1], hw[1], "bilinear", antialias=False)
    return rows, cols


def soft_bilinear_argmax(
    index: np.ndarray, prob: np.ndarray, hw: tuple[int, int], decode: Decode | None = None
) -> np.ndarray:
    """(K, h, w) uint8 top-K soft label -> (H, W) uint8 argmax of its bilinear up-sampling
    as torch's ``align_corners=False`` (255 where only void has mass); with ``decode``, the
    argmax of its weighted probabilities."""
    from softprep import kernels  # compiled: numba is imported only when needed

    weight = np.ones(256)
    if decode is not None:
        weight[: len(decode.bias)] = decode.weights
    rows, cols = _bilinear_taps(index.shape[1:], hw)
    return kernels.bilinear_argmax(
        index, prob, rows.index[:, 0], rows.index[:, 1], rows.weight[:, 1],
        cols.index[:, 0], cols.index[:, 1], cols.weight[:, 1], weight, VOID,
    )  # fmt: skip


def soft_bilinear_probs(index: np.ndarray, prob: np.ndarray, hw: tuple[int, int], c: int):
    """(K, h, w) uint8 top-K soft label -> (C, H, W) float32 non-void class probabilities
    up-sampled bilinearly (``align_corners=False``); dense, cost pixels x classes."""
    keep = index != VOID
    dense = np.zeros((c, *index.shape[1:]), np.float32)
    slots = np.nonzero(keep)
    np.add.at(dense, (index[keep], slots[1], slots[2]), prob[keep] / np.float32(255))
    rows, cols = _bilinear_taps(index.shape[1:], hw)
    wy = rows.weight[:, 1].astype(np.float32)[None, :, None]
    wx = cols.weight[:, 1].astype(np.float32)[None, None, :]
    dense = dense[:, rows.index[:, 0]] * (1 - wy) + dense[:, rows.index[:, 1]] * wy
    return dense[:, :, cols.index[:, 0]] * (1 - wx) + dense[:, :, cols.index[:, 1]] * wx


def hard_argmax(index: np.ndarray, prob: np.ndarray) -> np.ndarray:
    """(K, h, w) top-K soft label -> (h, w) uint8: the first non-void slot with mass (slots
    are sorted by probability), 255 where there is none."""
    usable = (index != VOID) & (prob > 0)
    first = usable.argmax(axis=0)
    label = np.take_along_axis(index, first[None], axis=0)[0]
    return np.where(usable.any(axis=0), label, VOID).astype(np.uint8)


def strategy_labels(
    index, prob, label, scale, options, strategies, decodes: dict[str, Decode] | None = None
) -> dict[str, np.ndarray]:
    """{strategy: (H, W) uint8 label back at full resolution} for one image and level.
    ``index``/``prob``: its stored top-K soft label; ``label``: (H, W) full-resolution truth;
    ``decodes``: {strategy: Decode} of this level's decoded soft strategies."""
    hw = label.shape
    out = {}
    for s in strategies:
        if s == "soft":
            out[s] = soft_bilinear_argmax(index, prob, hw)
        elif s == "soft-argmax":
            out[s] = nearest_up(hard_argmax(index, prob), hw)
        elif s in DECODED.values():
            out[s] = soft_bilinear_argmax(index, prob, hw, decodes[s])
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
    decodes: dict[str, dict[str, Decode]] = field(default_factory=dict)  # level -> strategy

    @property
    def levels(self) -> list[str]:
        return list(self.confusion)

    @property
    def strategies(self) -> list[str]:
        return list(next(iter(self.confusion.values())))

    def iou(self, level: str, strategy: str) -> np.ndarray:
        """(C,) IoU per class; NaN where a class is neither true nor labelled."""
        return iou(self.confusion[level][strategy].astype(np.float64))

    def miou(self, level: str, strategy: str) -> float:
        v = self.iou(level, strategy)
        return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")

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
        doc = {"split": self.split, "images": self.images, "summary": self.summary(),
               "decodes": {level: {s: d.to_dict() for s, d in fitted.items()}
                           for level, fitted in self.decodes.items()}}  # fmt: skip
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
            absent = np.ones(n, dtype=bool)  # no IoU for any strategy: not in the split
            for j, s in enumerate(self.strategies):
                offset = (j - (len(self.strategies) - 1) / 2) * width
                label = f"{s} (mIoU {100 * self.miou(level, s):.1f})"
                iou = self.iou(level, s)
                shown = ~np.isnan(iou)
                absent &= ~shown
                ax.bar(x[shown] + offset, iou[shown] * 100, width, label=label, color=f"C{j}")
            for c in np.flatnonzero(absent):
                ax.text(x[c], 2, "n/a", ha="center", va="bottom", fontsize=7, color="grey",
                        rotation=90)  # fmt: skip
            ax.set_title(
                f"{level}: labels scored at full resolution ({self.split}; n/a: class absent)"
            )
            ax.set_ylabel("IoU (%)")
            ax.set_ylim(0, 100)
            ax.set_xticks(x, self.classes, rotation=90, fontsize=7)
            for label, a in zip(ax.get_xticklabels(), absent):
                label.set_color("grey" if a else "black")
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.tight_layout()
        fig.savefig(path, dpi=100)
        plt.close(fig)


def _store_images(store: SoftStore, split: str):
    """(count, iterator of (truth, [(scale, index, prob)])) of a store's evaluation split."""
    if split not in store.meta.get("eval_splits", []) or split not in store.splits:
        raise StoreError(
            f"{store.url}: split '{split}' has no full-resolution labels to score against "
            f"(evaluation splits: {', '.join(store.meta.get('eval_splits', [])) or 'none'})"
        )
    items = np.flatnonzero((store.split_of() == split) & store.done())

    def images():
        for i in items:
            yield (store.read_full_label(int(i)),
                   [(s, *store.read_soft(s, int(i))) for s in store.scales])  # fmt: skip

    return len(items), images()


def _dataset_images(manifest, root, options: BuildOptions, split: str):
    """(count, iterator of (truth, [(scale, index, prob)])) computed from label files."""
    pairs = labelled_pairs(manifest, root, split)

    def images():
        for pair in pairs:
            truth = decode_label(pair.label, manifest)
            changes, levels = change_counts(truth), []  # shared by the levels
            for scale in options.scales:
                size = level_size(truth.shape, scale, options.short_side)
                r = Resampler.make(truth.shape, size, options.kernel, options.antialias)
                planes = r.soft_planes(truth, options.k, changes)[0]
                levels.append((scale, *decode_planes(planes)))
            yield truth, levels

    return len(pairs), images()


def _accumulate(confusion: np.ndarray, truth: np.ndarray, labels: np.ndarray, c: int) -> None:
    keep = truth != VOID
    pred = np.where(labels[keep] == VOID, c, labels[keep]).astype(np.int64)
    confusion += np.bincount(
        truth[keep].astype(np.int64) * (c + 1) + pred, minlength=c * (c + 1)
    ).reshape(c, c + 1)


def _strategies(compare: list[str], decodes: list[str]) -> list[str]:
    unknown = [s for s in compare if s not in NEAREST and s not in SOFT]
    if unknown:
        raise ValueError(f"unknown strategies {unknown}; compare with nn, nn-floor")
    unknown = [d for d in decodes if d not in DECODED and d != "argmax"]
    if unknown:
        raise ValueError(f"unknown decodes {unknown}; choose from argmax, prior, bias")
    decoded = [DECODED[d] for d in DECODED if d in decodes]
    return list(SOFT) + decoded + [s for s in compare if s not in SOFT]


def fit_decodes(images, c: int, kinds: list[str], fit_split: str, progress=None):
    """{level: {strategy: Decode}} fitted on ``images`` (an iterator as ``_store_images``
    gives) for each decode kind of ``DECODED`` in ``kinds``."""
    kinds = [k for k in DECODED if k in kinds]
    samples = {}
    for n, (truth, levels) in enumerate(images):
        for scale, index, prob in levels:
            sample = samples.setdefault(scale_label(scale), DecodeSample(c, FIT_PIXELS))
            sample.add(soft_bilinear_probs(index, prob, truth.shape, c), truth)
        if progress:
            progress(n + 1)
    return {
        level: {DECODED[k]: fit_decode(sample, k, fit_split) for k in kinds}
        for level, sample in samples.items()
    }


def _report(images, count, classes, options, strategies, decodes, split, progress=None):
    c = len(classes)
    conf = {
        scale_label(s): {k: np.zeros((c, c + 1), np.int64) for k in strategies}
        for s in options.scales
    }
    for n, (truth, levels) in enumerate(images):
        for scale, index, prob in levels:
            level = scale_label(scale)
            labels = strategy_labels(
                index, prob, truth, scale, options, strategies, decodes.get(level)
            )
            for s, predicted in labels.items():
                _accumulate(conf[level][s], truth, predicted, c)
        if progress:
            progress(n + 1)
    return FidelityReport(classes, split, count, conf, decodes)


def _run(source, classes, options, compare, split, decodes, fit_split, progress):
    """Fit the decodes on ``fit_split`` (if any asked), then score ``split``."""
    keep_freed_buffers()  # each image's full-resolution arrays reuse the last one's memory
    strategies = _strategies(list(compare), list(decodes))
    count, images = source(split)
    fitted, done, total = {}, 0, count
    if any(d in DECODED for d in decodes):
        fit_count, fit_images = source(fit_split)
        done, total = fit_count, fit_count + count
        step = (lambda n: progress(n, total)) if progress else None
        fitted = fit_decodes(fit_images, len(classes), list(decodes), fit_split, step)
    step = (lambda n: progress(done + n, total)) if progress else None
    return _report(images, count, classes, options, strategies, fitted, split, step)


def from_store(
    store: SoftStore, compare: list[str] = ("nn", "nn-floor"), split: str = "val",
    progress=None, decodes: list[str] = (), fit_split: str = "val",
) -> FidelityReport:  # fmt: skip
    """Fidelity of a store's soft labels (and of nearest-neighbour labels of the same
    images) on an evaluation split, against its full-resolution labels; ``decodes``
    (``prior``, ``bias``) are fitted on ``fit_split`` and scored on ``split``. Like
    ``from_dataset``, sets glibc to keep freed buffers for the rest of the process
    (``softprep.keep_freed_buffers``)."""
    options = BuildOptions(scales=tuple(store.scales), short_side=store.meta.get("short_side"))
    return _run(
        lambda s: _store_images(store, s), store.manifest.class_names, options, compare,
        split, decodes, fit_split, progress,
    )  # fmt: skip


def from_dataset(
    manifest, root, options: BuildOptions, compare: list[str] = ("nn", "nn-floor"),
    split: str = "val", progress=None, decodes: list[str] = (), fit_split: str = "val",
) -> FidelityReport:  # fmt: skip
    """The same report from the label files, soft labels computed (and quantised) as a
    build with ``options`` would store them."""
    return _run(
        lambda s: _dataset_images(manifest, root, options, s), manifest.class_names, options,
        compare, split, decodes, fit_split, progress,
    )  # fmt: skip
