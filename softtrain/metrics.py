"""Confusion matrix and the mmsegmentation metrics (aAcc, mIoU, mAcc, per-class IoU and
accuracy), accumulated with ``bincount`` (torchmetrics is the test oracle)."""

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

    def _m(self) -> np.ndarray:
        return self.matrix.double().cpu().numpy()

    def iou(self) -> np.ndarray:
        """(C,) IoU per class; NaN for classes absent from both prediction and truth."""
        m = self._m()
        tp = np.diag(m)
        union = m.sum(0) + m.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(union > 0, tp / union, np.nan)

    def accuracy(self) -> np.ndarray:
        """(C,) per-class accuracy (recall, mmseg ``Acc``); NaN for classes absent from truth."""
        m = self._m()
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(m.sum(1) > 0, np.diag(m) / m.sum(1), np.nan)

    def miou(self) -> float:
        """Mean IoU over classes present in truth or prediction (NaN if none)."""
        iou = self.iou()
        return float(np.nanmean(iou)) if np.isfinite(iou).any() else float("nan")

    def macc(self) -> float:
        """Mean per-class accuracy over classes present in truth (NaN if none)."""
        acc = self.accuracy()
        return float(np.nanmean(acc)) if np.isfinite(acc).any() else float("nan")

    def pixel_accuracy(self) -> float:
        """aAcc: correct pixels / labelled pixels."""
        m = self.matrix.double()
        return float(m.diag().sum() / m.sum().clamp_min(1))

    def labelled_pixels(self) -> int:
        return int(self.matrix.sum())


def _finite(v: float) -> float | None:
    return None if not np.isfinite(v) else float(v)


def eval_record(confusion: Confusion, names: list[str], **context) -> dict:
    """The evaluation record shared by ``metrics.jsonl``, ``eval --json`` and the CSV:
    ``aAcc``, ``mIoU``, ``mAcc`` (fractions in [0, 1]) and ``classes`` = [{class, iou, acc}],
    with ``null`` (never NaN) for a value that is not defined; ``context`` (step, split,
    level, mode, ...) is added as given."""
    rows = [
        {"class": n, "iou": _finite(i), "acc": _finite(a)}
        for n, i, a in zip(names, confusion.iou(), confusion.accuracy())
    ]
    return context | {
        "aAcc": confusion.pixel_accuracy(),
        "mIoU": _finite(confusion.miou()),
        "mAcc": _finite(confusion.macc()),
        "classes": rows,
    }
