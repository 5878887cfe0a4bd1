"""``softprep show``: a picture of one stored image at one level.

Panels, side by side: the colour image, the soft label drawn as probability-weighted class
colours, and the nearest-neighbour label (from the stored full-resolution label; for
images without one, the argmax of the soft label, titled as such).
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

from softprep.manifest import VOID
from softprep.resample import Resampler
from softprep.store import SoftStore, parse_scale, scale_label


def palette256(classes: list[dict]) -> np.ndarray:
    """(256, 3) float32 class colours by train id; void and unused ids are black."""
    pal = np.zeros((256, 3), dtype=np.float32)
    pal[: len(classes)] = [c["color"] for c in classes]
    pal[VOID] = 0
    return pal


def soft_colours(index: np.ndarray, prob: np.ndarray, pal: np.ndarray) -> np.ndarray:
    """ids (K, h, w) + uint8 probs (K, h, w) -> (h, w, 3) uint8 probability-weighted colour."""
    rgb = (pal[index] * (prob[..., None] / 255.0)).sum(axis=0)
    return np.clip(rgb + 0.5, 0, 255).astype(np.uint8)


def render(store: SoftStore, i: int, scale, min_width: int = 384) -> Image.Image:
    """The side-by-side picture of image ``i`` at level ``scale``."""
    store.level(scale)  # a clear error if the level does not exist
    s = parse_scale(scale)
    pal = palette256(store.classes)
    rgb = store.read_rgb(s, i)
    index, prob = store.read_soft(s, i)
    panels = [("colour", rgb), ("soft label", soft_colours(index, prob, pal))]
    split = store.split_of()[i]
    if split in store.meta["eval_splits"] and store.has_full_labels:
        full = store.read_full_label(i)
        nn = Resampler.make(full.shape, rgb.shape[:2], "nearest").nearest_label(full)
        panels.append(("nearest neighbour", pal[nn].astype(np.uint8)))
    else:
        panels.append(("argmax of soft label", pal[index[0]].astype(np.uint8)))
    zoom = max(1, -(-min_width // rgb.shape[1]))
    h, w = rgb.shape[0] * zoom, rgb.shape[1] * zoom
    title = 18
    canvas = Image.new("RGB", (3 * w + 20, h + title), "white")
    draw = ImageDraw.Draw(canvas)
    for j, (name, arr) in enumerate(panels):
        im = Image.fromarray(arr).resize((w, h), Image.NEAREST)
        canvas.paste(im, (j * (w + 10), title))
        draw.text((j * (w + 10) + 2, 2), f"{name} ({scale_label(s)})", fill="black")
    return canvas
