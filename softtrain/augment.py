"""Photometric distortion of training crops, as mmsegmentation's ``PhotoMetricDistortion``:
per image, each with probability 1/2, brightness + U(-32, 32); contrast x U(0.5, 1.5)
(before or after the colour steps, with probability 1/2 each); saturation x U(0.5, 1.5)
and hue + U{-18..18} of 180 (in HSV), every step clipped to 0..255. Drawn from a CPU
``generator`` (``draws``: seeded per purpose, rank and micro-batch, so a resumed run draws
the same), applied on the device to the whole batch.
"""

from __future__ import annotations

import numpy as np
import torch

PHOTOMETRIC, STRONG_VIEW = 1, 2  # the purposes ``draws`` seeds apart


def draws(seed: int, purpose: int, rank: int, micro: int) -> torch.Generator:
    """A CPU generator for one micro-batch's random augmentation: independent streams for
    every (``--seed``, purpose, rank, micro-batch), so ranks (which hold other images) and
    purposes (the labelled crops' distortion, the unlabelled crops' strong view) never
    share their draws."""
    state = np.random.SeedSequence([seed, purpose, rank, micro]).generate_state(1, np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def photometric(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """(B, 3, H, W) uint8 RGB -> (B, 3, H, W) float32 in 0..255."""
    b, device = image.shape[0], image.device
    x = image.float()

    def coin() -> torch.Tensor:  # (B, 1, 1, 1) bool, probability 1/2
        return (torch.rand(b, generator=generator) < 0.5).to(device).view(b, 1, 1, 1)

    def uniform(lo: float, hi: float) -> torch.Tensor:
        return (lo + (hi - lo) * torch.rand(b, generator=generator)).to(device).view(b, 1, 1, 1)

    def contrast(x):
        return torch.where(coin(), (x * uniform(0.5, 1.5)).clamp(0, 255), x)

    x = torch.where(coin(), (x + uniform(-32, 32)).clamp(0, 255), x)
    contrast_first = coin()
    x = torch.where(contrast_first, contrast(x), x)
    h, s, v = rgb_to_hsv(x / 255).unbind(1)
    s = torch.where(coin()[:, 0], (s * uniform(0.5, 1.5)[:, 0]).clamp(0, 1), s)
    shift = torch.randint(-18, 19, (b,), generator=generator).to(device).view(b, 1, 1) / 180
    h = torch.where(coin()[:, 0], (h + shift) % 1.0, h)
    x = hsv_to_rgb(torch.stack([h, s, v], 1)) * 255
    return torch.where(contrast_first, x, contrast(x))


def rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) RGB in 0..1 -> HSV, each in 0..1 (hue as a fraction of the circle)."""
    r, g, b = rgb.unbind(1)
    top, _ = rgb.max(1)
    bottom, _ = rgb.min(1)
    span = top - bottom
    safe = torch.where(span > 0, span, torch.ones_like(span))
    hue = torch.where(
        top == r,
        ((g - b) / safe) % 6,
        torch.where(top == g, (b - r) / safe + 2, (r - g) / safe + 4),
    )
    hue = torch.where(span > 0, hue / 6, torch.zeros_like(hue))
    saturation = torch.where(
        top > 0, span / torch.where(top > 0, top, torch.ones_like(top)), 0 * top
    )
    return torch.stack([hue, saturation, top], 1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """The inverse of ``rgb_to_hsv``."""
    h, s, v = hsv.unbind(1)
    k = lambda n: (n + h * 6) % 6  # noqa: E731
    f = lambda n: v - v * s * (torch.minimum(k(n), 4 - k(n)).clamp(0, 1))  # noqa: E731
    return torch.stack([f(5), f(3), f(1)], 1)
