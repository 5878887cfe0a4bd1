"""``softtrain predict``: label PNGs for images on disk, in the formats benchmarks accept.

Formats (one PNG per image, nothing else in ``out``):
- ``trainIds``: 8-bit train ids (what ``softtrain eval`` scores);
- ``labelIds``: the dataset's raw label values, through the manifest (Cityscapes label
  ids for the official ``cityscapesscripts`` evaluator; ADE20K values shifted back by one);
- ``palette``: a palette PNG whose colours are the class colours, indices the train ids.

Colour overlays, when asked for, go to their own folder, outside ``out`` (the Cityscapes
evaluator searches the prediction folder recursively and stops on a second match).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from softprep.datasets import open_image
from softtrain.evaluate import InferenceOptions
from softtrain.segmenter import Segmenter

FORMATS = ("trainIds", "labelIds", "palette")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff")


def find_images(inputs: list[Path], out_dir: Path) -> list[tuple[Path, Path]]:
    """(image, output PNG) pairs: a file gives ``out/<stem>.png``; a folder gives every
    image below it at ``out/<relative path>.png``. Refuses missing inputs and name clashes."""
    pairs = []
    for given in inputs:
        if given.is_dir():
            found = sorted(p for p in given.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise FileNotFoundError(f"{given}: no images in this folder")
            pairs += [(p, out_dir / p.relative_to(given).with_suffix(".png")) for p in found]
        elif given.is_file():
            pairs.append((given, out_dir / f"{given.stem}.png"))
        else:
            raise FileNotFoundError(f"{given}: no such image file or folder")
    seen: dict[Path, Path] = {}
    for image, target in pairs:
        if target in seen:
            raise ValueError(f"{image} and {seen[target]} would both be written to {target}")
        seen[target] = image
    return pairs


def refuse_overlap(inputs: list[Path], outputs: dict[str, Path | None]) -> None:
    """Refuse an output folder (``{"--out": path, ...}``) that is, contains or lies inside
    an input image or folder (symlinks resolved): predictions must never replace a photo,
    nor land where a later run takes them as images."""
    given = [(Path(i), Path(i).resolve()) for i in inputs]
    for flag, folder in outputs.items():
        if folder is None:
            continue
        where = Path(folder).resolve()
        if where.exists() and not where.is_dir():
            raise ValueError(f"{flag} {folder} is a file, not a folder")
        for shown, real in given:
            if where == real or where.is_relative_to(real) or real.is_relative_to(where):
                relation = (
                    "is"
                    if where == real
                    else "lies inside"
                    if where.is_relative_to(real)
                    else "contains"
                )
                raise ValueError(
                    f"{flag} {folder} {relation} the input {shown}: predictions would overwrite "
                    "or mix with the images; give a folder outside every input"
                )


def _encode(pred: np.ndarray, fmt: str, manifest, palette: np.ndarray) -> Image.Image:
    """(H, W) uint8 train ids -> the PNG image of ``fmt``."""
    if fmt == "trainIds":
        return Image.fromarray(pred, "L")
    if fmt == "palette":
        label = Image.fromarray(pred, "P")
        label.putpalette(palette.ravel().tolist())
        return label
    table = np.array([manifest.raw_value_of(t) for t in range(manifest.num_classes)])
    raw = table[pred]
    if raw.max() > 255:
        return Image.fromarray(raw.astype(np.uint16))
    return Image.fromarray(raw.astype(np.uint8), "L")


def predict(
    checkpoint: str,
    inputs: list[Path],
    out_dir: Path,
    fmt: str = "trainIds",
    overlays: Path | None = None,
    device: str = "auto",
    opts: InferenceOptions | None = None,
    progress=None,
) -> list[Path]:
    """Write one label PNG per image (and an overlay JPEG per image in ``overlays``).

    Each image is labelled by the checkpoint's ``Segmenter`` (resized as the store was,
    scores upsampled bilinearly to the image's full resolution, decoded as ``opts`` says).
    Returns the label files written.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format '{fmt}'; choose from {', '.join(FORMATS)}")
    out_dir = Path(out_dir)
    refuse_overlap(list(inputs), {"--out": out_dir, "--overlays": overlays})
    if overlays is not None and overlays.resolve().is_relative_to(out_dir.resolve()):
        raise ValueError(
            f"overlays folder {overlays} is inside --out {out_dir}: evaluators read every PNG "
            "there; give a folder outside it"
        )
    segmenter = Segmenter.from_checkpoint(checkpoint, device, opts)
    pairs = find_images(list(inputs), out_dir)
    manifest = segmenter.manifest
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: manifest.num_classes] = manifest.palette
    written = []
    for n, (path, target) in enumerate(pairs):
        image = open_image(path)
        pred = segmenter(image)
        target.parent.mkdir(parents=True, exist_ok=True)
        _encode(pred, fmt, manifest, palette).save(target)
        written.append(target)
        if overlays is not None:
            dest = overlays / target.relative_to(out_dir).with_suffix(".jpg")
            dest.parent.mkdir(parents=True, exist_ok=True)
            overlay(np.asarray(image), pred, palette, manifest.class_names).save(dest, quality=90)
        if progress:
            progress(n + 1, len(pairs))
    return written


def overlay(rgb: np.ndarray, pred: np.ndarray, palette: np.ndarray, names: list[str]):
    """The image blended half and half with its predicted class colours, above a colour
    key of the classes predicted (``palette``: (256, 3) uint8 by train id)."""
    from softprep.render import colour_key

    mix = Image.fromarray((0.5 * rgb + 0.5 * palette[pred]).astype(np.uint8))
    ids = [int(c) for c in np.unique(pred) if c < len(names)]
    key = colour_key([(c, names[c]) for c in ids], palette.astype(np.float32), mix.width)
    out = Image.new("RGB", (mix.width, mix.height + key.height + 4), "white")
    out.paste(mix, (0, 0))
    out.paste(key, (0, mix.height + 4))
    return out
