"""Resampling kernels and the paired down-sampling of colour images and soft labels.

Every kernel is separable and expressed as sparse per-axis weights (``AxisWeights``). The
same weights drive the colour image and the soft label, which is what makes them paired.

Kernels (``antialias=True`` is the default and follows PIL / torch ``antialias=True``: the
filter support grows with the down-sampling factor so every input pixel contributes):

- ``nearest``: centre sampling, ``src = floor((i + 0.5) * s)`` (PIL, torch ``nearest-exact``)
- ``nearest-floor``: top-left sampling, ``src = floor(i * s)`` (torch ``nearest``, OpenCV);
  shifted by (s - 1) / 2 input pixels against a smooth colour resize
- ``area``: exact area coverage (PIL ``BOX``); without antialias, torch ``area``
  (adaptive average pooling)
- ``bilinear``: triangle filter; without antialias a 2-tap filter (torch, align_corners=False)
- ``bicubic``: Keys cubic, a = -0.5 with antialias (PIL), a = -0.75 without (torch).
  Its negative lobes can give negative class mass; soft labels clip it and renormalise.

``s = n_in / n_out`` per axis; output sizes are ``round_half_up(n_in * scale)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

KERNELS = ("nearest", "nearest-floor", "area", "bilinear", "bicubic")
NEAREST_KERNELS = ("nearest", "nearest-floor")
_PIL_FILTERS = {"area": Image.BOX, "bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}
_SUPPORT = {"area": 0.5, "bilinear": 1.0, "bicubic": 2.0}


@dataclass(frozen=True)
class AxisWeights:
    """Sparse 1-D resampling: output ``i`` = sum_t ``weight[i, t] * input[index[i, t]]``.

    ``index``: (n_out, T) int64 in [0, n_in); ``weight``: (n_out, T) float64, rows sum to 1.
    Zero-weight taps repeat the row's strongest tap, so min/max over taps ignore them.
    """

    index: np.ndarray
    weight: np.ndarray
    n_in: int

    @property
    def n_out(self) -> int:
        return self.index.shape[0]

    def column_sums(self) -> np.ndarray:
        """(n_in,) float64: total weight each input sample gives to all outputs."""
        return np.bincount(self.index.ravel(), self.weight.ravel(), minlength=self.n_in)


def output_size(n: int, scale: float) -> int:
    """Output length for ``n`` input samples at ``scale`` (round half up, at least 1)."""
    return max(1, int(np.floor(n * scale + 0.5)))


def _filter(kernel: str, x: np.ndarray, a: float) -> np.ndarray:
    """The 1-D kernel at signed offsets ``x`` (bicubic: Keys with parameter ``a``)."""
    if kernel == "area":
        return ((x > -0.5) & (x <= 0.5)).astype(np.float64)  # PIL's box is half-open
    x = np.abs(x)
    if kernel == "bilinear":
        return np.clip(1.0 - x, 0.0, None)
    return np.where(
        x < 1,
        ((a + 2) * x - (a + 3)) * x * x + 1,
        np.where(x < 2, ((a * x - 5 * a) * x + 8 * a) * x - 4 * a, 0.0),
    )


def _antialiased(n_in: int, n_out: int, kernel: str) -> tuple[np.ndarray, np.ndarray]:
    scale = n_in / n_out
    fscale = max(scale, 1.0)
    support = _SUPPORT[kernel] * fscale
    centre = (np.arange(n_out) + 0.5) * scale
    lo = np.maximum((centre - support + 0.5).astype(np.int64), 0)
    hi = np.minimum((centre + support + 0.5).astype(np.int64), n_in)
    taps = int((hi - lo).max())
    index = lo[:, None] + np.arange(taps)[None, :]
    x = (index - centre[:, None] + 0.5) / fscale
    w = _filter(kernel, x, a=-0.5)
    w[index >= hi[:, None]] = 0.0
    return np.minimum(index, n_in - 1), w


def _plain(n_in: int, n_out: int, kernel: str) -> tuple[np.ndarray, np.ndarray]:
    scale = n_in / n_out
    i = np.arange(n_out)
    if kernel == "area":  # torch adaptive average pooling
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)
        taps = int((end - start).max())
        index = start[:, None] + np.arange(taps)[None, :]
        w = (index < end[:, None]).astype(np.float64)
        return np.minimum(index, n_in - 1), w
    src = (i + 0.5) * scale - 0.5
    if kernel == "bilinear":
        src = np.maximum(src, 0.0)
        i0 = np.floor(src).astype(np.int64)
        t = src - i0
        index = np.stack([i0, i0 + 1], axis=1)
        w = np.stack([1 - t, t], axis=1)
    else:  # bicubic, torch's a = -0.75 with replicated borders
        i0 = np.floor(src).astype(np.int64)
        t = (src - i0)[:, None]
        index = i0[:, None] + np.arange(-1, 3)[None, :]
        w = _filter("bicubic", t - np.arange(-1, 3)[None, :], a=-0.75)
    return np.clip(index, 0, n_in - 1), w


def axis_weights(n_in: int, n_out: int, kernel: str, antialias: bool = True) -> AxisWeights:
    """Weights resampling ``n_in`` samples to ``n_out`` with ``kernel``."""
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel '{kernel}'; choose from {', '.join(KERNELS)}")
    if kernel in NEAREST_KERNELS:
        i = np.arange(n_out, dtype=np.int64)  # exact integer arithmetic: no float ties
        src = (2 * i + 1) * n_in // (2 * n_out) if kernel == "nearest" else i * n_in // n_out
        index, w = np.minimum(src, n_in - 1)[:, None], np.ones((n_out, 1))
    elif antialias:
        index, w = _antialiased(n_in, n_out, kernel)
    else:
        index, w = _plain(n_in, n_out, kernel)
    w = w / w.sum(axis=1, keepdims=True)
    strongest = np.take_along_axis(index, np.abs(w).argmax(axis=1)[:, None], axis=1)
    index = np.where(w == 0, strongest, index)
    return AxisWeights(index=index, weight=w, n_in=n_in)


@dataclass(frozen=True)
class Resampler:
    """The separable kernel from an (H, W) input to an (Ho, Wo) output."""

    kernel: str
    antialias: bool
    y: AxisWeights
    x: AxisWeights

    @classmethod
    def make(cls, in_hw, out_hw, kernel: str, antialias: bool = True) -> Resampler:
        return cls(
            kernel,
            antialias,
            axis_weights(in_hw[0], out_hw[0], kernel, antialias),
            axis_weights(in_hw[1], out_hw[1], kernel, antialias),
        )

    @property
    def out_hw(self) -> tuple[int, int]:
        return self.y.n_out, self.x.n_out

    def resample_float(self, planes: np.ndarray) -> np.ndarray:
        """(H, W, ...) float -> (Ho, Wo, ...) float64 with the sparse weights."""
        out = 0.0
        for t in range(self.x.index.shape[1]):
            w = self.x.weight[:, t].reshape((1, -1) + (1,) * (planes.ndim - 2))
            out = out + planes[:, self.x.index[:, t]] * w
        res = 0.0
        for t in range(self.y.index.shape[1]):
            w = self.y.weight[:, t].reshape((-1,) + (1,) * (planes.ndim - 1))
            res = res + out[self.y.index[:, t]] * w
        return res

    def colour(self, image: np.ndarray | Image.Image) -> np.ndarray:
        """(H, W, 3) uint8 array or RGB PIL image -> (Ho, Wo, 3) uint8, rounded and clipped.

        Antialiased smooth kernels use PIL's resize, which computes these same weights in
        C; the others apply the weights here (nearest kernels by indexing).
        """
        if self.antialias and self.kernel in _PIL_FILTERS:
            pil = image if isinstance(image, Image.Image) else Image.fromarray(image)
            return np.asarray(pil.resize((self.x.n_out, self.y.n_out), _PIL_FILTERS[self.kernel]))
        image = np.asarray(image)
        if self.kernel in NEAREST_KERNELS:
            return image[self.y.index[:, 0]][:, self.x.index[:, 0]]
        out = self.resample_float(image.astype(np.float32))
        return np.clip(np.floor(out + 0.5), 0, 255).astype(np.uint8)

    def nearest_label(self, label: np.ndarray) -> np.ndarray:
        """(Ho, Wo) label sampled by a nearest kernel (its one tap per output)."""
        return label[self.y.index[:, 0]][:, self.x.index[:, 0]]

    def class_mass(self, label: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
        """(256,) float64 per label value: sum over output pixels of the (linear) soft
        label. ``counts``: the label's (256,) full-resolution histogram, if known.

        Exact without resampling: nearest kernels count the sampled pixels; smooth ones
        weight each input pixel by the product of its axis column sums (``separable_mass``).
        """
        if self.kernel in NEAREST_KERNELS:
            return np.bincount(self.nearest_label(label).ravel(), minlength=256).astype(float)
        if counts is None:
            counts = np.bincount(label.ravel(), minlength=256)
        return separable_mass(label, self.y.column_sums(), self.x.column_sums(), counts)

    def uniform(self, label: np.ndarray, changes: np.ndarray | None = None):
        """Output pixels whose taps all hold one label: ((Ho, Wo) bool, (Ho, Wo) that label).

        A tap window is uniform iff no label change lies inside its index range, which
        running counts of changes (``row_changes``, shareable between levels) answer
        with two lookups per window, first along rows, then along columns.
        """
        if changes is None:
            changes = row_changes(label)
        ax, bx = self.x.index.min(axis=1), self.x.index.max(axis=1)
        ay, by = self.y.index.min(axis=1), self.y.index.max(axis=1)
        # along rows; results transposed to (Wo, H) so the column pass runs on contiguous rows
        row_uniform = np.ascontiguousarray(
            (np.take(changes, bx, axis=1) == np.take(changes, ax, axis=1)).T
        )
        value = np.ascontiguousarray(np.take(label, ax, axis=1).T)  # (Wo, H)
        broken = np.zeros(value.shape, dtype=np.int32)  # rows not uniform, or differing
        broken[:, 1:] = (value[:, 1:] != value[:, :-1]) | ~row_uniform[:, 1:]
        np.cumsum(broken, axis=1, out=broken)
        uniform = (np.take(broken, by, axis=1) == np.take(broken, ay, axis=1)) & np.take(
            row_uniform, ay, axis=1
        )
        return np.ascontiguousarray(uniform.T), np.ascontiguousarray(np.take(value, ay, axis=1).T)

    def soft_topk(self, label: np.ndarray, k: int, changes=None, chunk: int = 1 << 22):
        """Top-``k`` soft label of an (H, W) uint8 train-id map (void = 255 is a class).

        Returns ``index`` (k, Ho, Wo) uint8 class ids and ``prob`` (k, Ho, Wo) float32
        class proportions, sorted by decreasing proportion (slot 0 = argmax), and
        ``truncated`` (Ho, Wo) float32, the mass dropped by keeping only ``k`` classes.
        No dense one-hot: output pixels whose taps all hold one class are set directly;
        the rest are reduced from their taps, so cost grows with pixels, not classes.
        ``changes``: ``row_changes(label)`` if already computed; ``chunk`` bounds the taps
        held in memory at once.
        """
        ho, wo = self.out_hw
        uniform, value = self.uniform(label, changes)
        index = np.zeros((k, ho * wo), dtype=np.uint8)
        prob = np.zeros((k, ho * wo), dtype=np.float32)
        truncated = np.zeros(ho * wo, dtype=np.float32)
        index[0], prob[0] = value.ravel(), 1.0
        mixed = np.flatnonzero(~uniform.ravel())
        wy, wx = self.y.weight.astype(np.float32), self.x.weight.astype(np.float32)
        taps = self.y.index.shape[1] * self.x.index.shape[1]
        step = max(1, chunk // taps)
        for start in range(0, len(mixed), step):
            m = mixed[start : start + step]
            oy, ox = np.divmod(m, wo)
            labels = label[self.y.index[oy][:, :, None], self.x.index[ox][:, None, :]]
            weights = wy[oy][:, :, None] * wx[ox][:, None, :]
            labels, weights = labels.reshape(len(m), taps), weights.reshape(len(m), taps)
            lo, hi = labels.min(axis=1), labels.max(axis=1)
            two = ((labels == lo[:, None]) | (labels == hi[:, None])).all(axis=1)
            for rows, reduce in ((two, _top_of_two), (~two, _top_of_many)):
                if rows.any():
                    ids, probs, dropped = reduce(labels[rows], weights[rows], k)
                    n, sel = len(ids), m[rows]
                    index[:n, sel], prob[:n, sel], prob[n:, sel] = ids, probs, 0.0
                    truncated[sel] = dropped
        return index.reshape(k, ho, wo), prob.reshape(k, ho, wo), truncated.reshape(ho, wo)


def _top_of_two(labels: np.ndarray, weights: np.ndarray, k: int):
    """Pixels whose taps hold at most two classes (most boundary pixels): (M, T) labels and
    weights -> ids (n, M), probabilities (n, M), truncated (M,), n = min(k, 2). Two
    weighted sums instead of a sort; same result as ``_top_of_many``."""
    lo, hi = labels.min(axis=1), labels.max(axis=1)
    w_hi = (weights * (labels == hi[:, None])).sum(axis=1)
    m_hi = np.clip(w_hi, 0.0, None)
    m_lo = np.clip(weights.sum(axis=1) - w_hi, 0.0, None)  # bicubic lobes clipped
    total = m_hi + m_lo
    first_hi = m_hi > m_lo  # ties go to the lower class id, as in the sort
    ids = np.stack([np.where(first_hi, hi, lo), np.where(first_hi, lo, hi)])
    probs = np.stack([np.maximum(m_hi, m_lo), np.minimum(m_hi, m_lo)]) / total
    ids[1] = np.where(probs[1] > 0, ids[1], 0)
    n = min(k, 2)
    return ids[:n], probs[:n], np.clip(1.0 - probs[:n].sum(axis=0), 0.0, None)


def _top_of_many(labels: np.ndarray, weights: np.ndarray, k: int):
    """Any pixels: (M, T) labels and weights -> ids (n, M), probabilities (n, M) and
    truncated (M,) of the ``k`` largest class masses, n = min(k, T)."""
    cls, mass = _class_masses(labels, weights)
    total = mass.sum(axis=1)
    taps = labels.shape[1]
    top = np.argpartition(-mass, k - 1, axis=1)[:, :k] if taps > k else np.indices(mass.shape)[1]
    kept = np.take_along_axis(mass, top, axis=1)
    order = np.argsort(-kept, axis=1, kind="stable")
    top, kept = np.take_along_axis(top, order, axis=1), np.take_along_axis(kept, order, axis=1)
    ids = np.where(kept > 0, np.take_along_axis(cls, top, axis=1), 0).T
    return ids, (kept / total[:, None]).T, np.clip(1.0 - kept.sum(axis=1) / total, 0.0, None)


def row_changes(label: np.ndarray) -> np.ndarray:
    """(H, W) int32: how many label changes lie left of each pixel in its row."""
    changes = np.zeros(label.shape, dtype=np.int32)
    np.cumsum(label[:, 1:] != label[:, :-1], axis=1, out=changes[:, 1:])
    return changes


def _class_masses(labels: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row, sum ``weights`` by ``labels``: (M, T) uint8 + (M, T) float32 -> class ids
    (M, T) and masses (M, T), each class's mass at its first position after sorting, 0
    elsewhere; negative masses (bicubic lobes) are clipped to 0."""
    m, t = labels.shape
    key = (labels.astype(np.uint32) << 16) | np.arange(t, dtype=np.uint32)
    key.sort(axis=1)  # by class, then tap: one fast integer sort instead of argsort
    cls = (key >> 16).astype(np.uint8)
    w = np.take_along_axis(weights, (key & 0xFFFF).astype(np.intp), axis=1)
    starts = np.ones((m, t), dtype=bool)
    starts[:, 1:] = cls[:, 1:] != cls[:, :-1]
    first = np.flatnonzero(starts)
    mass = np.zeros(m * t, dtype=np.float32)
    mass[first] = np.clip(np.add.reduceat(w.ravel(), first), 0.0, None)
    return cls, mass.reshape(m, t)


def _split_common(c: np.ndarray) -> tuple[float, np.ndarray]:
    """``c`` = common value + sparse deviations: (most frequent value, indices that differ)."""
    values, counts = np.unique(np.round(c, 12), return_counts=True)
    common = float(values[counts.argmax()])
    return common, np.flatnonzero(np.abs(c - common) > 1e-12)


def separable_mass(label: np.ndarray, cy: np.ndarray, cx: np.ndarray, counts: np.ndarray):
    """(256,) float64: sum over pixels of ``cy[h] * cx[w]`` per label value, given the
    label's (256,) histogram ``counts``.

    ``cy = a + dy``, ``cx = b + dx`` with sparse ``dy``/``dx`` (kernel borders, or the
    sampled rows of a nearest kernel): only the rows and columns where they are non-zero
    are visited, so the cost is far below one weighted pass over every pixel.
    """
    a, ry = _split_common(cy)
    b, rx = _split_common(cx)
    mass = a * b * counts.astype(np.float64)
    if len(rx):
        cols = label[:, rx]
        mass += a * np.bincount(cols.ravel(), np.broadcast_to(cx[rx] - b, cols.shape).ravel(), 256)
    if len(ry):
        rows = label[ry]
        dy = (cy[ry] - a)[:, None]
        mass += np.bincount(rows.ravel(), np.broadcast_to(dy * b, rows.shape).ravel(), 256)
        if len(rx):
            both = rows[:, rx]
            w = dy * (cx[rx] - b)[None, :]
            mass += np.bincount(both.ravel(), w.ravel(), 256)
    return mass
