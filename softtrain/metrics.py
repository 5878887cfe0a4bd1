"""Confusion matrix and IoU, accumulated with ``bincount`` (torchmetrics is the test oracle)."""

from __future__ import annotations

import numpy as np
import torch

from softprep.manifest import VOID


class Confusion:
    """A (C, C) int64 confusion matrix, rows = ground truth, columns = prediction."""

    def __init__(self, num_classes: int, device="cpu"):
        self.num_classes = num_classes
        self.matrix = torch.zeros((num_classes, num_classes), dtype=torch.int64, device=device)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """``pred``, ``target``: (...) integer maps of equal shape; target 255 is ignored."""
        keep = target != VOID
        c = self.num_classes
        codes = target[keep].long() * c + pred[keep].long()
        self.matrix += torch.bincount(codes, minlength=c * c).reshape(c, c)

    def iou(self) -> np.ndarray:
        """(C,) IoU per class; NaN for classes absent from both prediction and truth."""
        m = self.matrix.double().cpu().numpy()
        tp = np.diag(m)
        union = m.sum(0) + m.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def miou(self) -> float:
        """Mean IoU over classes present in truth or prediction."""
        return float(np.nanmean(self.iou()))

    def pixel_accuracy(self) -> float:
        m = self.matrix.double()
        return float(m.diag().sum() / m.sum().clamp_min(1))
