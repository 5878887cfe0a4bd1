"""Losses on top-K soft labels (after ``softtrain.data.densify``).

Soft cross-entropy ``-sum_c q_c log p_c`` has the gradient of KL(q || p); KL itself is
``CE - H(q)`` and is reported, not optimised. Computed in float32 from ``log_softmax``.

Void: a pixel whose void mass exceeds 0.5 is ignored; otherwise its non-void mass is
renormalised to 1. Multi-class (MC) pixels hold more than one non-void class; with
``mc="exclude"`` they are ignored, and the loss equals hard cross-entropy with
``ignore_index=255`` on the argmax label. The mean is over the pixels kept (like
``F.cross_entropy`` with ``ignore_index``), not ``kl_div``'s ``batchmean``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from softprep.manifest import VOID
from softtrain.config import LOSSES, MC_MODES
from softtrain.data import check_class_ids, densify, hard_label, multi_class_mask


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, what is optimised
    kl: torch.Tensor  # scalar, KL(q || p) per kept pixel (equals loss for one-hot targets)
    kept: torch.Tensor  # scalar int, pixels in the mean


def soft_label_loss(
    logits: torch.Tensor,
    index: torch.Tensor,
    prob: torch.Tensor,
    loss: str = "soft",
    mc: str = "include",
) -> LossOutput:
    """Soft-label loss of a batch, a mean over the pixels kept.

    ``logits`` (B, C, H, W) float (any dtype; computed in float32) at the label's size
    (upsample first); ``index``/``prob`` (B, K, H, W) uint8 top-K soft labels as
    ``CropDataset`` gives them (ids, 255 = void; probabilities summing to 255).
    ``loss``: ``soft`` (soft cross-entropy, the gradient of KL) or ``ce-hard`` (cross-entropy
    on the argmax). ``mc``: ``include`` or ``exclude`` multi-class pixels. Raises
    ``ValueError`` for mismatched sizes or a class id >= C.
    """
    if logits.shape[-2:] != index.shape[-2:]:
        raise ValueError(
            f"logits are {tuple(logits.shape[-2:])} but labels {tuple(index.shape[-2:])}: "
            "upsample the logits to the label size (F.interpolate, bilinear) first"
        )
    if loss not in LOSSES:
        raise ValueError(f"unknown loss '{loss}'; choose from {', '.join(LOSSES)}")
    if mc not in MC_MODES:
        raise ValueError("mc must be 'include' or 'exclude'")
    logp = F.log_softmax(logits.float(), dim=1)
    num_classes = logits.shape[1]
    if loss == "ce-hard":
        check_class_ids(index, prob, num_classes)
        target = hard_label(index)
        keep = target != VOID
        if mc == "exclude":
            keep &= ~multi_class_mask(index, prob)
        target = torch.where(keep, target, 0)
        q = F.one_hot(target, num_classes).permute(0, 3, 1, 2).float()
    else:
        q, void = densify(index, prob, num_classes)
        keep = void <= 0.5
        if mc == "exclude":
            keep &= ~multi_class_mask(index, prob)
        q = q / (1.0 - void).clamp_min(1e-6).unsqueeze(1)
    mask = keep.unsqueeze(1).float()
    ce = -(q * logp * mask).sum(dim=1)  # (B, H, W)
    entropy = -(torch.special.xlogy(q, q) * mask).sum(dim=1)
    kept = keep.sum()
    denom = kept.clamp_min(1).float()
    ce_mean = ce.sum() / denom
    return LossOutput(ce_mean, (ce - entropy).sum() / denom, kept)
