"""Find, decode and validate (image, label) pairs of a dataset in its official layout, and
images without labels (image-only splits, a folder of images)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import google_crc32c
import numpy as np
from PIL import Image

from softprep.manifest import VOID, Manifest, available, load_manifest

log = logging.getLogger("softprep")

# PIL's decompression-bomb guard (89 MP) is below Mapillary's largest images; ours, in
# ``_open``, refuses files above 250 MP (a 50000x50000 header would end in MemoryError).
MAX_PIXELS = 250_000_000
Image.MAX_IMAGE_PIXELS = None
LOSSY_FORMATS = ("JPEG", "MPO", "WEBP", "JPEG2000")
UNLABELED_SPLIT = "unlabeled"  # the split of ``softprep build --unlabeled DIR``
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")


class DatasetError(ValueError):
    """A dataset file or folder that cannot be used; the message names the path."""

    def __init__(self, path: Path | str, message: str):
        super().__init__(f"{path}: {message}")
        self.path, self.message = str(path), message

    def __reduce__(self):  # crosses process boundaries (loky, dask) intact
        return type(self), (self.path, self.message)


@dataclass(frozen=True)
class Pair:
    """One image and its label file (None for an image without labels). ``name`` is the
    stem shared by both (relative path)."""

    split: str
    name: str
    image: Path
    label: Path | None


@dataclass(frozen=True)
class Problem:
    """A file and what is wrong with it; ``index`` is its image number in a store, if any."""

    path: str
    message: str
    index: int | None = None

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


def _labelled_splits(manifest: Manifest) -> list[str]:
    return [s for s in manifest.splits if s not in manifest.image_only_splits]


def _has_split(manifest: Manifest, root: Path) -> bool:
    return any(_split_dirs(manifest, root, s)[0].is_dir() for s in _labelled_splits(manifest))


def _candidate_root(manifest: Manifest, root: Path) -> Path:
    """``root``, its parent or one of its folders: the first that holds a split's images
    (``root`` when none does)."""
    if not root.is_dir() or _has_split(manifest, root):
        return root
    for candidate in [root.parent, *sorted(p for p in root.iterdir() if p.is_dir())]:
        if _has_split(manifest, candidate):
            return candidate
    return root


def find_root(manifest: Manifest, root: Path) -> Path:
    """The dataset root the manifest's layout needs, from the folder a user gave: that
    folder, its parent (one level too deep, e.g. ``ADEChallengeData2016`` itself, which is
    mmsegmentation's ``data_root``) or one of its folders (one level too high). Says which
    folder was used (logger ``softprep``) when it is not ``root``."""
    found = _candidate_root(manifest, Path(root))
    if found != Path(root):
        log.warning(
            "using %s as the %s root (its folders match the layout)", found, manifest.dataset
        )
    return found


def _holds_labels(manifest: Manifest, root: Path) -> bool:
    root = _candidate_root(manifest, Path(root))
    return any(_split_dirs(manifest, root, s)[1].is_dir() for s in _labelled_splits(manifest))


def detect_version(dataset: str, root: Path) -> str | None:
    """The version of a multi-version dataset (Mapillary v1.1 / v1.2 / v2.0) whose label
    folders are under ``root``, said in a note; with several, the default version if it is
    among them. None when the dataset has one version or no version's labels are there."""
    dataset = dataset.lower()  # as load_manifest reads names
    versions = [m["version"] for m in available() if m["dataset"] == dataset]
    if len(versions) < 2:
        return None
    found = [v for v in versions if _holds_labels(load_manifest(dataset, v), root)]
    if not found:
        return None
    default = load_manifest(dataset).version
    chosen = default if default in found else found[0]
    if len(found) > 1:
        log.warning(
            "%s holds %s labels of versions %s; using %s (choose with --version)",
            root, dataset, ", ".join(found), chosen,
        )  # fmt: skip
    else:
        log.warning("%s: %s %s detected from its folders", root, dataset, chosen)
    return chosen


def _version_hint(manifest: Manifest, root: Path) -> str:
    """`` (the v2.0 layout is here: use --version v2.0)`` where another version fits."""
    others = [
        m["version"]
        for m in available()
        if m["dataset"] == manifest.dataset and m.get("version") != manifest.version
    ]
    fits = [v for v in others if _holds_labels(load_manifest(manifest.dataset, v), root)]
    return f" (the {fits[0]} layout is here: use --version {fits[0]})" if fits else ""


def _split_dirs(manifest: Manifest, root: Path, split: str) -> tuple[Path, Path]:
    token = manifest.splits[split]
    lay = manifest.layout
    return root / lay["images"].format(split=token), root / lay["labels"].format(split=token)


def _walk(folder: Path, suffix: str | tuple[str, ...], problems: list[Problem]) -> list[Path]:
    """Files ending in ``suffix`` (or one of several) below ``folder``, following symlinked
    folders (each real folder once, so a symlink loop ends; each said in a note); unreadable
    folders and broken or looping symlinks are reported in ``problems``, never skipped
    silently."""
    found, seen = [], set()

    def unreadable(e: OSError) -> None:
        problems.append(Problem(str(e.filename), f"folder cannot be read ({e.strerror})"))

    for top, dirs, files in os.walk(folder, followlinks=True, onerror=unreadable):
        real = os.path.realpath(top)
        if real in seen:
            problems.append(Problem(top, "symlink loop: this folder was already read; left out"))
            dirs[:] = []
            continue
        seen.add(real)
        if os.path.islink(top):
            log.warning("following the symlinked folder %s -> %s", top, real)
        for name in sorted(files):
            if not name.endswith(suffix):
                continue
            path = Path(top) / name
            if path.is_file():
                found.append(path)
            else:
                problems.append(Problem(str(path), "broken or looping symlink; left out"))
    return sorted(found)


def _stems(folder: Path, suffix: str, problems: list[Problem]) -> dict[str, Path]:
    return {str(p.relative_to(folder))[: -len(suffix)]: p for p in _walk(folder, suffix, problems)}


def discover(
    manifest: Manifest, root: Path, splits: list[str] | None = None
) -> tuple[list[Pair], list[Problem]]:
    """All pairs of the requested splits (default: every labelled split present under
    ``root``; image-only splits only when requested, as pairs without a label), sorted by
    split then name, and every pairing problem found (not just the first).

    Raises ``DatasetError`` if ``root`` is missing or holds none of the manifest's splits.
    """
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(root, "dataset root not found")
    root = find_root(manifest, root)
    unknown = [s for s in splits or [] if s not in manifest.splits]
    if unknown:
        raise DatasetError(
            root,
            f"{manifest.dataset} has no split {unknown}; known: {', '.join(manifest.splits)}",
        )
    wanted = splits or [
        s for s in _labelled_splits(manifest) if _split_dirs(manifest, root, s)[0].is_dir()
    ]
    if not wanted:
        expected = _split_dirs(manifest, root, _labelled_splits(manifest)[0])[0]
        raise DatasetError(
            root,
            f"no {manifest.dataset} split found (expected e.g. {expected}); "
            f"is this the dataset root?{_version_hint(manifest, root)}",
        )
    pairs, problems = [], []
    lay = manifest.layout
    for split in wanted:
        img_dir, lab_dir = _split_dirs(manifest, root, split)
        if not img_dir.is_dir():
            problems.append(Problem(str(img_dir), f"split '{split}': image folder missing"))
            continue
        if split in manifest.image_only_splits:
            pairs += images_without_labels(img_dir, split, problems, (lay["image_suffix"],))
            continue
        if not lab_dir.is_dir():
            hint = _version_hint(manifest, root)
            n = len(_stems(img_dir, lay["image_suffix"], []))  # the images it leaves unlabelled
            images = f"its {n} image{'s' * (n != 1)}" if n else "its images (none there either)"
            problems.append(
                Problem(str(lab_dir), f"split '{split}': label folder missing for {images}{hint}")
            )
            continue
        images = _stems(img_dir, lay["image_suffix"], problems)
        labels = _stems(lab_dir, lay["label_suffix"], problems)
        if not images:
            problems.append(Problem(str(img_dir), f"no *{lay['image_suffix']} images"))
        for stem, img in images.items():
            if stem in labels:
                pairs.append(Pair(split, stem, img, labels[stem]))
            else:
                expected = lab_dir / f"{stem}{lay['label_suffix']}"
                problems.append(Problem(str(img), f"no label file (expected {expected})"))
        for stem in sorted(set(labels) - set(images)):
            problems.append(Problem(str(labels[stem]), "label without an image"))
    return pairs, problems


def labelled_pairs(manifest: Manifest, root: Path, split: str) -> list[Pair]:
    """The pairs of ``split`` (``all``: every labelled split present) that label statistics
    read; an image-only split is refused, and pairing problems are left to ``scan``."""
    if split in manifest.image_only_splits:
        raise DatasetError(root, f"split '{split}' of {manifest.dataset} has no labels")
    return discover(manifest, Path(root), None if split == "all" else [split])[0]


def images_without_labels(
    folder: Path, split: str, problems: list[Problem], suffixes=IMAGE_SUFFIXES
) -> list[Pair]:
    """Pairs without a label for every image below ``folder`` (file name ending in one of
    ``suffixes``), named by their path below it without the suffix; an empty folder is a
    problem."""
    pairs = {}
    for path in _walk(folder, tuple(suffixes), problems):
        suffix = next(s for s in suffixes if path.name.endswith(s))
        name = str(path.relative_to(folder))[: -len(suffix)]
        if name in pairs:
            other = pairs[name].image.name
            problems.append(Problem(str(path), f"{other} has the same name; left out"))
            continue
        pairs[name] = Pair(split, name, path, None)
    if not pairs:
        endings = ", ".join(dict.fromkeys(s.lower() for s in suffixes))
        problems.append(Problem(str(folder), f"no images (files ending in {endings})"))
    return [pairs[n] for n in sorted(pairs)]


def _open(path: Path, what: str) -> Image.Image:
    """``Image.open`` with PIL's errors and the size limit as ``DatasetError``."""
    try:
        im = Image.open(path)
    except (OSError, SyntaxError) as e:
        raise DatasetError(path, f"not a readable {what} ({e})") from e
    if im.width * im.height > MAX_PIXELS:
        im.close()
        raise DatasetError(
            path,
            f"{what} is {im.width}x{im.height} ({im.width * im.height / 1e6:.0f} MP), "
            f"above the {MAX_PIXELS // 10**6} MP limit",
        )
    return im


def _refuse_lossy(label: Image.Image, path: Path) -> None:
    if label.format in LOSSY_FORMATS:
        raise DatasetError(
            path,
            f"label is a {label.format} file (lossy compression changes class ids along "
            "every edge); labels must be lossless (PNG)",
        )


def read_size(path: Path) -> tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    with _open(path, "image") as im:
        return im.height, im.width


def source_stamp(pair: Pair) -> tuple[int, int, int, int]:
    """What a build compares to notice a changed file, as make and rsync do: (image bytes,
    image mtime ns, label bytes, label mtime ns); the label's are 0, 0 for an image without
    one. ``OSError`` if a file cannot be read."""
    image = os.stat(pair.image)
    label = os.stat(pair.label) if pair.label is not None else None
    return (
        image.st_size,
        image.st_mtime_ns,
        label.st_size if label else 0,
        label.st_mtime_ns if label else 0,
    )


def file_crc(path: Path) -> int:
    """CRC-32C of a file's bytes (hardware-accelerated; read and summed in 1 MiB blocks,
    0.5 ms for a 4 MB photo from the page cache)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            crc = google_crc32c.extend(crc, block)
    return crc


def source_record(pair: Pair) -> tuple[int, int, int, int, int, int]:
    """What a build records of a pair's files (``images/source``): ``source_stamp``'s
    sizes and times with each file's CRC-32C after them: (image bytes, mtime ns, crc, label
    bytes, mtime ns, crc); the label's are 0 for an image without one. The times are taken
    first, so a file changed while it is read looks changed next time. ``DatasetError`` if
    a file cannot be read."""
    try:
        isize, itime, lsize, ltime = source_stamp(pair)
        icrc = file_crc(pair.image)
        lcrc = file_crc(pair.label) if pair.label is not None else 0
    except OSError as e:
        raise DatasetError(Path(e.filename or pair.image), f"unreadable ({e.strerror})") from e
    return isize, itime, icrc, lsize, ltime, lcrc


def pair_size(pair: Pair) -> tuple[int, int]:
    """(height, width) of a pair from the file headers; ``DatasetError`` if they differ."""
    hw = read_size(pair.image)
    if pair.label is None:
        return hw
    with _open(pair.label, "label") as im:
        _refuse_lossy(im, pair.label)
        lh, lw = im.height, im.width
    if (lh, lw) != hw:
        raise DatasetError(
            pair.label, f"label is {lw}x{lh} but image {pair.image.name} is {hw[1]}x{hw[0]}"
        )
    return hw


# 16-bit grey modes PIL gives (PNG, TIFF); mode I is how PIL before 10 opened 16-bit PNGs
SIXTEEN_BIT_GREY = ("I;16", "I;16L", "I;16B", "I;16N")


def _to_rgb(im: Image.Image, path: Path) -> Image.Image:
    """A decoded image as 8-bit RGB, keeping each sample's true value: 16-bit samples keep
    their high byte (``v >> 8``; PIL does the same itself for 16-bit RGB, RGBA and grey +
    alpha PNGs, which it opens as 8-bit RGB / RGBA); 1, 2 and 4-bit grey, palette, LA,
    CMYK, YCbCr are converted by PIL. Modes whose range is unknown (32-bit integer, float,
    signed 16-bit) raise ``DatasetError`` instead of being clipped to 255."""
    if im.mode == "RGB":
        return im
    if im.mode in SIXTEEN_BIT_GREY or (im.mode == "I" and im.format == "PNG"):
        grey = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)  # (H, W)
        return Image.fromarray(grey, "L").convert("RGB")
    if im.mode in ("I", "F") or im.mode.startswith("I;"):
        kind = "floating-point" if im.mode == "F" else "32-bit or signed integer"
        raise DatasetError(
            path,
            f"{kind} image (mode {im.mode}): its value range is unknown, so it cannot be "
            "mapped to 8-bit colour; convert it to an 8-bit (or 16-bit PNG) image",
        )
    try:
        return im.convert("RGB")
    except ValueError as e:
        raise DatasetError(
            path, f"image mode {im.mode} cannot be converted to RGB ({e}); save it as RGB"
        ) from e


def open_image(path: Path) -> Image.Image:
    """The decoded 8-bit RGB PIL image (what the colour resize takes), each mode and bit
    depth mapped faithfully or refused (``_to_rgb``). EXIF orientation is deliberately not
    applied (the labels were drawn on the stored pixel grid)."""
    try:
        with _open(path, "image") as im:
            im.load()
            return _to_rgb(im, path)
    except (OSError, SyntaxError) as e:
        raise DatasetError(path, f"cannot decode image ({e})") from e


def decode_image(path: Path) -> np.ndarray:
    """(H, W, 3) uint8 RGB (see ``open_image``)."""
    return np.asarray(open_image(path))


def _label_mode_error(path: Path, mode: str, manifest: Manifest) -> str:
    if mode in ("RGB", "RGBA"):
        if manifest.dataset == "ade20k" or path.name.endswith("_seg.png"):
            return (
                f"{mode} label: this looks like the full ADE20K release (class encoded as "
                "R/10*256+G in *_seg.png). softprep reads the SceneParsing benchmark "
                "(ADEChallengeData2016, one 8-bit value per pixel, 0 = other)"
            )
        return (
            f"{mode} label: colour-coded labels are ambiguous; labels must be 8-bit class ids "
            "(mode L) or a palette PNG (mode P) whose index is the class id"
        )
    if mode.startswith("I"):
        return f"{mode} (16/32-bit) label: looks like an instance-id file, not a class-id label"
    return f"label mode {mode} is not supported (need L or P)"


# 2 and 4-bit grey PNGs: PIL scales their values to 0..255 (1 -> 85, 17); a label's class
# ids are the stored values, so they are divided back
LOW_BIT_GREY = {"L;2": 85, "L;4": 17}


def _low_bit_step(im: Image.Image) -> int:
    """What PIL multiplied an undecoded grey PNG's values by (1 unless 2 or 4-bit)."""
    rawmodes = {t.args for t in im.tile if isinstance(t.args, str)}
    return LOW_BIT_GREY.get(rawmodes.pop(), 1) if im.format == "PNG" and len(rawmodes) == 1 else 1


def decode_label_counted(path: Path, manifest: Manifest) -> tuple[np.ndarray, np.ndarray]:
    """(H, W) uint8 train ids (``VOID`` = 255 for ignore) from a label file, and their
    (256,) int64 pixel counts (counted once, on the raw values, for the check below).

    Palette (P) PNGs are read as indices, never converted to luminance; 2 and 4-bit grey
    PNGs as their stored values (not PIL's 0..255 scaling). Raises
    ``DatasetError`` naming the file for RGB/16-bit files and for values the manifest
    does not define.
    """
    try:
        with _open(path, "label") as im:
            _refuse_lossy(im, path)
            if im.mode not in ("L", "P"):
                raise DatasetError(path, f"{_label_mode_error(path, im.mode, manifest)}")
            step = _low_bit_step(im)
            im.load()
            raw = np.asarray(im) if step == 1 else np.asarray(im) // step
    except (OSError, SyntaxError) as e:
        raise DatasetError(path, f"cannot decode label ({e})") from e
    from softprep import kernels  # compiled: numba is imported only when needed

    lut, valid = manifest.lookup_table
    label, raw_counts = kernels.map_counted(raw, lut[:256])
    bad = [int(v) for v in np.flatnonzero(raw_counts) if not valid[v]]
    if bad:
        hint = ""
        if manifest.dataset == "cityscapes":
            hint = (
                " (labelTrainIds given where labelIds are expected? use --labels trainIds)"
                if manifest.variant is None
                else " (labelIds given where labelTrainIds are expected? drop --labels trainIds)"
            )
        raise DatasetError(
            path,
            f"label values {bad[:10]} are not defined in the {manifest.dataset} manifest{hint}",
        )
    return label, np.bincount(lut[:256], raw_counts, minlength=256).astype(np.int64)


def decode_label(path: Path, manifest: Manifest) -> np.ndarray:
    """(H, W) uint8 train ids (see ``decode_label_counted``)."""
    return decode_label_counted(path, manifest)[0]


def load_pair(pair: Pair, manifest: Manifest) -> tuple[Image.Image, np.ndarray, np.ndarray]:
    """Decode one pair: RGB PIL image, (H, W) uint8 train ids and their (256,) int64
    pixel counts. Sizes must agree. An image without a label gets an all-void one."""
    image = open_image(pair.image)
    if pair.label is None:
        counts = np.zeros(256, np.int64)
        counts[VOID] = image.width * image.height
        return image, np.full((image.height, image.width), VOID, np.uint8), counts
    label, counts = decode_label_counted(pair.label, manifest)
    if image.size[::-1] != label.shape:
        raise DatasetError(
            pair.label,
            f"label is {label.shape[1]}x{label.shape[0]} but image "
            f"{pair.image.name} is {image.width}x{image.height}",
        )
    return image, label, counts


def check_config_json(manifest: Manifest, root: Path) -> list[Problem]:
    """Compare the dataset's own class config (Mapillary ``config*.json``) with the manifest:
    one problem per label whose name or colour differs. Empty if there is no such file."""
    if not manifest.config_json:
        return []
    path = _candidate_root(manifest, Path(root)) / manifest.config_json
    if not path.is_file():
        return []
    try:
        labels = json.loads(path.read_text())["labels"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        return [Problem(str(path), f"not a dataset config with a 'labels' list ({e})")]
    problems = []
    by_id = {c.id: c for c in manifest.classes}
    raw_ids = sorted(manifest.label_values)
    if len(labels) != len(raw_ids):
        problems.append(
            Problem(str(path), f"{len(labels)} labels, the manifest defines {len(raw_ids)}")
        )
    for raw, entry in zip(raw_ids, labels):
        tid = manifest.label_values[raw]
        if tid == manifest.ignore_index:
            continue
        ours = by_id[tid]
        names = {entry.get("name"), entry.get("readable")}
        if ours.name not in names or list(ours.color) != list(entry.get("color", [])):
            problems.append(
                Problem(
                    str(path),
                    f"label {raw} is '{entry.get('name')}' {entry.get('color')}, "
                    f"the manifest says '{ours.name}' {list(ours.color)}",
                )
            )
    return problems


@dataclass
class ScanReport:
    """What ``softprep scan`` prints: per split counts and sizes, a class histogram, problems."""

    manifest: Manifest
    counts: dict[str, int]
    sizes: dict[str, dict[tuple[int, int], int]]  # split -> {(H, W): images}
    class_pixels: np.ndarray  # (C + 1,) int64, last entry = void
    problems: list[Problem]

    def to_json(self, root: Path | str) -> dict:
        """What ``scan --json`` prints: dataset, version, root, per split the pairs and
        sizes (``{"HxW": images}``), the class histogram (pixels per class id, void as
        255; empty without ``--histogram``) and every problem as ``{path, message}``."""
        m = self.manifest
        ids = list(range(m.num_classes)) + [VOID]
        names = m.class_names + ["(void)"]
        histogram = [
            {"class_id": c, "class": n, "pixels": int(p)}
            for c, n, p in zip(ids, names, self.class_pixels)
        ]
        return {
            "dataset": m.dataset,
            "version": m.version,
            "root": str(root),
            "splits": {
                s: {
                    "pairs": n,
                    "sizes": {f"{h}x{w}": c for (h, w), c in self.sizes.get(s, {}).items()},
                }
                for s, n in self.counts.items()
            },
            "histogram": histogram if self.class_pixels.sum() else [],
            "problems": [{"path": p.path, "message": p.message} for p in self.problems],
        }


def scan(
    manifest: Manifest,
    root: Path,
    splits: list[str] | None = None,
    histogram: bool = True,
    progress=None,
) -> ScanReport:
    """Check every pair (sizes, decodability, label values) and count classes.

    Every problem is collected; nothing is raised for individual files.
    ``progress(done, total)`` is called per pair.
    """
    pairs, problems = discover(manifest, root, splits)
    problems = check_config_json(manifest, root) + problems
    counts: dict[str, int] = {}
    sizes: dict[str, dict[tuple[int, int], int]] = {}
    hist = np.zeros(manifest.num_classes + 1, dtype=np.int64)
    for n, pair in enumerate(pairs):
        if progress:
            progress(n + 1, len(pairs))
        try:
            hw = pair_size(pair)
            if histogram and pair.label is not None:
                hist += with_void_last(
                    decode_label_counted(pair.label, manifest)[1], manifest.num_classes
                )
        except DatasetError as e:
            problems.append(Problem(e.path, e.message))
            continue
        counts[pair.split] = counts.get(pair.split, 0) + 1
        sizes.setdefault(pair.split, {})
        sizes[pair.split][hw] = sizes[pair.split].get(hw, 0) + 1
    return ScanReport(manifest, counts, sizes, hist, problems)


def with_void_last(hist256: np.ndarray, num_classes: int) -> np.ndarray:
    """(256,) per-train-id values -> (C + 1,): the C classes, then void."""
    return np.concatenate([hist256[:num_classes], [hist256[VOID]]])
