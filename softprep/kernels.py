"""Compiled label kernels (numba): the per-pixel loops numpy cannot express cheaply.

- ``soft_topk``: top-K class proportions of every output pixel, in one pass over the
  output, with no dense one-hot and no per-class planes. An output pixel whose taps all
  hold one label (``_uniform_windows``: O(1) per pixel from running label-change counts)
  gets that label with proportion 1; the others sum their tap weights per label in a
  short list (the handful of labels under one window; each run of one label along a tap
  row is one entry) and keep the ``k`` largest. Cost grows with pixels, never with
  the number of classes.
- ``sampled_counts``: the label histogram of a nearest-neighbour grid, without building it.
- ``map_counted``, ``row_changes``: one pass each over a full-resolution label.
- ``encode_planes``: the store planes of a top-K soft label, proportions rounded to an
  exact uint8 sum (largest remainder), with the class totals they hold, in one pass
  (``softprep.quantize``).
- ``bilinear_argmax``: the argmax of a bilinearly up-sampled top-K soft label
  (``softprep.fidelity``), pixels x K, never a dense class volume.

Compiled on first use and cached on disk (``__pycache__``), so later processes, build
workers included, load them in well under a second. Callers import this module lazily,
keeping numba's import time out of commands that do not need it.
"""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def soft_topk(label, changes, yi, yw, xi, xw, k):  # pragma: no cover - compiled
    """Top-``k`` soft label of an (H, W) uint8 label map under separable weights.

    ``changes``: (H, W) int32 label changes left of each pixel in its row; ``yi``/``yw``:
    (Ho, Ty) int64 row taps and float64 weights; ``xi``/``xw``: (Wo, Tx) column taps and
    weights (rows sum to 1, tap windows contiguous). Returns ``index`` (k, Ho, Wo) uint8
    label values and ``prob`` (k, Ho, Wo) float32 proportions, by decreasing proportion
    (ties: lower label first; unused slots 0), and ``truncated`` (Ho, Wo) float32, the
    mass the dropped labels held. Negative masses (bicubic lobes) are clipped to 0 and
    the rest renormalised.
    """
    ho, ty = yi.shape
    wo, tx = xi.shape
    index = np.zeros((k, ho, wo), np.uint8)
    prob = np.zeros((k, ho, wo), np.float32)
    truncated = np.zeros((ho, wo), np.float32)
    x_lo, x_hi = np.empty(wo, np.int64), np.empty(wo, np.int64)
    for ox in range(wo):
        x_lo[ox], x_hi[ox] = xi[ox].min(), xi[ox].max()
    uniform, value = _uniform_windows(label, changes, yi, x_lo, x_hi)
    index[0] = value
    labels = np.empty(ty * tx, np.uint8)
    mass = np.empty(ty * tx, np.float64)
    for oy in range(ho):
        for ox in range(wo):
            if uniform[oy, ox]:
                prob[0, oy, ox] = 1.0
                continue
            n = 0
            a, b = x_lo[ox], x_hi[ox]
            for t in range(ty):
                y, wy = yi[oy, t], yw[oy, t]
                if wy == 0.0:
                    continue
                if changes[y, b] == changes[y, a]:  # one label: its weights sum to 1
                    n = _accumulate(labels, mass, n, label[y, a], wy)
                    continue
                run, w = label[y, xi[ox, 0]], 0.0  # taps of one label in a row: one entry
                for s in range(tx):
                    if label[y, xi[ox, s]] != run:
                        n = _accumulate(labels, mass, n, run, wy * w)
                        run, w = label[y, xi[ox, s]], 0.0
                    w += xw[ox, s]
                n = _accumulate(labels, mass, n, run, wy * w)
            total = 0.0
            for j in range(n):
                mass[j] = max(mass[j], 0.0)
                total += mass[j]
            kept = 0.0
            for slot in range(k):
                best = -1
                for j in range(n):
                    if mass[j] > 0.0 and (
                        best < 0 or _before(mass[j], labels[j], mass[best], labels[best])
                    ):
                        best = j
                if best < 0:
                    break
                index[slot, oy, ox] = labels[best]
                prob[slot, oy, ox] = mass[best] / total
                kept += mass[best]
                mass[best] = 0.0
            if n > k:  # else nothing was dropped (and rounding must not say otherwise)
                truncated[oy, ox] = max(0.0, 1.0 - kept / total)
    return index, prob, truncated


@numba.njit(cache=True, nogil=True, inline="always")
def _before(m, c, m_best, c_best):  # pragma: no cover - compiled
    """Whether label ``c`` of mass ``m`` ranks before ``c_best`` of ``m_best``: larger mass
    first; masses within 1e-9 (equal but for the order they were summed in) are a tie,
    which the lower label wins."""
    return m > m_best + 1e-9 or (m >= m_best - 1e-9 and c < c_best)


@numba.njit(cache=True, nogil=True, inline="always")
def _accumulate(labels, mass, n, c, w):  # pragma: no cover - compiled
    """Add weight ``w`` to label ``c`` in the short list ``labels[:n]``/``mass[:n]``
    (appended if new); returns the new length."""
    j = 0
    while j < n and labels[j] != c:
        j += 1
    if j == n:
        labels[n] = c
        mass[n] = 0.0
        n += 1
    mass[j] += w
    return n


@numba.njit(cache=True, nogil=True)
def _uniform_windows(label, changes, yi, a, b):  # pragma: no cover - compiled
    """Which output pixels have one label under all their taps: ((Ho, Wo) bool, (Ho, Wo)
    uint8 that label, else the label at the window's top-left tap).

    ``a``/``b``: (Wo,) first and last column tap of each output column. First along
    rows: window ``[a, b]`` of input row ``y`` is uniform iff no change lies
    inside it; ``breaks[y]`` counts rows up to ``y`` that are not uniform or differ from
    the row above. Then a window of rows ``[c, d]`` is uniform iff ``breaks`` is equal at
    ``c`` and ``d`` and row ``c`` is uniform: O(1) per output pixel after O(H Wo).
    """
    h = label.shape[0]
    ho, wo = yi.shape[0], a.shape[0]
    row_uniform = np.empty((h, wo), np.bool_)
    breaks = np.empty((h, wo), np.int32)
    for y in range(h):
        for ox in range(wo):
            u = changes[y, b[ox]] == changes[y, a[ox]]
            row_uniform[y, ox] = u
            if y == 0:
                breaks[y, ox] = 0
            else:
                same = label[y, a[ox]] == label[y - 1, a[ox]] and row_uniform[y - 1, ox]
                breaks[y, ox] = breaks[y - 1, ox] + (0 if u and same else 1)
    uniform = np.empty((ho, wo), np.bool_)
    value = np.empty((ho, wo), np.uint8)
    for oy in range(ho):
        c, d = yi[oy].min(), yi[oy].max()
        for ox in range(wo):
            uniform[oy, ox] = row_uniform[c, ox] and breaks[d, ox] == breaks[c, ox]
            value[oy, ox] = label[c, a[ox]]
    return uniform, value


@numba.njit(cache=True, nogil=True)
def sampled_counts(label, yi, xi):  # pragma: no cover - compiled
    """(256,) int64 histogram of ``label[yi][:, xi]`` for (Ho,) row and (Wo,) column
    indices (a nearest-neighbour grid), without materialising it."""
    counts = np.zeros(256, np.int64)
    for y in yi:
        row = label[y]
        for x in xi:
            counts[row[x]] += 1
    return counts


@numba.njit(cache=True, nogil=True)
def encode_planes(index, prob, total):  # pragma: no cover - compiled
    """Store planes of a top-K soft label: (K, H, W) uint8 ids and float32 proportions
    (decreasing) -> (2K-1, H, W) uint8 planes (the ids, then slots 1..K-1 rounded with
    slot 0 to sum ``total``; a pixel of one class needs no rounding) and (256,) int64 the
    units of ``total`` each id holds in them, summed over pixels."""
    k, h, w = index.shape
    planes = np.empty((2 * k - 1, h, w), np.uint8)
    planes[:k] = index
    planes[k:] = 0
    units = np.zeros(256, np.int64)
    q, rest, given = np.empty(k, np.uint8), np.empty(k, np.float64), np.empty(k, np.bool_)
    for y in range(h):
        for x in range(w):
            if k == 1 or prob[1, y, x] == 0:
                units[index[0, y, x]] += total
                continue
            _round_at(prob, y, x, total, q, rest, given)
            for j in range(k):
                units[index[j, y, x]] += q[j]
                if j > 0:
                    planes[k + j - 1, y, x] = q[j]
    return planes, units


@numba.njit(cache=True, nogil=True, inline="always")
def _round_at(prob, y, x, total, out, rest, given):  # pragma: no cover - compiled
    """(K,) uint8 ``out`` summing to exactly ``total`` from the non-negative proportions
    ``prob[:, y, x]`` (sum > 0; indexed, not sliced: a view per pixel costs more than the
    rounding): scale to ``total``, floor, then one more unit to each of the largest
    remainders (ties: lower slot first). ``rest``, ``given``: (K,) scratch."""
    k = prob.shape[0]
    s = 0.0
    for j in range(k):
        s += prob[j, y, x]
    base_sum = 0
    for j in range(k):
        p = prob[j, y, x]
        out[j], given[j] = 0, p == 0  # (unused slots of a top-K label: nothing to round)
        if p != 0:
            v = p / s * total
            out[j] = np.uint8(np.floor(v))
            rest[j] = v - np.floor(v)
            base_sum += out[j]
    for _ in range(total - base_sum):
        best = -1
        for j in range(k):
            if not given[j] and (best < 0 or rest[j] > rest[best]):
                best = j
        if best < 0:
            break
        given[best] = True
        out[best] += 1


@numba.njit(cache=True, nogil=True)
def map_counted(raw, lut):  # pragma: no cover - compiled
    """(H, W) uint8 raw label values -> (H, W) uint8 ``lut[raw]`` and the (256,) int64
    histogram of the raw values, in one pass."""
    h, w = raw.shape
    out = np.empty((h, w), np.uint8)
    counts = np.zeros(256, np.int64)
    for y in range(h):
        for x in range(w):
            v = raw[y, x]
            counts[v] += 1
            out[y, x] = lut[v]
    return out, counts


@numba.njit(cache=True, nogil=True)
def row_changes(label):  # pragma: no cover - compiled
    """(H, W) int32: how many label changes lie left of each pixel in its row."""
    h, w = label.shape
    changes = np.empty((h, w), np.int32)
    for y in range(h):
        n = 0
        changes[y, 0] = 0
        for x in range(1, w):
            n += label[y, x] != label[y, x - 1]
            changes[y, x] = n
    return changes


@numba.njit(cache=True, nogil=True)
def bilinear_argmax(index, prob, y0, y1, wy, x0, x1, wx, void):  # pragma: no cover - compiled
    """Argmax of the bilinear up-sampling of a top-K soft label, without a dense volume.

    ``index``/``prob``: (K, h, w) uint8 class ids and probabilities (any scale); ``y0``,
    ``y1``: (H,) int64 source rows of each output row and ``wy`` (H,) float64 the weight of
    ``y1``; likewise ``x0``, ``x1``, ``wx`` for columns. Returns (H, W) uint8: the non-void
    class of largest up-sampled probability (ties: lower id), ``void`` where only void has
    mass. Each output pixel sums at most 4K (class, weight) pairs: cost pixels x K.
    """
    k = index.shape[0]
    ho, wo = y0.shape[0], x0.shape[0]
    out = np.empty((ho, wo), np.uint8)
    labels = np.empty(4 * k, np.uint8)
    mass = np.empty(4 * k, np.float64)
    for oy in range(ho):
        for ox in range(wo):
            n = 0
            for corner in range(4):
                sy = y1[oy] if corner >= 2 else y0[oy]
                sx = x1[ox] if corner % 2 else x0[ox]
                w = (wy[oy] if corner >= 2 else 1.0 - wy[oy]) * (
                    wx[ox] if corner % 2 else 1.0 - wx[ox]
                )
                if w == 0.0:
                    continue
                for slot in range(k):
                    p = prob[slot, sy, sx]
                    c = index[slot, sy, sx]
                    if p == 0 or c == void:
                        continue
                    n = _accumulate(labels, mass, n, c, w * p)
            best = -1
            for j in range(n):
                if best < 0 or _before(mass[j], labels[j], mass[best], labels[best]):
                    best = j
            out[oy, ox] = labels[best] if best >= 0 else void
    return out
