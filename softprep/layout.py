"""The Zarr layout of a soft-label store: format constants, codecs, array paths, creation.

::


    store.zarr/                       attrs["softprep"]: build config and metadata
      images/name   (N,) str          "<split>/<stem>" of each pair
      images/split  (N,) uint8        index into attrs splits
      images/hw     (N, 2) int32      full-resolution (H, W)
      images/done   (N,) bool         image complete (all levels, stats)
      stats/full    (N, C+1) int64    full-resolution class pixel counts (void last)
      full/label    (N, H, W) uint8   full-resolution train ids, evaluation splits only
                                      (fill 255 = void)
      levels/<L>/soft   (N, 2K-1, Hl, Wl) uint8   K class-id planes + K-1 prob planes
      levels/<L>/rgb    (N, Hl, Wl, 3) uint8      colour, same kernel
      levels/<L>/hw     (N, 2) int32              true size of each image at this level
      levels/<L>/truncated (N, 2) float64         top-K dropped mass: sum, max per pixel
      levels/<L>/stats/<strategy> (N, C+1) float64  class mass (soft: the stored planes'
                                      exact totals) or counts (nearest)

Arrays are padded to the largest image: read ``hw`` and crop (padding decodes as class 0).
Image arrays have one shard per ``G`` consecutive images (256x256 inner chunks, all planes
per chunk; ``G`` = 1 for 2048x1024 images, more for small ones, so a build creates fewer,
larger files), and parallel workers each write whole shards; only the parent writes the
small arrays. An image that is not built has no inner chunks in its shard (it reads as fill
values: check ``images/done``). Shard keys are flat (``c.<s>.0.0.0`` for shard ``s``, one
file per shard in the array's folder): nested keys cost a build three new folders per
array and shard, ~15 ms of 2048x1024 images' ~100 ms on ext4 (measured).
Level ``L`` is named ``x<scale>``, e.g. ``x0.125`` for 1/8.

``softprep.writer`` writes images into this layout, ``softprep.store`` reads it
(``SoftStore``); other modules name arrays through ``SoftStore`` and the path helpers here.
"""

from __future__ import annotations

import asyncio
import math
from fractions import Fraction
from pathlib import Path

import google_crc32c
import numpy as np
import zarr
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.sync import sync
from zarr.storage import MemoryStore

NAMESPACE = "softprep"
FORMAT = "softprep-store/2"  # 2: dimension names, per-array attributes, chunk checksums
READABLE_FORMATS = ("softprep-store/1", FORMAT)
CREATING = "softprep_creating"  # root attribute while ``create`` runs; gone once it ends
CHUNK = 256
META_CHUNK = 4096  # rows of a per-image metadata chunk, at most ...
META_CHUNK_BYTES = 256 * 1024  # ... and at most this many bytes. The build's parent
# rewrites the chunks its results fall in every few hundred images: with (4096, 151)
# float64 chunks of ADE20K class statistics that cost 0.67-0.77 ms per image at 20,210
# images, with 256 KiB ones 0.35-0.40 (``bench_build.py --what parent``; 64 and 128 KiB
# were slower, 512 KiB the same)

# Codecs, measured on 2048x1024 levels and on the real fixture photos: label planes are
# mostly runs of one value, and lz4 encodes them ~7x faster than zstd for a store only ~3%
# larger; colour with zstd level 1 and bit-shuffle is as small as zstd 3 without it (0.74
# vs 0.75 of raw on the Cityscapes fixture) and encodes ~5x faster; one Blosc block per
# inner chunk (not Blosc's default of several) encodes colour 8-30% faster and up to 1% smaller
# (measured on 2048x1024 levels and the ADE20K fixture photos). lz4 at level 9 rather than 5
# (Blosc's larger blocks): label planes of real CamVid images encode 1.5x and decode 1.4x
# faster and are 5% smaller; full-resolution labels the same or better on every count.
# Every inner chunk ends with a CRC32C of its compressed bytes (zarr v3's crc32c codec), so
# a flipped bit raises on read instead of decoding to wrong labels; shard indexes carry one
# too (zarr's default).
LABEL_CODECS = (BloscCodec(cname="lz4", clevel=9, shuffle="noshuffle"), Crc32cCodec())
COLOUR_CODECS = (
    BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", blocksize=CHUNK * CHUNK * 3),
    Crc32cCodec(),
)


class StoreError(ValueError):
    """A store that is missing, incomplete, damaged or built with other options."""


def parse_scale(text: str | float) -> float:
    """``"1/8"``, ``"0.125"`` or ``0.125`` -> 0.125. Must be positive."""
    try:
        value = float(Fraction(str(text)))
    except (ValueError, ZeroDivisionError) as e:
        if "," in str(text):
            shown = " ".join(v.strip() for v in str(text).split(",") if v.strip())
            raise ValueError(
                f"'{text}' is not a scale: separate values with spaces, e.g. --scales {shown}"
            ) from e
        raise ValueError(f"'{text}' is not a scale (use e.g. 1/8 or 0.25; 2 up-samples)") from e
    if value <= 0:
        raise ValueError(f"scale must be positive, got {text}")
    return value


def level_name(scale: float) -> str:
    """0.125 -> ``x0.125``."""
    return f"x{scale:.6g}"


def scale_label(scale: float) -> str:
    """0.125 -> ``1/8``; 0.3 -> ``0.3``."""
    f = Fraction(scale).limit_denominator(64)
    return f"{f.numerator}/{f.denominator}" if abs(float(f) - scale) < 1e-9 else f"{scale:g}"


LEVELS = "levels"


def level_path(scale: float | str) -> str:
    """The group of a level, e.g. ``levels/x0.125``."""
    scale = parse_scale(scale) if isinstance(scale, str) else scale
    return f"{LEVELS}/{level_name(scale)}"


DONE = "images/done"  # (N,) bool: the image is complete (all levels, statistics)
FULL_HW = "images/hw"
# (N, 6) int64: the source files when the image was built (``SOURCE_FIELDS``; all 0 = not
# recorded: older stores get the array, empty, on a resume)
SOURCE = "images/source"
SOURCE_FIELDS = (
    "image bytes",
    "image mtime ns",
    "image crc32c",
    "label bytes",
    "label mtime ns",
    "label crc32c",
)
FULL_STATS = "stats/full"
FULL_LABEL = "full/label"


def _image_array(group, name, n, planes_shape, dims, attrs, per_shard, fill=0, channels_last=False):
    """An (N, ..., H, W[, 3]) uint8 array with one shard per ``per_shard`` images and 256x256
    inner chunks (one image each); ``channels_last`` marks colour. ``dims``: its dimension
    names; ``attrs``: what it holds."""
    h, w = planes_shape[-2:] if not channels_last else planes_shape[-3:-1]
    ch, cw = min(CHUNK, h), min(CHUNK, w)
    sh, sw = math.ceil(h / ch) * ch, math.ceil(w / cw) * cw
    if channels_last:
        chunks, shards = (1, ch, cw, planes_shape[-1]), (per_shard, sh, sw, planes_shape[-1])
    else:
        lead = tuple(planes_shape[:-2])
        chunks, shards = (1, *lead, ch, cw), (per_shard, *lead, sh, sw)
    return group.create_array(
        name,
        shape=(n, *planes_shape),
        chunks=chunks,
        shards=shards,
        dtype="uint8",
        compressors=COLOUR_CODECS if channels_last else LABEL_CODECS,
        fill_value=fill,
        chunk_key_encoding={"name": "default", "separator": "."},
        dimension_names=dims,
        attributes=attrs,
    )


def _meta_array(group, name, shape, dtype, dims, attrs, fill=0):
    row_bytes = np.dtype(dtype).itemsize * int(np.prod(shape[1:]))
    rows = min(META_CHUNK, META_CHUNK_BYTES // row_bytes, shape[0])
    chunks = (max(rows, 1),) + tuple(shape[1:])
    return group.create_array(
        name,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        fill_value=fill,
        dimension_names=dims,
        attributes=attrs,
    )


def source_array(images: zarr.Group, n: int, overwrite: bool = False) -> zarr.Array:
    """Create ``images/source`` (see ``SOURCE``) in the ``images`` group, all 0;
    ``overwrite`` replaces a damaged one."""
    attrs = {
        "description": "source files when built: " + ", ".join(SOURCE_FIELDS) + "; 0 = not "
        "recorded (label fields 0 for an image without a label)"
    }
    if overwrite and "source" in images:
        del images["source"]
    return _meta_array(
        images, "source", (n, len(SOURCE_FIELDS)), "int64", ("image", "field"), attrs
    )


def soft_planes_description(k: int) -> str:
    return (
        f"planes 0..{k - 1}: class ids of the top-{k} classes per pixel, largest first (255 = "
        f"void); planes {k}..{2 * k - 2}: probabilities of slots 1..{k - 1} in 1/255 units; "
        "slot 0's probability is 255 minus their sum (probabilities sum to exactly 255). "
        "Pixels past the image's size in ../hw are padding."
    )


def open_group(url: str, mode: str, **kwargs) -> zarr.Group:
    """``zarr.open_group``; for writing to a ``file://`` URL with folders made as needed
    (fsspec's local file system makes none unless asked, so new chunk folders failed). A
    local file is refused (``StoreError``): zarr's own error read as a failed write."""
    if "://" not in str(url) and Path(url).is_file():
        raise StoreError(f"{url} is a file, not a store (a store is a folder)")
    if mode != "r" and str(url).startswith("file://"):
        kwargs["storage_options"] = {"auto_mkdir": True}
    return zarr.open_group(url, mode=mode, **kwargs)


def in_process(url: str) -> bool:
    """Whether the store at ``url`` lives in this process's memory (fsspec's ``memory://``):
    worker processes cannot see it (a fork sees a copy, a fresh interpreter nothing), so its
    work stays in this process."""
    return "memory://" in str(url)  # also chained: simplecache::memory://...


def holds_data(url: str) -> bool:
    """Whether ``url`` (a path or fsspec URL) exists and holds anything."""
    if "://" not in str(url):
        path = Path(url)
        return path.exists() and (path.is_file() or any(path.iterdir()))
    import fsspec

    fs, path = fsspec.core.url_to_fs(url)
    return fs.exists(path) and bool(fs.ls(path))


def create(
    url: str,
    meta: dict,
    names: list[str],
    splits: np.ndarray,
    full_hw: np.ndarray,
    level_hw: dict[float, np.ndarray],
    num_classes: int,
    k: int,
    strategies: list[str],
    eval_mask: np.ndarray,
    images_per_shard: int = 1,
) -> zarr.Group:
    """Create every array of a new store (the parent does this once, before any worker).

    ``full_hw`` (N, 2) and ``level_hw[scale]`` (N, 2) int: sizes per image;
    ``eval_mask`` (N,) bool: images whose full-resolution labels are kept;
    ``images_per_shard``: consecutive images sharing one shard (one file) per image array.
    """
    if holds_data(url) and not _interrupted_creation(url):
        raise StoreError(
            f"{url} exists, is not empty and is not a softprep store; refusing to overwrite it "
            "(choose another --out)"
        )
    root = open_group(url, mode="w", attributes={CREATING: True})
    # Every group and array is made in memory, then its few files are written to the store
    # at once: zarr creating them there one by one took ~280 store operations (existence
    # checks, parents), ~0.1 s on a local disk and a round trip each on an object store.
    layout: dict = {}
    _create_arrays(
        zarr.open_group(MemoryStore(layout), mode="w"),
        names,
        splits,
        full_hw,
        level_hw,
        num_classes,
        k,
        strategies,
        eval_mask,
        images_per_shard,
    )
    del layout["zarr.json"]  # the root's metadata is the store's own, written last
    sync(_all((root.store_path / key).set(value) for key, value in layout.items()))
    root.attrs.put({NAMESPACE: meta})  # one write: the store exists from here on
    return root


def _create_arrays(
    root, names, splits, full_hw, level_hw, num_classes, k, strategies, eval_mask, per_shard
) -> None:
    """Every group and array of ``create`` under group ``root``."""
    n = len(names)
    img = root.create_group("images")
    a = img.create_array(
        "name",
        shape=(n,),
        chunks=(min(META_CHUNK, n),),
        dtype=str,
        dimension_names=("image",),
        attributes={"description": "<split>/<stem> of each image"},
    )
    a[:] = np.array(names)
    _meta_array(
        img, "split", (n,), "uint8", ("image",), {"description": "index into attrs softprep.splits"}
    )[:] = splits
    _meta_array(
        img,
        "hw",
        (n, 2),
        "int32",
        ("image", "yx"),
        {"description": "full-resolution (height, width) in pixels"},
    )[:] = full_hw
    _meta_array(
        img,
        "done",
        (n,),
        "bool",
        ("image",),
        {"description": "image complete: every level and statistic written"},
        False,
    )
    source_array(img, n)
    _meta_array(
        root.create_group("stats"),
        "full",
        (n, num_classes + 1),
        "int64",
        ("image", "class"),
        {"description": "full-resolution pixel count per class (train id order, void last)"},
    )
    if eval_mask.any():
        fmax = full_hw[eval_mask].max(axis=0)
        _image_array(
            root.create_group("full"),
            "label",
            n,
            tuple(fmax),
            ("image", "y", "x"),
            {
                "description": "full-resolution train ids (255 = void), evaluation splits only; crop with images/hw"
            },
            per_shard,
            fill=255,
        )
    levels = root.create_group("levels")
    for scale, hw in level_hw.items():
        g = levels.create_group(level_name(scale), attributes={"scale": scale})
        hmax, wmax = (int(v) for v in hw.max(axis=0))
        _image_array(
            g,
            "soft",
            n,
            (2 * k - 1, hmax, wmax),
            ("image", "plane", "y", "x"),
            {"description": soft_planes_description(k), "k": k},
            per_shard,
        )
        _image_array(
            g,
            "rgb",
            n,
            (hmax, wmax, 3),
            ("image", "y", "x", "channel"),
            {"description": "colour (RGB) down-sampled with the soft labels' kernel"},
            per_shard,
            channels_last=True,
        )
        _meta_array(
            g,
            "hw",
            (n, 2),
            "int32",
            ("image", "yx"),
            {"description": "(height, width) of each image at this level"},
        )[:] = hw
        _meta_array(
            g,
            "truncated",
            (n, 2),
            "float64",
            ("image", "stat"),
            {
                "description": "class mass dropped by keeping the top K: (sum over pixels, largest per pixel)"
            },
        )
        st = g.create_group("stats")
        for s in strategies:
            _meta_array(
                st,
                s,
                (n, num_classes + 1),
                "float64",
                ("image", "class"),
                {
                    "description": f"class mass per image at this level by strategy '{s}' (void last)"
                },
            )


async def _all(awaitables) -> list:
    """Await all concurrently, then raise the first error if any: none is left running
    behind a failure (``asyncio.gather`` would leave the others writing into the store)."""
    results = await asyncio.gather(*awaitables, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results


def _interrupted_creation(url: str) -> bool:
    """Whether ``url`` is what a build killed inside ``create`` left: safe to replace."""
    try:
        attrs = zarr.open_group(url, mode="r").attrs
    except (FileNotFoundError, zarr.errors.GroupNotFoundError, ValueError):
        return False
    return CREATING in attrs and NAMESPACE not in attrs


def _shard_key(arr, shard: int) -> str:
    """The key of shard number ``shard`` of an image-sharded array, relative to the array."""
    return arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))


def _crc32c(data: bytes) -> bytes:
    return google_crc32c.value(data).to_bytes(4, "little")


ABSENT = 2**64 - 1  # a shard index's (offset, nbytes) of an inner chunk that is not stored
