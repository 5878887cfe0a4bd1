"""The Zarr layout of a soft-label store (the only module that knows it).

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
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import os
from contextlib import contextmanager
from fractions import Fraction
from functools import cached_property
from pathlib import Path

import google_crc32c
import numcodecs
import numpy as np
import zarr
from zarr.abc.store import SuffixByteRequest
from zarr.codecs import BloscCodec, Crc32cCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore, MemoryStore

from softprep.lockfile import LockBusy, LockFile
from softprep.manifest import VOID, Manifest, manifest_from_json
from softprep.quantize import decode_planes

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
# (measured on 2048x1024 levels and the ADE20K fixture photos).
# Every inner chunk ends with a CRC32C of its compressed bytes (zarr v3's crc32c codec), so
# a flipped bit raises on read instead of decoding to wrong labels; shard indexes carry one
# too (zarr's default).
LABEL_CODECS = (BloscCodec(cname="lz4", clevel=5, shuffle="noshuffle"), Crc32cCodec())
COLOUR_CODECS = (
    BloscCodec(cname="zstd", clevel=1, shuffle="bitshuffle", blocksize=CHUNK * CHUNK * 3),
    Crc32cCodec(),
)


class StoreError(ValueError):
    """A store that is missing, incomplete, damaged or built with other options."""


def repair_hint(url: str) -> str:
    """The next step for a store with damaged or missing data (ends every such message)."""
    return f"run 'softprep verify {url}', then the same 'softprep build ...' command with --repair"


def litter(url: str) -> list[Path]:
    """Temporary files (``*.partial``) that a write killed half-way left in a local store
    (ours and zarr's own atomic writes); nothing reads them. Empty for URLs."""
    root = Path(url)
    if "://" in str(url) or not root.is_dir():
        return []
    return sorted(root.rglob("*.partial"))


def remove_litter(url: str) -> list[Path]:
    """Delete ``litter(url)``; only while holding the store's ``writer_lock`` (a running
    build's temporary files are live). Returns the files removed."""
    found = litter(url)
    for path in found:
        path.unlink(missing_ok=True)
    return found


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


def soft_planes_description(k: int) -> str:
    return (
        f"planes 0..{k - 1}: class ids of the top-{k} classes per pixel, largest first (255 = "
        f"void); planes {k}..{2 * k - 2}: probabilities of slots 1..{k - 1} in 1/255 units; "
        "slot 0's probability is 255 minus their sum (probabilities sum to exactly 255). "
        "Pixels past the image's size in ../hw are padding."
    )


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
    # fsspec's local file system makes no folders unless asked (file:// URLs)
    local_url = {"storage_options": {"auto_mkdir": True}} if url.startswith("file://") else {}
    root = zarr.open_group(url, mode="w", attributes={CREATING: True}, **local_url)
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


@contextmanager
def writer_lock(url: str):
    """One writer per local store: an exclusive lock on ``.<name>.lock`` beside it (a
    shortened name with a hash when the store's name is long), removed when the build ends,
    released by the OS however the build exits (never left stuck). Refuses
    (``StoreError``) while another process holds it. URLs are not locked."""
    if "://" in str(url):
        yield
        return
    path = Path(url).absolute()
    name = path.name if len(path.name) <= 200 else (
        f"{path.name[:180]}~{hashlib.sha1(path.name.encode()).hexdigest()[:12]}"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        lock = LockFile(path.with_name(f".{name}.lock")).acquire()
    except LockBusy as e:
        raise StoreError(
            f"{url}: another softprep build is writing this store (pid {e.holder}); "
            "wait for it to finish (its lock is released when it exits)"
        ) from None
    except OSError as e:
        raise StoreError(f"{url}: cannot create its lock file beside it ({e.strerror})") from None
    try:
        yield
    finally:
        lock.release()


async def _list_keys(store, prefix: str) -> list[str]:
    return [k async for k in store.list_prefix(prefix)]


def _padded(data: np.ndarray, shape: tuple, fill: int) -> np.ndarray:
    if data.shape == tuple(shape):
        return np.ascontiguousarray(data)
    out = np.full(shape, fill, dtype=np.uint8)
    out[tuple(slice(0, n) for n in data.shape)] = data
    return out


def _crc32c(data: bytes) -> bytes:
    return google_crc32c.value(data).to_bytes(4, "little")


ABSENT = 2**64 - 1  # a shard index's (offset, nbytes) of an inner chunk that is not stored


class ShardEncoder:
    """One whole shard of an array (``G`` images), encoded as zarr's ``sharding_indexed``
    codec stores it (inner chunks in C order, each Blosc-compressed then followed by its
    CRC32C; then the (offset, nbytes) uint64 little-endian index and its CRC32C), in one
    synchronous pass. zarr's own write path sends every 256x256 inner chunk through its
    async codec pipeline and a thread hand-off, ~3x the cost of the compression itself
    (measured: ~21 of a Cityscapes image's ~28 ms of writing). zarr reads these shards
    back exactly (tested, with the chunk sizes zarr itself writes)."""

    SHUFFLES = {
        "noshuffle": numcodecs.Blosc.NOSHUFFLE,
        "shuffle": numcodecs.Blosc.SHUFFLE,
        "bitshuffle": numcodecs.Blosc.BITSHUFFLE,
    }

    def __init__(self, shard: tuple[int, ...], chunk: tuple[int, ...], blosc: numcodecs.Blosc):
        self.shard, self.chunk, self.blosc = shard, chunk, blosc
        self.grid = tuple(s // c for s, c in zip(shard, chunk))

    @classmethod
    def for_array(cls, arr: zarr.AsyncArray) -> ShardEncoder | None:
        """The encoder of a uint8 array with this module's layout (one image per inner chunk;
        one sharding codec over bytes, blosc and crc32c; index with crc32c, at the end);
        None for any other."""
        meta = arr.metadata.to_dict()
        codecs = meta["codecs"]
        if arr.dtype != np.uint8 or [c["name"] for c in codecs] != ["sharding_indexed"]:
            return None
        conf = codecs[0]["configuration"]
        inner, index = conf["codecs"], conf["index_codecs"]
        if (
            [c["name"] for c in inner] != ["bytes", "blosc", "crc32c"]
            or [c["name"] for c in index] != ["bytes", "crc32c"]
            or index[0].get("configuration", {}).get("endian", "little") != "little"
            or conf["index_location"] != "end"
            or conf["chunk_shape"][0] != 1
        ):
            return None
        b = inner[1]["configuration"]
        blosc = numcodecs.Blosc(
            b["cname"], b["clevel"], cls.SHUFFLES[b["shuffle"]], blocksize=b["blocksize"]
        )
        shard = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        return cls(shard, tuple(conf["chunk_shape"]), blosc)

    def encode(self, images: list[np.ndarray | None]) -> bytes:
        """The shard's bytes from one uint8 array per image of the shard (``G`` of them),
        each of the shard's shape without the image axis (it may pass the array's edge:
        zarr stores edge chunks whole, padded with the fill value), or None for an image
        not stored: its inner chunks are absent and read as fill values."""
        index = np.full((*self.grid, 2), ABSENT, "<u8")
        parts, offset = [], 0
        for coords in np.ndindex(self.grid):
            image = images[coords[0]]
            if image is None:
                continue
            window = tuple(slice(i * c, (i + 1) * c) for i, c in zip(coords[1:], self.chunk[1:]))
            body = self.blosc.encode(np.ascontiguousarray(image[window]))
            parts += [body, _crc32c(body)]
            index[coords] = offset, len(body) + 4
            offset += len(body) + 4
        table = index.tobytes()
        return b"".join([*parts, table, _crc32c(table)])


ImageData = tuple[dict[str, tuple[np.ndarray, np.ndarray]], "np.ndarray | None"]
"""One image's arrays: ``{level name: (planes (2K-1, h, w), rgb (h, w, 3))}`` uint8 and, for
evaluation splits, its (H, W) uint8 full-resolution label (else None)."""


class ImageWriter:
    """Writes shards of images into an open store (what a build worker holds). Array
    handles are opened once: opening one reads its metadata (~0.5 ms each, measured)."""

    def __init__(self, root: zarr.Group):
        self.root = root
        self._arrays: dict[str, tuple[zarr.AsyncArray, ShardEncoder | None]] = {}

    def _array(self, path: str) -> tuple[zarr.AsyncArray, ShardEncoder | None]:
        # inner chunks are written even when all zero: checking costs more than the few
        # bytes an all-zero compressed chunk takes (measured)
        if path not in self._arrays:
            arr = self.root[path].async_array.with_config({"write_empty_chunks": True})
            self._arrays[path] = arr, ShardEncoder.for_array(arr)
        return self._arrays[path]

    def write(self, first: int, images: list[ImageData | None]) -> None:
        """Write the shard of images ``first``, ``first + 1``, ... of every image array:
        ``images`` holds one entry per image of the shard (``first`` is the shard's first
        image), None for an image not built (left absent).

        Each array's shard is written whole (worker-safe), each file atomically: on a local
        disk directly (temporary file, then rename, as zarr's LocalStore does, without its
        thread hand-off: ~0.35 ms less per file, measured), elsewhere through the store.
        Arrays of another layout (older stores) go through zarr's own write path, image by
        image.
        """
        arrays: dict[str, tuple[int, list]] = {}  # path -> (fill, data per image or None)

        def put(path: str, fill: int, slot: int, data: np.ndarray) -> None:
            arrays.setdefault(path, (fill, [None] * len(images)))[1][slot] = data

        for slot, image in enumerate(images):
            if image is None:
                continue
            levels, full_label = image
            for name, (planes, rgb) in levels.items():
                put(f"levels/{name}/soft", 0, slot, planes)
                put(f"levels/{name}/rgb", 0, slot, rgb)
            if full_label is not None:
                put("full/label", 255, slot, full_label)
        shards, others = [], []
        for path, (fill, data) in arrays.items():
            arr, encoder = self._array(path)
            if encoder is None:  # one image after another: each rewrites the shard
                writes = [
                    arr.setitem(first + slot, _padded(d, arr.shape[1:], fill))
                    for slot, d in enumerate(data)
                    if d is not None
                ]
                others.append(_in_order(writes))
                continue
            per = encoder.shard[0]
            if first % per or len(data) > per:
                raise ValueError(f"{path}: images {first}.. are not one shard of {per}")
            padded = [None if d is None else _padded(d, encoder.shard[1:], fill) for d in data]
            key = arr.store_path / _shard_key(arr, first // per)
            shards.append((key, encoder.encode(padded + [None] * (per - len(padded)))))
        buffer = default_buffer_prototype().buffer
        for key, blob in shards:
            if isinstance(key.store, LocalStore):
                _atomic_write(Path(key.store.root, key.path), blob)
            else:
                others.append(key.set(buffer.from_bytes(blob)))

        if others:
            sync(_all(others))


def _shard_key(arr, shard: int) -> str:
    """The key of shard number ``shard`` of an image-sharded array, relative to the array."""
    return arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))


async def _in_order(writes: list) -> None:
    for write in writes:
        await write


def _atomic_write(path: Path, data: bytes) -> None:
    """``data`` in ``path``, whole or not at all: a temporary file beside it, then a rename."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class SoftStore:
    """Read access to a store; what ``softprep info/verify/show`` and ``softtrain`` use."""

    def __init__(self, url: str, mode: str = "r"):
        try:
            self.root = zarr.open_group(url, mode=mode)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise StoreError(f"{url}: no zarr store here") from e
        if NAMESPACE not in self.root.attrs:
            raise StoreError(f"{url}: a zarr group, but not a softprep store (no metadata)")
        self.url = url
        self.meta = dict(self.root.attrs[NAMESPACE])
        if self.meta.get("format") not in READABLE_FORMATS:
            raise StoreError(
                f"{url}: store format {self.meta.get('format')!r} (softprep "
                f"{self.meta.get('softprep_version', '?')}) is not one this version reads "
                f"({', '.join(READABLE_FORMATS)}); rebuild it or update softprep"
            )
        self._arrays: dict[str, zarr.Array] = {}

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def scales(self) -> list[float]:
        return [float(s) for s in self.meta["scales"]]

    @cached_property
    def manifest(self) -> Manifest:
        """The dataset definition the store was built with (variant applied)."""
        return manifest_from_json(self.meta["manifest"], f"{self.url} (manifest)")

    @property
    def classes(self) -> list[dict]:
        """[{id, name, color}] in train-id order."""
        return [{"id": c.id, "name": c.name, "color": list(c.color)} for c in self.manifest.classes]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def splits(self) -> list[str]:
        return list(self.meta["splits"])

    @property
    def image_only_splits(self) -> list[str]:
        """Splits built from images without labels (their labels are all void)."""
        return list(self.meta.get("image_only_splits", []))

    def __len__(self) -> int:
        return self.root["images/name"].shape[0]

    def names(self) -> np.ndarray:
        return self.root["images/name"][:]

    def split_of(self) -> np.ndarray:
        """(N,) split name of each image."""
        return np.array(self.splits)[self.root["images/split"][:]]

    def done(self) -> np.ndarray:
        return self.root["images/done"][:]

    def level_path(self, scale: float | str) -> str:
        """``levels/<name>`` of a level given as 0.125, ``"1/8"`` or ``"x0.125"``."""
        name = scale if str(scale).startswith("x") else level_name(parse_scale(scale))
        if name not in {level_name(s) for s in self.scales}:
            have = ", ".join(scale_label(s) for s in self.scales)
            shown = scale if name == scale else scale_label(parse_scale(scale))
            raise StoreError(f"{self.url}: no level {shown}; levels: {have}")
        return f"levels/{name}"

    def level(self, scale: float | str) -> zarr.Group:
        """The group of a level (see ``level_path``)."""
        return self.root[self.level_path(scale)]

    def array(self, path: str) -> zarr.Array:
        """An array by path, opened once: opening reads its metadata, which per-crop
        reads would otherwise pay each time."""
        if path not in self._arrays:
            self._arrays[path] = self.root[path]
        return self._arrays[path]

    def image_arrays(self) -> list[str]:
        """Paths of the per-image arrays (sharded by image): every level's soft and rgb,
        and ``full/label`` when the store has evaluation splits."""
        paths = [f"{self.level_path(s)}/{a}" for s in self.scales for a in ("soft", "rgb")]
        return paths + (["full/label"] if "full/label" in self.root else [])

    @property
    def images_per_shard(self) -> int:
        """How many consecutive images share one shard (one file) of each image array."""
        return int(self.array(self.image_arrays()[0]).shards[0])

    def shard_key(self, path: str, i: int) -> str:
        """The store key of the shard of array ``path`` that holds image ``i``."""
        arr = self.array(path)
        return f"{arr.path}/{_shard_key(arr, i // self.images_per_shard)}"

    def missing_shards(self, path: str, indices: np.ndarray, read_indexes=False) -> np.ndarray:
        """The images among ``indices`` whose shard of array ``path`` is absent (deleted or
        lost: it would read back as fill values, a valid-looking label). One listing.
        ``read_indexes``: also read the index of each shard that holds several images (one
        small read per shard) and report images that have no inner chunks in it."""
        arr = self.array(path)
        prefix = f"{arr.path}/"
        keys = sync(_list_keys(arr.store, prefix))
        present = {
            int(k[len(prefix) :].split(".")[1])
            for k in keys
            if k[len(prefix) :].startswith("c.") and k.count("/") == prefix.count("/")
        }
        per = self.images_per_shard
        indexes = {}
        missing = []
        for i in (int(i) for i in indices):
            if i // per not in present:
                missing.append(i)
            elif read_indexes and per > 1:
                if i // per not in indexes:
                    indexes[i // per] = self._shard_index(path, i)
                index = indexes[i // per]
                if index is not None and (index[i % per] == ABSENT).any():
                    missing.append(i)
        return np.array(missing, dtype=np.int64)

    def _shard_index(self, path: str, i: int) -> np.ndarray | None:
        """(G, chunks per image) uint64 offsets of the inner chunks in image ``i``'s shard
        (``ABSENT`` where not stored), from the shard's last bytes; None if they are not an
        index (a damaged shard, which reading it reports)."""
        arr = self.array(path)
        per_image = math.prod(s // c for s, c in zip(arr.shards[1:], arr.chunks[1:]))
        n = self.images_per_shard * per_image
        blob = sync(
            arr.store.get(
                self.shard_key(path, i),
                default_buffer_prototype(),
                byte_range=SuffixByteRequest(16 * n + 4),
            )
        )
        data = blob.to_bytes()
        if len(data) != 16 * n + 4 or _crc32c(data[:-4]) != data[-4:]:
            return None
        return np.frombuffer(data[:-4], "<u8").reshape(-1, per_image, 2)[..., 0]

    def hw(self, scale) -> np.ndarray:
        """(N, 2) int32 true sizes at a level."""
        return self.array(f"{self.level_path(scale)}/hw")[:]

    def _window(self, path: str, i: int, window) -> tuple[int, int, int, int]:
        return window or (0, 0, *self.array(f"{path}/hw")[i])

    def _read(self, path: str, i: int, selection: tuple) -> np.ndarray:
        """``array(path)[selection]`` of image ``i``; damaged bytes (a checksum that does not
        match, an unreadable shard) raise ``StoreError`` naming the store, array and image."""
        try:
            return self.array(path)[selection]
        except (ValueError, RuntimeError) as e:
            name = self.root["images/name"][i]
            raise StoreError(
                f"{self.url}: {path} of image {i} ({name}) is damaged ({e}); "
                f"{repair_hint(self.url)}"
            ) from e

    def read_soft(self, scale, i: int, window=None) -> tuple[np.ndarray, np.ndarray]:
        """Image ``i``'s soft label at a level: ids (K, h, w) uint8 and probabilities
        (K, h, w) uint8 summing to 255. ``window`` = (y0, x0, h, w) reads a crop (only the
        chunks it touches); default: the whole image at its true size."""
        path = self.level_path(scale)
        y0, x0, h, w = self._window(path, i, window)
        return decode_planes(
            self._read(f"{path}/soft", i, (i, slice(None), slice(y0, y0 + h), slice(x0, x0 + w)))
        )

    def read_probs(self, scale, i: int, window=None) -> tuple[np.ndarray, np.ndarray]:
        """Image ``i``'s soft label at a level as dense class probabilities: (C, h, w)
        float32 and the void mass (h, w) float32; together they sum to 1 per pixel."""
        index, prob = self.read_soft(scale, i, window)
        c = self.num_classes
        h, w = index.shape[-2:]
        dense = np.zeros((c + 1, h, w), dtype=np.float32)
        rows, cols = np.indices((h, w))
        for slot in range(index.shape[0]):  # one class per pixel per slot: no collisions
            ids = np.where(index[slot] == VOID, c, index[slot])
            dense[ids, rows, cols] += prob[slot] / np.float32(255)
        return dense[:c], dense[c]

    def read_rgb(self, scale, i: int, window=None) -> np.ndarray:
        """Image ``i``'s colour at a level: (h, w, 3) uint8."""
        path = self.level_path(scale)
        y0, x0, h, w = self._window(path, i, window)
        return self._read(f"{path}/rgb", i, (i, slice(y0, y0 + h), slice(x0, x0 + w)))

    def read_full_label(self, i: int) -> np.ndarray:
        """(H, W) uint8 full-resolution train ids (evaluation splits only)."""
        if "full/label" not in self.root:
            raise StoreError(f"{self.url}: no full-resolution labels (no evaluation split)")
        h, w = self.array("images/hw")[i]
        return self._read("full/label", i, (i, slice(0, h), slice(0, w)))

    def stats(self, scale, strategy: str) -> np.ndarray:
        """(N, C+1) float64 per-image class mass of a strategy at a level (void last)."""
        g = self.level(scale)
        if f"stats/{strategy}" not in g:
            have = ", ".join(sorted(g["stats"].array_keys()))
            raise StoreError(f"{self.url}: no statistics for '{strategy}'; recorded: {have}")
        return g[f"stats/{strategy}"][:]

    def full_counts(self) -> np.ndarray:
        """(N, C+1) int64 full-resolution class pixel counts (void last)."""
        return self.root["stats/full"][:]

    def disk_bytes(self, path: str) -> int | None:
        """Bytes on disk under an array or group path (local stores only, else None)."""
        local = Path(self.url)
        if not local.is_dir():
            return None
        return sum(f.stat().st_size for f in (local / path).rglob("*") if f.is_file())

    def describe(self) -> dict:
        """What ``softprep info`` prints: dataset, options, counts, levels, truncation."""
        split = self.split_of()
        done = self.done()
        levels = []
        for scale in self.scales:
            g = self.level(scale)
            hw = g["hw"][:]
            trunc = g["truncated"][:][done]
            pixels = float((hw[done, 0].astype(np.int64) * hw[done, 1]).sum())
            levels.append(
                {
                    "level": scale_label(scale),
                    "name": level_name(scale),
                    "max_hw": [int(v) for v in hw.max(axis=0)],
                    "truncated_mass_share": float(trunc[:, 0].sum() / pixels) if pixels else 0.0,
                    "truncated_max_pixel": float(trunc[:, 1].max()) if len(trunc) else 0.0,
                    "soft_bytes": self.disk_bytes(f"levels/{level_name(scale)}/soft"),
                    "rgb_bytes": self.disk_bytes(f"levels/{level_name(scale)}/rgb"),
                }
            )
        counts = self.full_counts()
        labelled = {}
        for s in self.splits:
            rows = counts[(split == s) & done]
            total = rows.sum()
            labelled[s] = float(1 - rows[:, -1].sum() / total) if total else 0.0
        return {
            "url": self.url,
            "dataset": self.meta["dataset"],
            "weak": self.meta.get("config", {}).get("weak"),
            "labelled_share": labelled,  # per split: pixels not void at full resolution
            "image_only_splits": self.image_only_splits,
            "dataset_version": self.meta["dataset_version"],
            "kernel": self.meta["kernel"],
            "colour_kernel": self.meta.get("colour_kernel"),
            "antialias": self.meta["antialias"],
            "k": self.k,
            "images_per_shard": self.images_per_shard,
            "classes": self.num_classes,
            "images": {s: int((split == s).sum()) for s in self.splits},
            "done": int(done.sum()),
            "skipped": self.meta.get("skipped", []),
            "levels": levels,
            "strategies": self.meta["strategies"],
            "total_bytes": self.disk_bytes("."),
        }
