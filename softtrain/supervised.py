"""Supervised training on the store's (soft, or weak) labels: the default regime.

The loss is soft cross-entropy on the densified soft labels, or hard CE on their argmax
(``--loss ce-hard``); on a weak store ``--weak-loss`` adds its term on the unlabelled
pixels from step ``--weak-start`` on (``softtrain.weak_losses``).
"""

from __future__ import annotations

import torch.nn.functional as F

from softtrain.data import valid_mask
from softtrain.losses import LossOutput, class_weights
from softtrain.regime import Forward, Regime
from softtrain.weak_losses import training_loss


class Supervised(Regime):
    def __init__(self, cfg, data):
        super().__init__(cfg, data)
        self.train_on_labels(data.train.items)

    def train_on_labels(self, items) -> None:
        """The criterion for the labels of store images ``items`` (int array): its
        ``--class-weights`` (``self.class_weights``, (C,) float32 or None) count their pixels."""
        store = self.data.store
        counts = store.full_counts()[items].sum(0)  # (C + 1,) pixels
        self.class_weights = class_weights(self.cfg.optim.class_weights, counts,
                                           store.num_classes)  # fmt: skip
        self.criterion = training_loss(self.cfg, self.class_weights)

    def loss(self, forward: Forward, batch: dict, step: int, micro: int) -> LossOutput:
        index = batch["index"]
        logits = upsample(forward(batch["image"]), index.shape[-2:])
        return self.criterion(
            logits, index, batch["prob"], batch["colour"], step, image_pixels(batch)
        )


def image_pixels(batch: dict):
    """(B, h, w) bool: the labelled crops' image pixels (``valid_mask``), which the weak
    losses keep to (their padding is void, that is "unlabelled", to them)."""
    return valid_mask(batch["size"], batch["flipped"], tuple(batch["index"].shape[-2:]))


def upsample(logits, size):
    """(B, C, h', w') logits -> (B, C, *size) float32, bilinearly (the loss's resolution)."""
    return F.interpolate(logits.float(), size=tuple(size), mode="bilinear", align_corners=False)
