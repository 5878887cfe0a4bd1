"""``softprep show``: a picture of one stored image at one level.

Above, the image's name, split and level. Panels, side by side: the colour image, the soft
label drawn as probability-weighted class colours, the argmax of the soft label, and, for
images whose full-resolution label is stored (evaluation splits), the nearest-neighbour
label of the same level. Below, a colour key of the classes in the image.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from softprep.manifest import VOID
from softprep.resample import Resampler
from softprep.store import SoftStore, StoreError, parse_scale, scale_label


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


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)  # needs FreeType; else the small bitmap font
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def find_image(store: SoftStore, name: str) -> int:
    """The index of the stored image called ``name`` (``train/aachen/aachen_000000_000019``),
    or of the only one whose name ends with ``name`` (``aachen_000000_000019``)."""
    import difflib

    names = [str(n) for n in store.names()]
    if name in names:
        return names.index(name)
    ends = [i for i, n in enumerate(names) if n.endswith("/" + name.strip("/"))]
    if len(ends) == 1:
        return ends[0]
    if len(ends) > 1:
        shown = ", ".join(names[i] for i in ends[:3])
        raise StoreError(
            f"{store.url}: {len(ends)} images are called {name} ({shown}); give the full "
            "name, with its split"
        )
    close = difflib.get_close_matches(name, names, n=1) or difflib.get_close_matches(
        name, [n.rsplit("/", 1)[-1] for n in names], n=1
    )
    hint = f"; did you mean {close[0]}?" if close else ""
    raise StoreError(f"{store.url}: no image called {name}{hint}")


def render(store: SoftStore, i: int, scale, min_width: int = 384) -> Image.Image:
    """The picture of image ``i`` at level ``scale``: a title line, the panels side by
    side (each titled), and a colour key of the classes present."""
    store.level(scale)  # a clear error if the level does not exist
    s = parse_scale(scale)
    pal = palette256(store.classes)
    rgb = store.read_rgb(s, i)
    index, prob = store.read_soft(s, i)
    panels = [
        ("colour", rgb),
        ("soft label", soft_colours(index, prob, pal)),
        ("argmax of soft label", pal[index[0]].astype(np.uint8)),
    ]
    present = set(np.unique(index[prob > 0]).tolist())
    split = store.split_of()[i]
    if split in store.meta["eval_splits"] and store.has_full_labels:
        full = store.read_full_label(i)
        nn = Resampler.make(full.shape, rgb.shape[:2], "nearest").nearest_label(full)
        panels.append(("nearest neighbour", pal[nn].astype(np.uint8)))
        present |= set(np.unique(nn).tolist())
    zoom = max(1, -(-min_width // rgb.shape[1]))
    h, w = rgb.shape[0] * zoom, rgb.shape[1] * zoom
    gap, head, title = 10, 30, 24
    big = _font(18)
    names = [c["name"] for c in store.classes]
    key = [(c, names[c]) for c in sorted(present) if c < len(names)]
    if VOID in present:
        key.append((VOID, "void"))
    width = len(panels) * (w + gap) - gap
    legend = colour_key(key, pal, width)
    canvas = Image.new("RGB", (width, head + title + h + 8 + legend.height), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text(
        (2, 4),
        f"{store.names()[i]}  ({split}, image {i}, level {scale_label(s)}: "
        f"{rgb.shape[0]}x{rgb.shape[1]} px, shown x{zoom})",
        fill="black",
        font=big,
    )
    for j, (name, arr) in enumerate(panels):
        im = Image.fromarray(arr).resize((w, h), Image.NEAREST)
        canvas.paste(im, (j * (w + gap), head + title))
        draw.text((j * (w + gap) + 2, head + 2), name, fill="black", font=big)
    canvas.paste(legend, (0, head + title + h + 8))
    return canvas


def colour_key(key: list[tuple[int, str]], pal: np.ndarray, width: int) -> Image.Image:
    """A white strip ``width`` px wide: a colour swatch and the name of each (train id,
    name) in ``key``, in rows of 170 px cells; colours from ``pal`` (256, 3)."""
    per_row = max(1, width // 170)
    rows = -(-len(key) // per_row)
    strip = Image.new("RGB", (width, rows * 22), "white")
    draw, font = ImageDraw.Draw(strip), _font(14)
    for n, (c, name) in enumerate(key):
        x, y = (n % per_row) * 170, (n // per_row) * 22
        draw.rectangle((x + 2, y + 2, x + 18, y + 18), fill=tuple(int(v) for v in pal[c]),
                       outline="grey")  # fmt: skip
        draw.text((x + 24, y + 2), name, fill="black", font=font)
    return strip
