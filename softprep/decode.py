"""Decodes: how class probabilities become labels, fitted on one split for its mIoU.

Every decode here is a per-class offset on log probabilities, ``label = argmax_c
log p_c + b_c`` (computed as ``argmax_c w_c p_c`` with ``w = exp(b)``, so ``b = 0`` is
exactly the plain argmax). Kinds:

- ``argmax``: ``b = 0``;
- ``prior``: ``b = -tau * log prior`` (post-hoc logit adjustment, Menon et al. 2021),
  ``prior`` the class shares of the fit split's truth, ``tau`` chosen on it from ``TAUS``;
- ``bias``: ``b`` fitted for the fit split's mIoU by coordinate ascent from ``b = 0``,
  one class at a time over the grid ``BIAS_GRID``, each step evaluated for every grid
  value at once from the pixels' switching thresholds, then accepted only if the exact
  mIoU rises: it never scores the fit split below the argmax. With two classes a bias is a
  per-class probability threshold (threshold tuning for IoU); it is vector scaling's bias
  (Guo et al. 2017) fitted for mIoU instead of likelihood.

Temperature scaling divides every log probability by one number, which leaves each argmax
unchanged: it is no decode. A fitted ``Decode`` is a small dict (``to_dict``), stored in
a report or a checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from softprep.manifest import VOID

KINDS = ("argmax", "prior", "bias")
TAUS = tuple(np.round(np.arange(0.0, 1.0001, 0.05), 2))
BIAS_GRID = np.round(np.arange(-4.0, 4.0001, 0.1), 1)


@dataclass(frozen=True)
class Decode:
    """``label = argmax_c w_c p_c``, ``w = exp(bias)``; ``bias`` (C,) offsets on log p."""

    kind: str
    bias: tuple[float, ...]
    fitted_on: str | None = None
    tau: float | None = None

    @property
    def weights(self) -> np.ndarray:
        """(C,) float64 ``exp(bias)``: 1.0 exactly where the bias is 0."""
        return np.exp(np.asarray(self.bias, np.float64))

    def apply(self, probs: np.ndarray) -> np.ndarray:
        """(C, H, W) float probabilities (or any non-negative class masses) -> (H, W) uint8
        labels; ties go to the lower class id, ``VOID`` (255) where every class is 0."""
        scores = probs * self.weights.reshape(-1, *(1,) * (probs.ndim - 1))
        labels = scores.argmax(axis=0).astype(np.uint8)
        return np.where(scores.max(axis=0) > 0, labels, VOID).astype(np.uint8)

    def to_dict(self) -> dict:
        return {"kind": self.kind, "bias": list(self.bias), "fitted_on": self.fitted_on,
                "tau": self.tau}  # fmt: skip

    @classmethod
    def from_dict(cls, doc: dict) -> Decode:
        return cls(doc["kind"], tuple(float(b) for b in doc["bias"]), doc.get("fitted_on"),
                   doc.get("tau"))  # fmt: skip


def argmax_decode(num_classes: int) -> Decode:
    return Decode("argmax", (0.0,) * num_classes)


def iou(confusion: np.ndarray) -> np.ndarray:
    """(..., C, C+1) confusion (rows truth, columns label, the last "void") -> (..., C)
    float64 IoU, NaN where a class is neither true nor labelled."""
    c = confusion.shape[-2]
    tp = np.diagonal(confusion[..., :c], axis1=-2, axis2=-1)
    union = confusion.sum(-1) + confusion[..., :c].sum(-2) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / union, np.nan)


def miou(confusion: np.ndarray) -> np.ndarray:
    """(..., C, C+1) confusion -> mean IoU over the classes that occur (0 if none)."""
    v = iou(confusion)
    seen = np.isfinite(v)
    return np.where(seen, v, 0).sum(-1) / np.maximum(seen.sum(-1), 1)


class DecodeSample:
    """The statistic decodes are fitted from: the pixels of one split with their truth.

    Pixels whose label no decode can change (mass in at most one class) are counted once
    in ``fixed`` (C, C+1); the others keep their probabilities, at most ``max_pixels``
    per image (a seeded uniform draw, each kept pixel weighted by how many it stands for;
    ``None``: all, and then every figure is exact).
    """

    def __init__(self, num_classes: int, max_pixels: int | None = None, seed: int = 0):
        self.num_classes = num_classes
        self.max_pixels = max_pixels
        self.fixed = np.zeros((num_classes, num_classes + 1), np.float64)
        self._rng = np.random.default_rng(seed)
        self._probs, self._truth, self._weight = [], [], []

    def add(self, probs: np.ndarray, truth: np.ndarray) -> None:
        """One image: ``probs`` (C, H, W) float class probabilities, ``truth`` (H, W) uint8
        train ids (``VOID`` pixels are left out)."""
        c = self.num_classes
        keep = truth.ravel() != VOID
        p = probs.reshape(c, -1)[:, keep].T.astype(np.float32)
        y = truth.ravel()[keep]
        mixed = np.count_nonzero(p > 0, axis=1) > 1
        pure = Decode("argmax", (0.0,) * c).apply(p[~mixed].T)
        self.fixed += _confusion(y[~mixed], pure, c)
        p, y = p[mixed], y[mixed]
        weight = 1.0
        if self.max_pixels is not None and len(y) > self.max_pixels:
            pick = np.sort(self._rng.choice(len(y), self.max_pixels, replace=False))
            weight = len(y) / self.max_pixels
            p, y = p[pick], y[pick]
        self._probs.append(p)
        self._truth.append(y)
        self._weight.append(np.full(len(y), weight))

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The kept pixels: probabilities (N, C) float32, truth (N,) uint8, weights (N,)."""
        c = self.num_classes
        if not self._probs:
            return np.zeros((0, c), np.float32), np.zeros(0, np.uint8), np.zeros(0)
        return (np.concatenate(self._probs), np.concatenate(self._truth),
                np.concatenate(self._weight))  # fmt: skip

    def prior(self) -> np.ndarray:
        """(C,) float64 class shares of the truth."""
        _, y, w = self.arrays()
        counts = self.fixed.sum(1) + np.bincount(y, w, minlength=self.num_classes)
        return counts / max(counts.sum(), 1e-12)

    def confusion(self, decode: Decode) -> np.ndarray:
        """(C, C+1) float64 confusion of the split's pixels labelled by ``decode``."""
        p, y, w = self.arrays()
        return self.fixed + _confusion(y, decode.apply(p.T), self.num_classes, w)


def _confusion(truth, labels, c: int, weights=None) -> np.ndarray:
    pred = np.where(labels == VOID, c, labels).astype(np.int64)
    flat = truth.astype(np.int64) * (c + 1) + pred
    return np.bincount(flat, weights, minlength=c * (c + 1)).reshape(c, c + 1).astype(np.float64)


def prior_decode(prior: np.ndarray, tau: float, fitted_on: str | None = None) -> Decode:
    """``b = -tau * log prior``; classes of prior 0 get the smallest non-zero prior's."""
    prior = np.asarray(prior, np.float64)
    floor = prior[prior > 0].min() if (prior > 0).any() else 1.0
    bias = -tau * np.log(np.maximum(prior, floor))
    return Decode("prior", tuple(float(b) for b in bias + 0.0), fitted_on, float(tau))


def fit_decode(
    sample: DecodeSample, kind: str, fitted_on: str | None = None, rounds: int = 6
) -> Decode:
    """The decode of ``kind`` with the best mIoU on ``sample`` (see the module notes)."""
    if kind not in KINDS:
        raise ValueError(f"unknown decode '{kind}'; choose from {', '.join(KINDS)}")
    c = sample.num_classes
    if kind == "argmax":
        return Decode("argmax", (0.0,) * c, fitted_on)
    if kind == "prior":
        prior = sample.prior()
        scored = [(miou(sample.confusion(prior_decode(prior, t))), -t) for t in TAUS]
        tau = -max(scored)[1]
        return prior_decode(prior, tau, fitted_on)
    return _fit_bias(sample, fitted_on, rounds)


def _fit_bias(sample: DecodeSample, fitted_on: str | None, rounds: int) -> Decode:
    """Coordinate ascent on the per-class bias for the sample's mIoU."""
    c = sample.num_classes
    p, y, w = sample.arrays()
    with np.errstate(divide="ignore"):
        logp = np.log(p.astype(np.float64))
    bias = np.zeros(c)
    best = float(miou(sample.confusion(Decode("bias", tuple(bias)))))
    for _ in range(rounds):
        improved = False
        for k in range(c):
            candidate = _best_bias(logp, y, w, bias, k, sample.fixed)
            if candidate == bias[k]:
                continue
            trial = bias.copy()
            trial[k] = candidate
            score = float(miou(sample.confusion(Decode("bias", tuple(trial)))))
            if score > best + 1e-12:
                bias, best, improved = trial, score, True
        if not improved:
            break
    return Decode("bias", tuple(float(b) for b in bias), fitted_on)


def _best_bias(logp, y, w, bias, k: int, fixed) -> float:
    """The value of ``bias[k]`` on ``BIAS_GRID`` (or the current one) with the best mIoU,
    all grid values scored in one pass: a pixel takes class ``k`` once ``bias[k]`` exceeds
    its threshold (its best other score minus ``log p_k``) and its best other class
    otherwise. Ties of mIoU keep the value nearest the current one."""
    n, c = logp.shape
    grid = np.union1d(BIAS_GRID, [bias[k]])
    scores = logp + bias
    scores[:, k] = -np.inf
    other = scores.argmax(axis=1)
    threshold = scores[np.arange(n), other] - logp[:, k]  # +inf where p_k = 0
    threshold = np.where(k < other, np.nextafter(threshold, -np.inf), threshold)  # ties: lower id
    first = np.searchsorted(grid, threshold, side="right")  # switched at grid[first:]
    g = len(grid)
    hist = np.bincount((first * c + y) * c + other, w, minlength=(g + 1) * c * c)
    switched = np.cumsum(hist.reshape(g + 1, c, c), axis=0)[:g]
    base = fixed + _confusion(y, other, c, w)
    conf = np.repeat(base[None], g, axis=0)
    conf[:, :, :c] -= switched
    conf[:, :, k] += switched.sum(axis=2)
    score = miou(conf)
    top = np.flatnonzero(score >= score.max() - 1e-12)
    return float(grid[top[np.abs(grid[top] - bias[k]).argmin()]])
