"""Weak supervision (scribbles, labelled blocks): soft self-labelling with Potts relaxations
(Zhang and Boykov, "Soft Self-labeling and Potts Relaxations for Weakly-Supervised
Segmentation", CVPR 2024).

A weak store is an ordinary store whose training labels are void except where annotated;
pixels with more than half void mass are "unlabelled". With s the softmax prediction and y a
soft pseudo-label (both (B, C, H, W) distributions), p, q neighbouring pixels and
w_pq = exp(-||I_p - I_q||^2 / (2 sigma^2)) on 0..255 colour:

- Potts relaxations P(y_p, y_q) (``POTTS``): bilinear 1 - y_p.y_q; quadratic
  ||y_p - y_q||^2 / 2; normalised-quadratic 1 - y_p.y_q / (|y_p| |y_q|); and the log
  versions collision-ce -ln(y_p.y_q), collision-divergence -ln(y_p.y_q / (|y_p| |y_q|)),
  log-quadratic -ln(1 - ||y_p - y_q||^2 / 2).
- Cross-entropies H(y, s) (``XENT``): standard -sum y ln s; reverse -sum s ln y;
  collision -ln sum s y.
- ``--weak-loss`` choices (``softtrain.config.WEAK_LOSSES``): ``none``: CE on the labelled pixels only;
  ``potts``: that + lambda * the Potts relaxation of the predictions themselves (dense
  Potts, the baseline); ``self-label``: that + eta * H(y, s) averaged over the unlabelled
  pixels, with y solved, for the fixed
  network, by ``steps`` gradient-descent steps on y = softmax(z) (z initialised from the
  logits, labelled pixels reset to their label every step) minimising
  eta * H(y, s) + lambda * sum w P(y).

Pair terms are averaged per pixel (the paper sums them), so lambda does not depend on the
crop size. ``valid`` (B, H, W) bool marks image pixels (``softtrain.data.valid_mask``; None:
all): the padding of a crop larger than its image is in no pair, no H term and no average.
Everything here runs in float32 on the training device, batched.
"""

from __future__ import annotations

import math

import torch

from softtrain.config import FitConfig, WeakOptions
from softtrain.data import densify
from softtrain.losses import LossOutput, soft_label_loss

EPS = 1e-8


def _shifts(neighbours: int) -> list[tuple[int, int]]:
    return [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if neighbours == 8 else [])


def _pair(x: torch.Tensor, dy: int, dx: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(p, q) views of (..., H, W) with q = p shifted by (dy, dx)."""
    h, w = x.shape[-2:]
    p = x[..., : h - dy, max(0, -dx) : w - max(0, dx)]
    q = x[..., dy:, max(0, dx) : w + min(0, dx)]
    return p, q


def affinities(
    image: torch.Tensor, sigma: float, neighbours: int = 4, valid: torch.Tensor | None = None
) -> list[torch.Tensor]:
    """w_pq per neighbour direction: list of (B, H', W') float32 from (B, 3, H, W) colour;
    0 for a pair with a pixel outside ``valid``."""
    image = image.float()
    out = []
    for dy, dx in _shifts(neighbours):
        p, q = _pair(image, dy, dx)
        w = torch.exp(-((p - q) ** 2).sum(1) / (2 * sigma**2))
        if valid is not None:
            vp, vq = _pair(valid, dy, dx)
            w = w * (vp & vq)
        out.append(w)
    return out


def _pixels(valid: torch.Tensor | None, like: torch.Tensor):
    """The pixels averaged over: ``valid``'s count, else every pixel of ``like`` (B, C, H, W)."""
    if valid is None:
        return like.shape[0] * like.shape[-2] * like.shape[-1]
    return valid.sum().clamp_min(1)


def _mean(values: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """(B, H, W) -> their mean over ``valid`` (all if None)."""
    return values.mean() if valid is None else (values * valid).sum() / valid.sum().clamp_min(1)


def potts_pairs(kind: str, yp: torch.Tensor, yq: torch.Tensor) -> torch.Tensor:
    """P(y_p, y_q) for (B, C, ...) distributions -> (B, ...)."""
    dot = (yp * yq).sum(1)
    if kind == "bilinear":
        return 1 - dot
    if kind == "collision-ce":
        return -torch.log(dot.clamp_min(EPS))
    norms = (yp.norm(dim=1) * yq.norm(dim=1)).clamp_min(EPS)
    if kind == "normalised-quadratic":
        return 1 - dot / norms
    if kind == "collision-divergence":
        return -torch.log((dot / norms).clamp_min(EPS))
    half_sq = ((yp - yq) ** 2).sum(1) / 2
    if kind == "quadratic":
        return half_sq
    if kind == "log-quadratic":
        return -torch.log((1 - half_sq).clamp_min(EPS))
    raise ValueError(f"unknown Potts relaxation '{kind}'")


def potts(y: torch.Tensor, weights: list[torch.Tensor], kind: str, neighbours: int = 4,
          valid: torch.Tensor | None = None):  # fmt: skip
    """sum over neighbour pairs of w_pq P(y_p, y_q), per pixel of the batch (a scalar; per
    ``valid`` pixel, whose ``weights`` leave the padding out)."""
    total = y.new_zeros(())
    for (dy, dx), w in zip(_shifts(neighbours), weights):
        p, q = _pair(y, dy, dx)
        total = total + (w * potts_pairs(kind, p, q)).sum()
    return total / _pixels(valid, y)


def xent(y: torch.Tensor, s: torch.Tensor, kind: str) -> torch.Tensor:
    """H(y, s) per pixel: (B, C, H, W) distributions -> (B, H, W)."""
    if kind == "standard":
        return -(y * torch.log(s.clamp_min(EPS))).sum(1)
    if kind == "reverse":
        return -(s * torch.log(y.clamp_min(EPS))).sum(1)
    if kind == "collision":
        return -torch.log((y * s).sum(1).clamp_min(EPS))
    raise ValueError(f"unknown cross-entropy '{kind}'")


def solve_pseudo_labels(logits, target, labelled, weights, opts: WeakOptions, valid=None):
    """Soft pseudo-labels y (B, C, H, W) for a fixed network: gradient descent on z with
    y = softmax(z), from z = logits, minimising eta * mean H(y, s) + lam * Potts(y); pixels
    where ``labelled`` (B, H, W) keep ``target`` (B, C, H, W) throughout. Detached.

    Steps of ``step_lr`` (the paper's fixed step), except that a step which raised the
    objective is taken back and the step halved: a fixed step too large for the weights
    (measured: lambda 100 at 0.075) otherwise leaps onto the clamped plateau of the log
    relaxations and stays there, with pseudo-labels worse than the predictions. Decided
    on the device, without a synchronisation per step. Returns the last accepted y."""
    s = logits.detach().float().softmax(1)
    z = logits.detach().float().clone()
    keep = labelled.unsqueeze(1)
    pixels = _pixels(valid, z)  # the objective is a sum over pixels, as in the paper
    step = torch.tensor(opts.step_lr, device=z.device)
    best = (torch.tensor(math.inf, device=z.device), z, torch.zeros_like(z))
    for _ in range(opts.steps):
        with torch.enable_grad():
            z.requires_grad_(True)
            y = torch.where(keep, target, z.softmax(1))
            objective = opts.eta * _mean(xent(y, s, opts.xent), valid) + opts.lam * potts(
                y, weights, opts.potts, opts.neighbours, valid
            )
            (grad,) = torch.autograd.grad(objective * pixels, z)
        with torch.no_grad():
            worse = objective > best[0]
            best = tuple(torch.where(worse, b, now) for b, now in zip(best, (objective, z, grad)))
            step = torch.where(worse, step / 2, step)
            z = best[1] - step * best[2]
    return torch.where(keep, target, best[1].detach().softmax(1))


def weak_loss(
    logits: torch.Tensor,
    index: torch.Tensor,
    prob: torch.Tensor,
    image: torch.Tensor,
    opts: WeakOptions,
    mc: str = "include",
    kind: str = "soft",
    valid: torch.Tensor | None = None,
    **labelled,
) -> LossOutput:
    """The weak-supervision loss of a batch. ``logits`` (B, C, H, W) at the label size;
    ``index``/``prob`` (B, K, H, W) uint8 soft labels (void where unlabelled); ``image``
    (B, 3, H, W) uint8 colour at the same size; ``kind``: the labelled pixels' loss
    (``soft`` or ``ce-hard``), ``labelled``: its class weights and OHEM
    (``soft_label_loss``); ``valid`` (B, H, W) bool the image pixels (None: all). ``kl``
    reports the labelled pixels' KL."""
    labelled_part = soft_label_loss(logits, index, prob, kind, mc, **labelled)
    if opts.loss == "none":
        return labelled_part
    s = logits.float().softmax(1)
    if opts.loss == "potts":
        weights = affinities(image, opts.sigma, opts.neighbours, valid)
        extra = opts.lam * potts(s, weights, opts.potts, opts.neighbours, valid)
    else:  # the paper's eq. (8): H(y, s) at the unlabelled points only (the labelled have CE)
        y, labelled = pseudo_labels(logits, index, prob, image, opts, valid)
        unlabelled = ~labelled if valid is None else valid & ~labelled
        extra = opts.eta * _mean(xent(y, s, opts.xent), unlabelled)
    return LossOutput(labelled_part.loss + extra, labelled_part.kl, labelled_part.kept)


def pseudo_labels(logits, index, prob, image, opts: WeakOptions, valid=None):
    """A batch's soft pseudo-labels for the fixed network (``solve_pseudo_labels``):
    (B, C, H, W) float32, and (B, H, W) bool the labelled pixels (more than half of their
    mass non-void), where they are the label. Arguments as for ``weak_loss``."""
    q, void = densify(index, prob, logits.shape[1])
    labelled = void <= 0.5
    target = q / (1 - void).clamp_min(EPS).unsqueeze(1)
    weights = affinities(image, opts.sigma, opts.neighbours, valid)
    return solve_pseudo_labels(logits, target, labelled, weights, opts, valid), labelled


def training_loss(cfg: FitConfig, class_weights: torch.Tensor | None = None):
    """The supervised loss: ``loss(logits, index, prob, image, step, valid) -> LossOutput``;
    a weak regime adds its term from step ``--weak-start`` on (CE on the labelled pixels
    before, as the paper initialises the network). ``--loss``, ``class_weights`` (C,) and
    OHEM apply throughout."""
    weak, kind, mc = cfg.weak, cfg.optim.loss, cfg.optim.mc
    ohem = (cfg.optim.ohem_thresh, cfg.optim.ohem_min_kept) if cfg.optim.ohem_thresh else None
    labelled = dict(class_weights=class_weights, ohem=ohem)

    def loss(logits, index, prob, image, step: int, valid=None) -> LossOutput:
        if weak.loss == "none" or step < weak.start:
            return soft_label_loss(logits, index, prob, kind, mc, **labelled)
        return weak_loss(logits, index, prob, image, weak, mc, kind, valid, **labelled)

    return loss
