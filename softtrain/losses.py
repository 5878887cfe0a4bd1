"""Losses on top-K soft labels (after ``softtrain.data.densify``).

Soft cross-entropy ``-sum_c q_c log p_c`` has the gradient of KL(q || p); KL itself is
``CE - H(q)`` and is reported, not optimised. Computed in float32 from ``log_softmax``.

Class weights ``w`` (mmseg's ``class_weight``): a pixel's term is ``-sum_c w_c q_c log p_c``
and the mean divides by ``sum w_c q_c`` over the kept pixels (for one-hot targets, torch's
weighted ``cross_entropy``). OHEM (mmseg's ``OHEMPixelSampler``) keeps the hard pixels:
those whose target-expected probability ``sum_c q_c p_c`` (for a one-hot target, ``p`` of
the true class) is below ``max(thresh, the min_kept-th smallest of it in the batch)``.

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
    class_weights: torch.Tensor | None = None,
    ohem: tuple[float, int] | None = None,
) -> LossOutput:
    """Soft-label loss of a batch, a mean over the pixels kept.

    ``logits`` (B, C, H, W) float (any dtype; computed in float32) at the label's size
    (upsample first); ``index``/``prob`` (B, K, H, W) uint8 top-K soft labels as
    ``CropDataset`` gives them (ids, 255 = void; probabilities summing to 255).
    ``loss``: ``soft`` (soft cross-entropy, the gradient of KL) or ``ce-hard`` (cross-entropy
    on the argmax). ``mc``: ``include`` or ``exclude`` multi-class pixels.
    ``class_weights``: (C,) float per-class weights; ``ohem``: (thresh, min_kept per image).
    Raises ``ValueError`` for mismatched sizes or a class id >= C.
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
    if ohem is not None:
        keep &= _hard_pixels(q, logp, keep, *ohem)
    mask = keep.unsqueeze(1).float()
    ce = -(q * logp * mask).sum(dim=1)  # (B, H, W)
    entropy = -(torch.special.xlogy(q, q) * mask).sum(dim=1)
    kept = keep.sum()
    denom = kept.clamp_min(1).float()
    kl = (ce - entropy).sum() / denom
    if class_weights is None:
        return LossOutput(ce.sum() / denom, kl, kept)
    w = class_weights.to(logp.device, torch.float32).view(1, -1, 1, 1)
    weighted = -(w * q * logp * mask).sum(dim=1)
    return LossOutput(weighted.sum() / (w * q * mask).sum().clamp_min(1e-12), kl, kept)


@torch.no_grad()
def _hard_pixels(q, logp, keep, thresh: float, min_kept: int) -> torch.Tensor:
    """(B, H, W) bool: OHEM's hard pixels among ``keep`` (see the module notes)."""
    confidence = (q * logp.exp()).sum(1)
    ranked = confidence[keep].sort().values
    floor = ranked[min(min_kept * keep.shape[0], ranked.numel() - 1)] if ranked.numel() else 0.0
    return confidence < max(float(floor), thresh)


def class_weights(spec: str, counts, num_classes: int) -> torch.Tensor | None:
    """(C,) float32 weights from ``--class-weights``: "" (none), ``inverse-sqrt`` (1 /
    sqrt(share) of the training pixels ``counts`` (C,), classes absent weight 0, mean 1 over
    the others) or C comma-separated numbers."""
    if not spec:
        return None
    if spec == "inverse-sqrt":
        share = torch.as_tensor(counts[:num_classes], dtype=torch.float64)
        share = share / share.sum().clamp_min(1)
        w = torch.where(share > 0, share.clamp_min(1e-12).rsqrt(), torch.zeros_like(share))
        return (w / w[share > 0].mean()).float()
    try:
        values = [float(v) for v in spec.split(",")]
    except ValueError:
        raise ValueError(
            f"--class-weights {spec}: inverse-sqrt or comma-separated numbers"
        ) from None
    if len(values) != num_classes or min(values) < 0:
        raise ValueError(
            f"--class-weights: {len(values)} values, the store has {num_classes} classes; "
            "give one non-negative weight per class"
        )
    return torch.tensor(values, dtype=torch.float32)
