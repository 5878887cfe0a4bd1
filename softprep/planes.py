"""The stored soft-label planes: top-K exact-sum uint8 quantisation, and its decoder.

A soft label with K kept classes per pixel is stored as K uint8 class ids and K uint8
probabilities that sum to exactly 255. Encoding: renormalise the kept mass to 1, scale by
255, floor, then hand the missing units to the entries with the largest remainders
(largest-remainder / Hamilton rounding). Each entry is within 1/255 of the renormalised
probability, slot order is preserved, so slot 0 stays the argmax (the hard label).

On disk (``softprep.store``) the K id planes are followed by the probabilities of slots
1..K-1; slot 0's probability is 255 minus their sum. The planes are made in one pass with
the soft label itself (``Resampler.soft_planes``, kernel ``softprep.kernels.soft_planes``);
this module holds the rule's constants and ``decode_planes``, which turns planes back into
per-class proportions.
"""

from __future__ import annotations

import numpy as np

TOTAL = 255
RULE = "top-k, renormalised, largest-remainder rounding to sum 255"


def decode_planes(planes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(..., 2K-1, H, W) uint8 store planes -> ids (..., K, H, W) uint8 and
    probabilities (..., K, H, W) uint8 summing to 255 (axis -3)."""
    k = (planes.shape[-3] + 1) // 2
    index = planes[..., :k, :, :]
    rest = planes[..., k:, :, :]
    first = TOTAL - rest.sum(axis=-3, dtype=np.int32, keepdims=True)
    return index, np.concatenate([first.astype(np.uint8), rest], axis=-3)
