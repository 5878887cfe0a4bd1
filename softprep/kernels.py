"""Compiled label kernels (numba): the per-pixel loops numpy cannot express cheaply.

- ``soft_planes``: the store planes of the top-K soft label of every output pixel, in
  one pass over the output, with no dense one-hot, no per-class planes and no float
  intermediate volume. An output pixel whose taps all hold one label (found in O(1) from
  running 2-D label-change counts, ``change_counts``, in windows of under 2**16 taps) gets
  that label with proportion 1; the others sum their tap weights per label in a short
  list (the handful of labels under one window; each run of one label along a tap row is
  one entry), keep the ``k`` largest and round them to an exact uint8 sum (largest
  remainder, ``softprep.planes``), counting the units each label holds. Cost grows with
  pixels, never with the number of classes.
- ``sampled_counts``: the label histogram of a nearest-neighbour grid, without building it.
- ``map_counted``, ``change_counts``: one pass each over a full-resolution label.
- ``bilinear_argmax``: the argmax of a bilinearly up-sampled top-K soft label
  (``softprep.fidelity``), pixels x K, never a dense class volume.

Compiled on first use and cached on disk (``__pycache__``), so later processes, build
workers included, load them in well under a second. Callers import this module lazily,
keeping numba's import time out of commands that do not need it.
"""

from __future__ import annotations

import os

import numba
import numpy as np

from softprep import OWN_PROCESS


def _skip_blas_probe() -> None:
    """In softprep's own processes only (the CLI and its workers, ``OWN_PROCESS`` set): tell
    numba there is no BLAS. Its first kernel load in a process imports ``numba.np.arraymath``,
    which probes for BLAS by importing ``scipy.linalg`` (0.08 s per process where scipy is
    installed, measured: the kernels' load 0.34 -> 0.26 s); these kernels use no BLAS. numba then
    behaves as without scipy (compiled ``np.dot``/``np.linalg`` unavailable), which is why a
    process that merely imports softprep (a user's) is left alone."""
    if os.environ.get(OWN_PROCESS) != "1":
        return
    import numba.np.linalg

    def no_blas() -> None:
        raise ImportError("softprep's compiled kernels use no BLAS")

    numba.np.linalg.ensure_blas = no_blas  # what numba.np.arraymath binds when it loads


_skip_blas_probe()


@numba.njit(cache=True, nogil=True)
def soft_planes(label, across, down, yi, yw, xi, xw, k, total):  # pragma: no cover - compiled
    """Store planes of the top-``k`` soft label of an (H, W) uint8 label map under
    separable weights, in one pass over the output.

    ``across``/``down``: the label's (H+1, W) uint16 running change counts, kept modulo
    2**16 (``change_counts``): exact for any window of fewer than 2**16 taps; larger ones
    (down-sampling by 128x per axis with bilinear, 64x bicubic, 256x area) are never taken
    as one label whole, each tap row still is;
    ``yi``/``yw``: (Ho, Ty) int64 row taps and float64 weights; ``xi``/``xw``: (Wo, Tx)
    column taps and weights (rows sum to 1). Returns:

    - ``planes`` (2k-1, Ho, Wo) uint8: the ``k`` label values by decreasing proportion
      (ties: lower label first; unused slots 0), then slots 1..k-1's proportions in units
      of 1/``total``; slot 0 holds the rest. The kept mass is renormalised and rounded by
      largest remainder (ties: lower slot first), so the units sum to ``total`` exactly and
      each is within one unit of the renormalised proportion. A pixel of one label needs no
      rounding: its proportion planes are 0.
    - ``units`` (256,) int64: the units each label value holds in the planes, over pixels.
    - ``truncated`` (Ho, Wo) float32: the mass the dropped labels held.

    Negative masses (bicubic lobes) are clipped to 0 and the rest renormalised.
    """
    ho, ty = yi.shape
    wo, tx = xi.shape
    planes = np.zeros((2 * k - 1, ho, wo), np.uint8)
    units = np.zeros(256, np.int64)
    truncated = np.zeros((ho, wo), np.float32)
    x_lo, x_hi = np.empty(wo, np.int64), np.empty(wo, np.int64)
    for ox in range(wo):
        x_lo[ox], x_hi[ox] = xi[ox].min(), xi[ox].max()
    labels, mass = np.empty(ty * tx, np.uint8), np.empty(ty * tx, np.float64)
    counted = ty * tx < 1 << 16  # the counts modulo 2**16 are exact in these windows
    top, q, rest = np.empty(k, np.float64), np.empty(k, np.int64), np.empty(k, np.float64)
    run, run_length = 0, 0  # uniform pixels of one label in a row: counted once per run
    for oy in range(ho):
        c, d = yi[oy].min(), yi[oy].max()
        for ox in range(wo):
            a, b = x_lo[ox], x_hi[ox]
            v = label[c, a]
            planes[0, oy, ox] = v
            # the window [c, d] x [a, b] holds one label iff none of its rows changes label
            # inside it and column a does not change between its rows
            inside = (across[d + 1, b] - across[c, b]) - (across[d + 1, a] - across[c, a])
            if counted and inside & 0xFFFF == 0 and down[d + 1, a] == down[c + 1, a]:
                if v != run:
                    units[run] += run_length * total
                    run, run_length = v, 0
                run_length += 1
                continue
            n = _window_masses(label, across, yi, yw, oy, xi, xw, ox, a, b, labels, mass)
            whole, kept, m = 0.0, 0.0, 0
            for j in range(n):
                mass[j] = max(mass[j], 0.0)
                whole += mass[j]
            while m < k:  # the k largest, in order
                best = -1
                for j in range(n):
                    if mass[j] > 0.0 and (
                        best < 0 or _before(mass[j], labels[j], mass[best], labels[best])
                    ):
                        best = j
                if best < 0:
                    break
                planes[m, oy, ox], top[m] = labels[best], mass[best]
                if m > 0 and top[m] >= top[m - 1] - 1e-9:  # a tie (``_before``): made exact,
                    top[m] = top[m - 1]  # so that rounding keeps the slot order
                kept += top[m]
                mass[best] = 0.0
                m += 1
            if n > k:  # else nothing was dropped (and rounding must not say otherwise)
                truncated[oy, ox] = max(0.0, 1.0 - kept / whole)
            _round_largest_remainder(top, m, kept, total, q, rest)
            for j in range(m):
                units[planes[j, oy, ox]] += q[j]
                if j > 0:
                    planes[k + j - 1, oy, ox] = q[j]
    units[run] += run_length * total
    return planes, units, truncated


@numba.njit(cache=True, nogil=True, inline="always")
def _window_masses(label, across, yi, yw, oy, xi, xw, ox, a, b, labels, mass):  # pragma: no cover
    """Sum the tap weights of output pixel (``oy``, ``ox``) per label into the short list
    ``labels``/``mass`` (``a``/``b`` its first and last column); returns the list's length.
    Each run of one label along a tap row is one entry, a whole row of one label (no change
    inside the window: its weights sum to 1) included. One place adds to the list, written
    out here: a helper function called per run, even inlined, made this 2-3x slower
    (measured; ``bilinear_argmax`` 4.7x)."""
    n = 0
    tx = xi.shape[1]
    for t in range(yi.shape[1]):
        y, wy = yi[oy, t], yw[oy, t]
        if wy == 0.0:
            continue
        inside = (across[y + 1, b] - across[y, b]) - (across[y + 1, a] - across[y, a])
        one = b - a < 1 << 16 and inside & 0xFFFF == 0  # a row holds at most b - a changes
        s = 0
        while s < tx:  # one run of label c per turn
            c, w = label[y, xi[ox, s]], 0.0
            if one:
                w, s = 1.0, tx
            while s < tx and label[y, xi[ox, s]] == c:
                w += xw[ox, s]
                s += 1
            j = 0
            while j < n and labels[j] != c:
                j += 1
            if j == n:
                labels[n], mass[n] = c, 0.0
                n += 1
            mass[j] += wy * w
    return n


@numba.njit(cache=True, nogil=True, inline="always")
def _round_largest_remainder(top, m, kept, total, q, rest):  # pragma: no cover - compiled
    """``q[:m]`` (int64) summing to exactly ``total`` from the positive masses ``top[:m]``
    of sum ``kept``: scale to ``total``, floor, then one more unit to each of the largest
    remainders (ties: lower slot first). ``rest``: (k,) scratch."""
    short = total
    for j in range(m):
        v = top[j] / kept * total
        q[j] = np.int64(np.floor(v))
        rest[j] = v - q[j]
        short -= q[j]
    for _ in range(short):
        best = -1
        for j in range(m):
            if rest[j] >= 0.0 and (best < 0 or rest[j] > rest[best]):
                best = j
        if best < 0:
            break
        rest[best] = -1.0
        q[best] += 1


@numba.njit(cache=True, nogil=True, inline="always")
def _before(m, c, m_best, c_best):  # pragma: no cover - compiled
    """Whether label ``c`` of mass ``m`` ranks before ``c_best`` of ``m_best``: larger mass
    first; masses within 1e-9 (equal but for the order they were summed in) are a tie,
    which the lower label wins."""
    return m > m_best + 1e-9 or (m >= m_best - 1e-9 and c < c_best)


@numba.njit(cache=True, nogil=True)
def sampled_counts(label, yi, xi):  # pragma: no cover - compiled
    """(256,) int64 histogram of ``label[yi][:, xi]`` for (Ho,) row and (Wo,) column
    indices (a nearest-neighbour grid), without materialising it. Four samples at a time
    into four histograms, as ``map_counted`` (3x faster on Cityscapes-size labels)."""
    counts = np.zeros((4, 256), np.int64)
    n = xi.shape[0]
    for y in yi:
        row = label[y]
        s = 0
        while s + 4 <= n:
            counts[0, row[xi[s]]] += 1
            counts[1, row[xi[s + 1]]] += 1
            counts[2, row[xi[s + 2]]] += 1
            counts[3, row[xi[s + 3]]] += 1
            s += 4
        for t in range(s, n):
            counts[0, row[xi[t]]] += 1
    return counts.sum(axis=0)


@numba.njit(cache=True, nogil=True)
def map_counted(raw, lut):  # pragma: no cover - compiled
    """(H, W) uint8 raw label values -> (H, W) uint8 ``lut[raw]`` and the (256,) int64
    histogram of the raw values, in one pass. Four pixels at a time into four histograms:
    a label's long runs of one value otherwise make every count wait for the previous
    increment of the same entry (2.8x faster on Cityscapes-size labels, measured)."""
    h, w = raw.shape
    out = np.empty((h, w), np.uint8)
    counts = np.zeros((4, 256), np.int64)
    for y in range(h):
        x = 0
        while x + 4 <= w:
            a, b, c, d = raw[y, x], raw[y, x + 1], raw[y, x + 2], raw[y, x + 3]
            counts[0, a] += 1
            counts[1, b] += 1
            counts[2, c] += 1
            counts[3, d] += 1
            out[y, x], out[y, x + 1], out[y, x + 2], out[y, x + 3] = lut[a], lut[b], lut[c], lut[d]
            x += 4
        for t in range(x, w):
            counts[0, raw[y, t]] += 1
            out[y, t] = lut[raw[y, t]]
    return out, counts.sum(axis=0)


@numba.njit(cache=True, nogil=True)
def change_counts(label, across, down):  # pragma: no cover - compiled
    """Fill the running 2-D change counts of an (H, W) label, (H+1, W) uint16 each, row 0
    zero, modulo 2**16 (half the memory traffic of int32, ~1 ms per Cityscapes-size label):
    ``across[y + 1, x]``: over rows 0..y, the label changes left of column x in the row
    (a summed-area table of them); ``down[y + 1, x]``: rows 1..y of column x whose label
    differs from the row above. Any window's change count is then four reads."""
    h, w = label.shape
    across[0] = 0
    down[0] = 0
    for y in range(h):
        if y > 0:
            for x in range(w):
                down[y + 1, x] = down[y, x] + (label[y, x] != label[y - 1, x])
        else:
            down[1] = 0
        n = 0
        across[y + 1, 0] = across[y, 0]
        for x in range(1, w):
            n += label[y, x] != label[y, x - 1]
            across[y + 1, x] = across[y, x] + n


@numba.njit(cache=True, nogil=True)
def bilinear_argmax(
    index, prob, y0, y1, wy, x0, x1, wx, weight, void
):  # pragma: no cover - compiled
    """Argmax of the bilinear up-sampling of a top-K soft label, without a dense volume.

    ``index``/``prob``: (K, h, w) uint8 class ids and probabilities (any scale); ``y0``,
    ``y1``: (H,) int64 source rows of each output row and ``wy`` (H,) float64 the weight of
    ``y1``; likewise ``x0``, ``x1``, ``wx`` for columns; ``weight`` (256,) float64 a factor
    per class id (a decode, ``softprep.decode``; ones: the plain argmax). Returns (H, W)
    uint8: the non-void class of largest weighted up-sampled probability (ties: lower id),
    ``void`` where only void has mass. Each output pixel sums at most 4K (class, weight)
    pairs: cost pixels x K.
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
                    j = 0  # add w * p to c's entry (written out: see ``_window_masses``)
                    while j < n and labels[j] != c:
                        j += 1
                    if j == n:
                        labels[n], mass[n] = c, 0.0
                        n += 1
                    mass[j] += w * p
            best, best_mass = -1, 0.0
            for j in range(n):
                m = mass[j] * weight[labels[j]]
                if best < 0 or _before(m, labels[j], best_mass, labels[best]):
                    best, best_mass = j, m
            out[oy, ox] = labels[best] if best >= 0 else void
    return out
