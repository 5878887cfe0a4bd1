"""Supervised training on the store's (soft, or weak) labels: the default regime.

The loss is soft cross-entropy on the densified soft labels, or hard CE on their argmax
(``--loss ce-hard``); on a weak store ``--weak-loss`` adds its term on the unlabelled
pixels from step ``--weak-start`` on (``softtrain.weak_losses``).
"""

from __future__ import annotations

import torch.nn.functional as F

from softtrain.losses import LossOutput, class_weights
from softtrain.regime import Forward, Regime
from softtrain.weak_losses import training_loss


class Supervised(Regime):
    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        counts = data.store.full_counts()[data.train.items].sum(0)  # (C + 1,) pixels
        weights = class_weights(cfg.optim.class_weights, counts, data.store.num_classes)
        self.criterion = training_loss(cfg, weights)

    def loss(self, forward: Forward, batch: dict, step: int, micro: int) -> LossOutput:
        index = batch["index"]
        logits = upsample(forward(batch["image"]), index.shape[-2:])
        return self.criterion(logits, index, batch["prob"], batch["colour"], step)


def upsample(logits, size):
    """(B, C, h', w') logits -> (B, C, *size) float32, bilinearly (the loss's resolution)."""
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
