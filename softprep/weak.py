"""Weak labels: thin a training label to what a weakly-supervised protocol annotates.

- ``blocks:R[:SIZE]``: the label is kept in a seeded random share R of the grid blocks of
  SIZE x SIZE pixels (default 64) and void elsewhere (the block-wise protocol of Zhang and
  Boykov, CVPR 2024, for Cityscapes and ADE20K).

Only training splits are thinned (``softprep build --weak``); evaluation splits keep their
full labels. Thinning depends on (seed, image number) alone: builds are deterministic and
resumable. User scribble files need no protocol: a manifest whose unlabelled value maps to
void (255) builds a weak store as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from softprep.manifest import VOID

PROTOCOLS = ("blocks",)


@dataclass(frozen=True)
class WeakProtocol:
    kind: str
    share: float
    block: int = 64

    @classmethod
    def parse(cls, text: str) -> WeakProtocol:
        """``"blocks:0.1"`` or ``"blocks:0.1:32"``."""
        kind, _, rest = text.partition(":")
        if kind not in PROTOCOLS or not rest:
            raise ValueError(f"weak protocol '{text}': use blocks:SHARE[:SIZE], e.g. blocks:0.1")
        share, _, block = rest.partition(":")
        try:
            protocol = cls(kind, float(share), int(block) if block else 64)
        except ValueError:
            raise ValueError(
                f"weak protocol '{text}': SHARE is a number, SIZE an integer"
            ) from None
        if not 0 < protocol.share <= 1 or protocol.block < 1:
            raise ValueError(f"weak protocol '{text}': SHARE in (0, 1], SIZE >= 1")
        return protocol

    def thin(self, label: np.ndarray, seed: int, image: int) -> np.ndarray:
        """(H, W) uint8 train ids -> the same with void outside the kept blocks."""
        h, w = label.shape
        rows, cols = -(-h // self.block), -(-w // self.block)
        n = rows * cols
        rng = np.random.default_rng([seed, image])
        kept = np.zeros(n, bool)
        kept[rng.permutation(n)[: max(1, round(self.share * n))]] = True
        mask = np.repeat(np.repeat(kept.reshape(rows, cols), self.block, 0), self.block, 1)
        return np.where(mask[:h, :w], label, VOID).astype(np.uint8)
