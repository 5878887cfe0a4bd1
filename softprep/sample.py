"""Synthetic datasets in a dataset's exact official layout and label encoding.

Scenes are street-like: large regions (sky, building, road, sidewalk, vegetation), thin
structures (poles, fences, 1-3 px at 512 px width) and small objects (traffic lights,
signs, people, bicycles), so nearest-neighbour down-sampling visibly loses classes.
This is the embedded default the README's demo runs on and what most tests use.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from softprep.manifest import VOID, Manifest

log = logging.getLogger("softprep")

ROLES = {
    "sky": ["sky"],
    "building": ["building"],
    "road": ["road"],
    "sidewalk": ["sidewalk", "pavement"],
    "vegetation": ["vegetation", "tree"],
    "pole": ["pole"],
    "fence": ["fence"],
    "traffic_light": ["traffic light"],
    "sign": ["traffic sign", "signboard", "sign"],
    "person": ["person", "pedestrian"],
    "bicycle": ["bicycle", "bicyclist"],
    "car": ["car"],
}

DEFAULT_SIZES = {
    "cityscapes": (256, 512),
    "mapillary": (300, 400),
    "ade20k": (256, 320),
    "camvid": (360, 480),
}


def class_roles(manifest: Manifest) -> dict[str, int]:
    """Scene role -> train id, matched by class name; roles without a match get unused ids."""
    names = [c.name.lower().replace("-", " ") for c in manifest.classes]
    roles, used = {}, set()
    for role, keys in ROLES.items():
        match = next(
            (i for k in keys for i, n in enumerate(names) if k in n and i not in used),
            None,
        )
        if match is not None:
            roles[role] = match
            used.add(match)
    spare = (i for i in range(manifest.num_classes) if i not in used)
    for role in ROLES:
        if role not in roles:
            roles[role] = next(spare, 0)
    return roles


def scene_label(height: int, width: int, roles: dict[str, int], rng: np.random.Generator):
    """(H, W) uint8 train-id map of a street-like scene (void = 255 at the bottom edge)."""
    h, w = height, width
    lab = np.empty((h, w), dtype=np.uint8)
    cols = np.arange(w)
    horizon = (h * rng.uniform(0.3, 0.45) + h * 0.05 * np.sin(cols / w * rng.uniform(3, 9))).astype(
        int
    )
    road_top = int(h * rng.uniform(0.62, 0.7))
    rows = np.arange(h)[:, None]
    lab[:] = roles["building"]
    lab[rows < horizon[None, :]] = roles["sky"]
    lab[road_top - int(h * 0.06) :] = roles["sidewalk"]
    lab[road_top:] = roles["road"]
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(rng.integers(1, 4)):  # trees / bushes
        cy, cx = rng.uniform(0.3, 0.6) * h, rng.uniform(0, w)
        ry, rx = rng.uniform(0.08, 0.2) * h, rng.uniform(0.05, 0.15) * w
        lab[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = roles["vegetation"]
    thin = max(1, round(w / 512))
    fy0, fy1 = road_top - int(h * 0.14), road_top - int(h * 0.06)
    fx0 = int(rng.uniform(0, 0.5) * w)
    fx1 = fx0 + int(w * rng.uniform(0.2, 0.4))
    for y in range(fy0, fy1, max(3, (fy1 - fy0) // 3)):  # fence: rails and posts
        lab[y : y + thin, fx0:fx1] = roles["fence"]
    for x in range(fx0, fx1, max(4, w // 40)):
        lab[fy0:fy1, x : x + thin] = roles["fence"]
    for _ in range(rng.integers(3, 7)):  # poles with lights and signs
        x = int(rng.uniform(0.02, 0.98) * w)
        top = int(h * rng.uniform(0.15, 0.35))
        pw = int(rng.integers(1, 4)) * thin
        lab[top : road_top - 2, x : x + pw] = roles["pole"]
        box = max(2, round(h / 80))
        kind = roles["traffic_light"] if rng.random() < 0.5 else roles["sign"]
        lab[top : top + 2 * box, x - box : x + pw + box] = kind
    for _ in range(rng.integers(2, 6)):  # people, bicycles, cars on the road
        cy, cx = rng.uniform(road_top, h * 0.9), rng.uniform(0, w)
        role = rng.choice(["person", "bicycle", "car"])
        ry = h * (0.05 if role == "car" else 0.03)
        rx = w * (0.06 if role == "car" else 0.008)
        lab[((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1] = roles[role]
    lab[int(h * 0.95) :, :] = VOID  # ego vehicle / unlabeled
    return lab


def scene_image(label: np.ndarray, palette: np.ndarray, rng: np.random.Generator):
    """(H, W, 3) uint8 colour image: class colours with shading and noise (void is dark)."""
    pal = np.zeros((256, 3), dtype=np.float32)
    pal[: len(palette)] = palette
    pal[VOID] = (20, 20, 20)
    img = pal[label]
    shade = np.linspace(0.85, 1.1, label.shape[0], dtype=np.float32)[:, None, None]
    img = img * shade + rng.normal(0, 6, size=img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


def value_noise(height: int, width: int, cell: int, rng: np.random.Generator) -> np.ndarray:
    """(H, W) float32 smooth noise in about -1..1: uniform values every ``cell`` px,
    bicubically interpolated."""
    gh, gw = height // cell + 2, width // cell + 2
    grid = rng.uniform(-1, 1, (gh, gw)).astype(np.float32)
    big = Image.fromarray(grid, "F").resize((gw * cell, gh * cell), Image.BICUBIC)
    return np.asarray(big)[:height, :width]


def ragged(label: np.ndarray, rng: np.random.Generator, amplitude=4, cell=4) -> np.ndarray:
    """The label with every boundary displaced by smooth noise of up to ``amplitude`` px:
    boundaries as irregular as a photograph's annotation (CamVid: ~2.3% of neighbouring
    pixel pairs differ; the plain scenes ~1.8%, ragged ~2.5%)."""
    h, w = label.shape
    dy, dx = (np.rint(value_noise(h, w, cell, rng) * amplitude).astype(np.intp) for _ in "yx")
    yy, xx = np.mgrid[0:h, 0:w]
    return label[np.clip(yy + dy, 0, h - 1), np.clip(xx + dx, 0, w - 1)]


def photo_image(label: np.ndarray, palette: np.ndarray, rng: np.random.Generator):
    """(H, W, 3) uint8 colour image textured like a photograph: class colours, shading,
    spatially correlated texture at 48, 12 and 2 px and a colour tint at 64 px, little
    pixel noise. On CamVid-size scenes its PNGs are ~255 kB (CamVid's photos ~230 kB; the
    plain ``scene_image``'s i.i.d. noise ~330 kB) and its mean horizontal gradient 4.3
    grey levels (CamVid 4.4), so decoding and compressing it cost what a photo's do."""
    h, w = label.shape
    pal = np.zeros((256, 3), dtype=np.float32)
    pal[: len(palette)] = palette
    pal[VOID] = (20, 20, 20)
    img = pal[label] * np.linspace(0.85, 1.1, h, dtype=np.float32)[:, None, None]
    texture = sum(a * value_noise(h, w, c, rng) for c, a in ((48, 18), (12, 10), (2, 10)))
    tint = np.stack([value_noise(h, w, 64, rng) for _ in range(3)], axis=-1) * 6
    img = img + texture[..., None] + tint + rng.normal(0, 1.0, img.shape).astype(np.float32)
    return np.clip(img + 0.5, 0, 255).astype(np.uint8)


# Each split's own cities / sequences, as in the real datasets: no name repeats across splits
CITIES = {
    "train": ("aachen", "bochum", "bremen"),
    "val": ("frankfurt", "lindau", "munster"),
    "test": ("berlin", "bielefeld", "bonn"),
    "train_extra": ("augsburg", "bamberg", "dortmund"),
}
CAMVID_FRAMES = {"train": "0001TP_{:06d}", "val": "0016E5_{:05d}", "test": "Seq05VD_f{:05d}"}


def _stem(manifest: Manifest, split: str, i: int) -> str:
    """The ``i``-th sample name of ``split``, in the dataset's own naming."""
    if manifest.dataset == "cityscapes":
        city = CITIES[split][i % 3]
        return f"{city}/{city}_{i:06d}_000019"
    if manifest.dataset == "ade20k":
        return f"ADE_{'train' if split == 'train' else 'val'}_{i + 1:08d}"
    if manifest.dataset == "camvid":
        return CAMVID_FRAMES[split].format(6690 + 30 * i)
    return f"sample_{split}_{i:05d}"


def _save(array: np.ndarray, path: Path, palette: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        im = Image.fromarray(array, "RGB")
    elif palette is not None:
        im = Image.fromarray(array, "P")
        im.putpalette(palette.ravel().tolist())
    else:
        im = Image.fromarray(array, "L")
    if path.suffix.lower() in (".jpg", ".jpeg"):
        im.save(path, quality=92)
    else:
        im.save(path)


def write_sample(
    manifest: Manifest,
    out: Path,
    counts: dict[str, int] | None = None,
    size: tuple[int, int] | None = None,
    seed: int = 0,
    photo_like: bool = False,
) -> int:
    """Write a synthetic dataset under ``out`` in the manifest's layout; returns the number
    of images (image-only splits get no label files).

    ``counts``: images per split (default train 6, val 2). ``size``: (H, W) for every image;
    default varies per image around the dataset's typical aspect ratio (fixed for Cityscapes
    and CamVid, 360x480).
    Labels use the dataset's raw encoding: Cityscapes labelIds (and labelTrainIds), Mapillary
    palette PNGs, ADE20K values 0..150. ``photo_like``: ragged boundaries (``ragged``) and
    photograph-like texture (``photo_image``), for benchmarks whose figures must hold on
    real photos.
    """
    out = Path(out)
    counts = counts or {"train": 6, "val": 2}
    rng = np.random.default_rng(seed)
    roles = class_roles(manifest)
    to_raw = np.zeros(256, dtype=np.uint8)
    for tid in list(range(manifest.num_classes)) + [VOID]:
        to_raw[tid] = manifest.raw_value_of(tid)
    base = DEFAULT_SIZES.get(manifest.dataset, (256, 384))
    palette_png = None
    if manifest.layout["label_suffix"] == ".png" and manifest.dataset == "mapillary":
        palette_png = np.zeros((256, 3), dtype=np.uint8)
        for raw, tid in manifest.label_values.items():
            if tid != manifest.ignore_index:
                palette_png[raw] = manifest.classes[tid].color
    lay = manifest.layout
    identity_variants = [
        v["label_suffix"]
        for v in manifest.raw.get("variants", {}).values()
        if v.get("label_values") == "identity" and "label_suffix" in v
    ]
    n = 0
    for split, count in counts.items():
        token = manifest.splits[split]
        for i in range(count):
            if size is not None or manifest.dataset in ("cityscapes", "camvid"):
                h, w = size or base
            else:
                h = int(base[0] * rng.uniform(0.8, 1.25))
                w = int(base[1] * rng.uniform(0.8, 1.25))
            label = scene_label(h, w, roles, rng)
            if photo_like:
                label = ragged(label, rng)
                image = photo_image(label, manifest.palette, rng)
            else:
                image = scene_image(label, manifest.palette, rng)
            stem = _stem(manifest, split, i)
            img_dir = out / lay["images"].format(split=token)
            lab_dir = out / lay["labels"].format(split=token)
            _save(image, img_dir / f"{stem}{lay['image_suffix']}")
            n += 1
            if split in manifest.image_only_splits:
                continue
            _save(to_raw[label], lab_dir / f"{stem}{lay['label_suffix']}", palette_png)
            for suffix in identity_variants:
                _save(label, lab_dir / f"{stem}{suffix}")
    if manifest.config_json:
        labels = [{"name": "unlabeled", "color": [0, 0, 0]}] * (max(manifest.label_values) + 1)
        for raw, tid in manifest.label_values.items():
            if tid != manifest.ignore_index:
                c = manifest.classes[tid]
                labels[raw] = {"name": c.name, "color": list(c.color)}
        (out / manifest.config_json).write_text(json.dumps({"labels": labels}, indent=1))
    return n


def write_sample_folder(
    manifest: Manifest,
    out: Path,
    counts: dict[str, int] | None = None,
    size: tuple[int, int] | None = None,
    seed: int = 0,
) -> int:
    """``write_sample`` into a folder that holds exactly the sample afterwards (what
    ``softprep sample`` does): ``out`` must be new, empty, or hold an earlier sample, which
    is replaced whole; other files are refused, never deleted. Returns the number of images."""
    out = Path(out)
    _clear_previous_sample(out)
    n = write_sample(manifest, out, counts, size, seed)
    written = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    (out / WRITTEN).write_text(json.dumps({"dataset": manifest.dataset, "files": written}))
    return n


WRITTEN = ".softprep-sample.json"  # the files a sample wrote: what the next one replaces


def _clear_previous_sample(out: Path) -> None:
    """Make ``out`` ready for a sample: absent or empty, or holding exactly what an earlier
    ``write_sample`` wrote (listed in ``WRITTEN``), which is removed, so that a new sample
    holds exactly the images asked for. Any other file is refused, never deleted."""
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"{out} is a file; give a folder for the sample")
    listed = set()
    if (out / WRITTEN).is_file():
        try:
            listed = set(json.loads((out / WRITTEN).read_text())["files"]) | {WRITTEN}
        except (ValueError, KeyError, TypeError):
            listed = set()
    present = {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()}
    foreign = sorted(present - listed)
    if foreign:
        raise ValueError(
            f"{out} already holds {len(foreign)} file(s) that softprep sample did not write "
            f"(e.g. {foreign[0]}); give an empty or new folder"
        )
    files = len(present - {WRITTEN})
    if files:
        log.warning("%s held an earlier sample (%d files): replaced", out, files)
    for name in present:
        (out / name).unlink()
    for d in sorted((p for p in out.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        if not any(d.iterdir()):
            d.rmdir()
