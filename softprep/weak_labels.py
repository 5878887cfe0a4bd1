"""Weak labels: thin a training label to what a weakly-supervised protocol annotates.

- ``blocks:R[:SIZE]``: the label is kept in a seeded random share R of the grid blocks of
  SIZE x SIZE pixels (default 64) and void elsewhere (the block-wise protocol of Zhang and
  Boykov, CVPR 2024, for Cityscapes and ADE20K).
- ``scribbles:R[:WIDTH]``: strokes along the skeletons of the labelled segments (each
  class's mask, skeletonised by scikit-image), whole strokes kept in seeded random order
  until they cover a share R of the total skeleton length, drawn WIDTH pixels wide
  (default 3); void elsewhere.

Only training splits are thinned (``softprep build --weak``); evaluation splits keep their
full labels. Thinning depends on (seed, image number) alone: builds are deterministic and
resumable. User scribble files need no protocol: a manifest whose unlabelled value maps to
void (255) builds a weak store as it is.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.util import find_spec

import numpy as np

from softprep.manifest import VOID

PROTOCOLS = ("blocks", "scribbles")
DEFAULT_SIZE = {"blocks": 64, "scribbles": 3}
MAX_SIZE = {"blocks": 8192, "scribbles": 255}  # pixels: beyond, a typo, not a protocol


@dataclass(frozen=True)
class WeakProtocol:
    kind: str
    share: float
    size: int  # block side (blocks) or stroke width (scribbles), pixels

    @classmethod
    def parse(cls, text: str) -> WeakProtocol:
        """``"blocks:0.1"``, ``"blocks:0.1:32"``, ``"scribbles:0.2"``, ``"scribbles:0.2:5"``."""
        kind, _, rest = text.partition(":")
        if kind not in PROTOCOLS or not rest:
            raise ValueError(
                f"weak protocol '{text}': use blocks:SHARE[:SIZE] or scribbles:SHARE[:WIDTH], "
                "e.g. blocks:0.1"
            )
        share, _, size = rest.partition(":")
        try:
            protocol = cls(kind, float(share), int(size) if size else DEFAULT_SIZE[kind])
        except ValueError:
            raise ValueError(
                f"weak protocol '{text}': SHARE is a number, SIZE an integer"
            ) from None
        if not 0 < protocol.share <= 1:
            raise ValueError(f"weak protocol '{text}': SHARE must be in (0, 1]")
        if not 1 <= protocol.size <= MAX_SIZE[kind]:
            what = "block side SIZE" if kind == "blocks" else "stroke WIDTH"
            raise ValueError(
                f"weak protocol '{text}': the {what} must be 1 to {MAX_SIZE[kind]} pixels"
            )
        if kind == "scribbles" and find_spec("skimage") is None:
            raise ValueError("--weak scribbles needs scikit-image: pip install 'softprep[weak]'")
        return protocol

    def thin(self, label: np.ndarray, seed: int, image: int) -> np.ndarray:
        """(H, W) uint8 train ids -> the same with void outside what the protocol keeps."""
        rng = np.random.default_rng([seed, image])
        keep = (
            self._blocks(label.shape, rng) if self.kind == "blocks" else self._scribbles(label, rng)
        )
        return np.where(keep, label, VOID).astype(np.uint8)

    def _blocks(self, hw: tuple[int, int], rng) -> np.ndarray:
        h, w = hw
        rows, cols = -(-h // self.size), -(-w // self.size)
        n = rows * cols
        kept = np.zeros(n, bool)
        kept[rng.permutation(n)[: max(1, round(self.share * n))]] = True
        block_row, block_col = np.arange(h) // self.size, np.arange(w) // self.size
        return kept.reshape(rows, cols)[block_row[:, None], block_col[None, :]]

    def _scribbles(self, label: np.ndarray, rng) -> np.ndarray:
        from skimage.measure import label as components  # checked by ``parse``
        from skimage.morphology import dilation, footprint_rectangle, skeletonize

        strokes = np.zeros(label.shape, np.int32)  # stroke number + 1, 0 = none
        for c in np.unique(label):
            if c == VOID:
                continue
            skeleton = skeletonize(label == c)
            parts = components(skeleton, connectivity=2)
            strokes[parts > 0] = parts[parts > 0] + strokes.max()
        lengths = np.bincount(strokes.ravel())[1:]
        if not len(lengths):
            return np.zeros(label.shape, bool)
        kept, total = [], 0
        for s in rng.permutation(len(lengths)):
            if total >= self.share * lengths.sum():
                break
            kept.append(s + 1)
            total += lengths[s]
        lines = np.isin(strokes, kept)
        square = footprint_rectangle((self.size, self.size), decomposition="separable")
        wide = dilation(lines, square)  # a row then a column: cost linear in WIDTH
        return wide & (label != VOID)  # strokes stay within labelled pixels
