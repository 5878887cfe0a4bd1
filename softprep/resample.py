"""Resampling kernels and the paired down-sampling of colour images and soft labels.

Every kernel is separable and expressed as sparse per-axis weights (``AxisWeights``). The
same weights drive the colour image and the soft label, which is what makes them paired.

Kernels (``antialias=True`` is the default and follows PIL / torch ``antialias=True``: the
filter support grows with the down-sampling factor so every input pixel contributes):

- ``nearest``: centre sampling, ``src = floor((i + 0.5) * s)`` in exact arithmetic; PIL and
  torch ``nearest-exact`` compute it in floating point and, where ``(i + 0.5) * s`` is an
  integer, can round down to the neighbouring row or column (e.g. at scales 1/3, 0.15, 0.45)
- ``nearest-floor``: top-left sampling, ``src = floor(i * s)`` in exact arithmetic (torch
  ``nearest``, OpenCV; torch's float32 differs at some scales, e.g. 0.3); shifted by
  (s - 1) / 2 input pixels against a smooth colour resize
- ``area``: PIL's ``BOX`` filter: the input pixels whose centres fall in the output pixel's
  footprint, equally weighted (at integer factors that is the exact area average; at other
  scales it is not fractional area coverage); without antialias, torch ``area`` (adaptive
  average pooling)
- ``bilinear``: triangle filter; without antialias a 2-tap filter (torch, align_corners=False)
- ``bicubic``: Keys cubic, a = -0.5 with antialias (PIL), a = -0.75 without (torch).
  Its negative lobes can give negative class mass; soft labels clip it and renormalise.

``s = n_in / n_out`` per axis; output sizes are ``round_half_up(n_in * scale)``.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from PIL import Image

from softprep.planes import TOTAL

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


@functools.lru_cache(maxsize=512)
def axis_weights(n_in: int, n_out: int, kernel: str, antialias: bool = True) -> AxisWeights:
    """Weights resampling ``n_in`` samples to ``n_out`` with ``kernel`` (read-only arrays,
    cached: a build computes the same ones for every image of a size, ~18 per image)."""
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
    index.setflags(write=False)
    w.setflags(write=False)
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
            from softprep import kernels  # compiled: numba is imported only when needed

            return kernels.sampled_counts(label, self.y.index[:, 0], self.x.index[:, 0]) * 1.0
        if counts is None:
            counts = np.bincount(label.ravel(), minlength=256)
        return separable_mass(label, self.y.column_sums(), self.x.column_sums(), counts)

    def soft_planes(self, label: np.ndarray, k: int, changes: tuple | None = None):
        """Store planes of the top-``k`` soft label of an (H, W) uint8 train-id map (void =
        255 is a class): proportions renormalised and rounded to sum 255 (``softprep.planes``).

        Returns ``planes`` (2k-1, Ho, Wo) uint8 (``k`` class ids by decreasing proportion,
        slot 0 = argmax, then slots 1..k-1's proportions; ``planes.decode_planes``),
        ``mass`` (256,) float64 the sum over pixels of each id's stored proportion, and
        ``truncated`` (Ho, Wo) float32 the mass dropped by keeping only ``k`` classes.
        No dense one-hot: cost grows with pixels, not classes (``softprep.kernels``).
        ``changes``: ``change_counts(label)`` if already computed (shareable between levels).
        """
        from softprep import kernels  # compiled: numba is imported only when needed

        across, down = change_counts(label) if changes is None else changes
        planes, units, truncated = kernels.soft_planes(
            label, across, down, self.y.index, self.y.weight, self.x.index, self.x.weight, k, TOTAL
        )
        return planes, units / TOTAL, truncated


def change_counts(label: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(across, down): an (H, W) label's running 2-D change counts, (H+1, W) uint16 each,
    modulo 2**16 (``kernels.change_counts``)."""
    from softprep import kernels  # compiled: numba is imported only when needed

    across = np.empty((label.shape[0] + 1, label.shape[1]), np.uint16)
    down = np.empty_like(across)
    kernels.change_counts(label, across, down)
    return across, down


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
