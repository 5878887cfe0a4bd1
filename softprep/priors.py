"""Per-class prior discrepancy ``D_d,c = p_original,c - p_d,c`` (paper Table V).

``p_original,c`` is class c's share of the non-void pixels at full resolution; ``p_d,c`` its
share of the non-void mass after down-sampling strategy d (the mean of the soft label for
smooth kernels, pixel counts for nearest neighbour). Closer to zero is better. Everything
is computed from the per-image statistics a build records, or (``from_dataset``) by the
same code directly from the label files.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from softprep.datasets import decode_label_counted, labelled_pairs, with_void_last
from softprep.options import BuildOptions, level_size, strategy_kernel, strategy_masses
from softprep.store import SoftStore, StoreError, scale_label

SHOWN_AS = 1e4  # the paper shows D x 1e4


@dataclass
class PriorReport:
    """Class priors and discrepancies of one split (or ``all``).

    ``original``: (C,) priors at full resolution. ``priors[level][strategy]``: (C,) priors
    after the strategy at that level (level names like ``1/8``). ``images``: how many.
    """

    classes: list[str]
    split: str
    images: int
    original: np.ndarray
    priors: dict[str, dict[str, np.ndarray]]

    @property
    def levels(self) -> list[str]:
        return list(self.priors)

    @property
    def strategies(self) -> list[str]:
        return list(next(iter(self.priors.values())))

    def discrepancy(self, level: str, strategy: str) -> np.ndarray:
        """(C,) D = p_original - p_d."""
        return self.original - self.priors[level][strategy]

    def lost_share(self, level: str, strategy: str = "nn") -> np.ndarray:
        """(C,) share of each class's prior the strategy loses (D / p_original; 0 if absent)."""
        with np.errstate(divide="ignore", invalid="ignore"):
            share = self.discrepancy(level, strategy) / self.original
        return np.where(self.original > 0, share, 0.0)

    def records(self) -> list[dict]:
        """One row per (level, strategy, class): what the CSV and JSON files hold."""
        rows = []
        for level in self.levels:
            for s in self.strategies:
                d = self.discrepancy(level, s)
                for c, name in enumerate(self.classes):
                    rows.append(
                        {
                            "split": self.split,
                            "level": level,
                            "strategy": s,
                            "class_id": c,
                            "class": name,
                            "p_original": float(self.original[c]),
                            "p_d": float(self.priors[level][s][c]),
                            "D": float(d[c]),
                        }
                    )
        return rows

    def summary(self) -> list[dict]:
        """Per level and strategy: sum and max of |D| over classes."""
        out = []
        for level in self.levels:
            for s in self.strategies:
                d = np.abs(self.discrepancy(level, s))
                out.append(
                    {
                        "level": level,
                        "strategy": s,
                        "sum_abs_D": float(d.sum()),
                        "max_abs_D": float(d.max()),
                    }
                )
        return out

    def write_csv(self, path: Path) -> None:
        rows = self.records()
        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)

    def write_json(self, path: Path) -> None:
        Path(path).write_text(
            json.dumps(
                {
                    "split": self.split,
                    "images": self.images,
                    "rows": self.records(),
                    "summary": self.summary(),
                },
                indent=1,
            )
        )

    def plot(self, path: Path) -> None:
        """Per-class |D| x 1e4 on a log scale, one panel per level, one bar colour per
        strategy. A |D| of exactly 0 (which a log axis cannot show) is a triangle on the
        axis in the strategy's colour; classes absent from the split are marked (absent)."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.lines import Line2D

        n, k = len(self.classes), len(self.strategies)
        fig, axes = plt.subplots(
            len(self.levels), 1, figsize=(max(8, 0.28 * n * k / 2) + 1.5, 3.6 * len(self.levels)),
            squeeze=False, layout="constrained",
        )  # fmt: skip
        width = 0.8 / k
        x = np.arange(n)
        present = self.original > 0
        every = np.abs([self.discrepancy(lv, s) for lv in self.levels for s in self.strategies])
        smallest = every[every > 0].min() * SHOWN_AS if (every > 0).any() else 1.0
        bottom = 10.0 ** np.floor(np.log10(smallest))  # every non-zero |D| has a bar
        for ax, level in zip(axes[:, 0], self.levels):
            handles = []
            for j, s in enumerate(self.strategies):
                d = np.abs(self.discrepancy(level, s)) * SHOWN_AS
                at = x + (j - (k - 1) / 2) * width
                colour = f"C{j}"
                ax.bar(at[d > 0], d[d > 0], width, color=colour)
                zero = (d == 0) & present
                if zero.any():
                    ax.plot(at[zero], np.full(zero.sum(), bottom), "v", color=colour, ms=5,
                            clip_on=False)  # fmt: skip
                handles.append(Line2D([], [], color=colour, lw=6, label=s))
            handles.append(Line2D([], [], color="grey", marker="v", lw=0, label="exactly 0"))
            ax.set_yscale("log")
            ax.set_ylim(bottom=bottom)
            ax.set_ylabel("|D| x 1e4 (log)")
            ax.set_title(
                f"scale {level}: |D| x 1e4 per class, split {self.split} (lower is better;"
                " grey: class absent)",
                fontsize=10,
            )
            ax.set_xticks(x, self.classes, rotation=90, fontsize=7)
            for label, p in zip(ax.get_xticklabels(), present):
                label.set_color("black" if p else "grey")
            ax.legend(handles=handles, fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
        fig.savefig(path, dpi=110)
        plt.close(fig)


def _normalise(mass: np.ndarray) -> np.ndarray:
    """(C+1,) mass with void last -> (C,) shares of the non-void mass."""
    total = mass[:-1].sum()
    return mass[:-1] / total if total > 0 else np.zeros(len(mass) - 1)


def from_store(store: SoftStore, compare: list[str], split: str = "train") -> PriorReport:
    """The report from a store's recorded statistics (never rereads the dataset)."""
    if not store.has_statistics:
        raise StoreError(f"{store.url}: no statistics recorded (not built by softprep build?)")
    done = store.done()
    if split in store.image_only_splits:
        raise StoreError(f"{store.url}: split '{split}' has no labels")
    if split == "all":
        rows = done & ~np.isin(store.split_of(), store.image_only_splits)
    elif split in store.splits:
        rows = done & (store.split_of() == split)
    else:
        raise StoreError(
            f"{store.url}: no split '{split}'; splits: {', '.join(store.splits)} or all"
        )
    if not rows.any():
        raise StoreError(f"{store.url}: no finished images in split '{split}'")
    strategies = ["soft"] + [s for s in compare if s != "soft"]
    priors = {}
    for scale in store.scales:
        priors[scale_label(scale)] = {
            s: _normalise(store.stats(scale, s)[rows].sum(axis=0)) for s in strategies
        }
    names = [c["name"] for c in store.classes]
    return PriorReport(
        names,
        split,
        int(rows.sum()),
        _normalise(store.full_counts()[rows].sum(axis=0)),
        priors,
    )


def from_dataset(
    manifest,
    root,
    options: BuildOptions,
    compare: list[str],
    split: str = "train",
    progress=None,
) -> PriorReport:
    """The same report computed directly from the label files (no store needed)."""
    strategies = ["soft"] + [s for s in compare if s != "soft"]
    for s in strategies:
        strategy_kernel(s, options)  # unknown strategies fail before any file is read
    pairs = labelled_pairs(manifest, root, split)
    c = manifest.num_classes
    full = np.zeros(c + 1)
    mass = {scale_label(s): {k: np.zeros(c + 1) for k in strategies} for s in options.scales}
    for n, pair in enumerate(pairs):
        label, counts = decode_label_counted(pair.label, manifest)
        full += with_void_last(counts, c)
        for scale in options.scales:
            out_hw = level_size(label.shape, scale, options.short_side)
            masses = strategy_masses(label, counts, out_hw, options, strategies, c)
            for s, m in masses.items():
                mass[scale_label(scale)][s] += m
        if progress:
            progress(n + 1, len(pairs))
    priors = {lv: {s: _normalise(v) for s, v in d.items()} for lv, d in mass.items()}
    return PriorReport(manifest.class_names, split, len(pairs), _normalise(full), priors)
