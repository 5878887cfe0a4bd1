"""Reading a soft-label store: ``SoftStore``, with named accessors for what other modules
need (statistics, done flags, levels, full-resolution labels), so no other module spells a
store path. The layout is ``softprep.layout``; writing is ``softprep.writer``.
"""

from __future__ import annotations

import itertools
import math
import os
from functools import cached_property
from pathlib import Path
from stat import S_ISREG

import numpy as np
import zarr
from zarr.abc.store import SuffixByteRequest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from softprep.layout import (  # noqa: F401  (the names every reader imports from here)
    ABSENT,
    DONE,
    FORMAT,
    FULL_HW,
    FULL_LABEL,
    FULL_STATS,
    NAMESPACE,
    READABLE_FORMATS,
    StoreError,
    _crc32c,
    _shard_key,
    level_name,
    level_path,
    open_group,
    parse_scale,
    scale_label,
)
from softprep.manifest import VOID, Manifest, manifest_from_json
from softprep.planes import decode_planes
from softprep.writer import ShardEncoder


def repair_hint(url: str) -> str:
    """The next step for a store with damaged or missing data (ends every such message)."""
    return f"run 'softprep verify {url}', then the same 'softprep build ...' command with --repair"


async def _list_keys(store, prefix: str) -> list[str]:
    return [k async for k in store.list_prefix(prefix)]


class ShardDamaged(ValueError):
    """Bytes of a shard that cannot be what ``ShardEncoder`` (or zarr) wrote: an index or an
    inner chunk whose checksum does not match, a chunk past the end, one that does not
    decode to its size."""


class ShardReader:
    """Reads an image array of this module's layout (``ShardEncoder``'s, which zarr's own
    sharded writes also produce) in synchronous passes, every CRC32C it touches checked:
    whole shards (one read of the shard's bytes, chunks decoded on demand: what ``softprep
    verify`` uses) or one image's window from a local shard file (its index, then the inner
    chunks the window touches: what crops and evaluation images use). zarr's read path costs
    an async round trip and a thread hand-off per call (~1 ms each, several per read):
    measured, a crop (soft label and colour) takes 3-4x as long through zarr at 256x512 of
    a Cityscapes-size store, 5-7x at 96x128 of real CamVid (``bench_loader.py``)."""

    def __init__(self, arr: zarr.Array, encoder: ShardEncoder):
        self.arr, self.encoder = arr, encoder
        self.fill = int(arr.fill_value)
        self.per_image = math.prod(encoder.grid[1:])
        store = arr.store
        self.folder = Path(store.root, arr.path) if isinstance(store, LocalStore) else None

    @classmethod
    def for_array(cls, arr: zarr.Array) -> ShardReader | None:
        """A reader for an array of this module's layout, None for any other (older stores
        without checksums: read them through zarr)."""
        encoder = ShardEncoder.for_array(arr.async_array)
        return None if encoder is None else cls(arr, encoder)

    def blob(self, shard: int) -> bytes | None:
        """The bytes of shard number ``shard``; None where it is absent."""
        key = _shard_key(self.arr, shard)
        if self.folder is not None:  # a local file: read directly, as ``window`` does
            try:
                return (self.folder / key).read_bytes()
            except (FileNotFoundError, IsADirectoryError):  # absent, as zarr reads it
                return None
        buf = sync(self.arr.store.get(f"{self.arr.path}/{key}", default_buffer_prototype()))
        return None if buf is None else buf.to_bytes()

    @property
    def index_bytes(self) -> int:
        """The length of a shard's index: (offset, nbytes) uint64 per inner chunk, CRC32C."""
        return 16 * math.prod(self.encoder.grid) + 4

    def index(self, blob: bytes) -> np.ndarray:
        """(G, chunks per image, 2) uint64 (offset, nbytes) of the inner chunks from a
        shard's bytes, or its last bytes (``ABSENT`` where a chunk is not stored); raises
        ``ShardDamaged``."""
        n = self.index_bytes
        if len(blob) < n:
            raise ShardDamaged(f"shard of {len(blob)} bytes is shorter than its index")
        table = blob[-n:]
        if _crc32c(table[:-4]) != table[-4:]:
            raise ShardDamaged("stored and computed checksum of the shard index do not match")
        return np.frombuffer(table[:-4], "<u8").reshape(self.encoder.grid[0], self.per_image, 2)

    @staticmethod
    def _body(data: bytes, base: int, end: int, number: int, offset: int, nbytes: int) -> bytes:
        """Inner chunk ``number``'s compressed bytes, CRC-checked, from ``data``: the shard's
        bytes from offset ``base``; ``end``: where the shard's chunk data ends."""
        if nbytes < 4 or offset + nbytes > end:
            raise ShardDamaged(f"inner chunk {number} lies outside the shard's data")
        body = data[offset - base : offset - base + nbytes - 4]
        if _crc32c(body) != data[offset - base + nbytes - 4 : offset - base + nbytes]:
            raise ShardDamaged(f"stored and computed checksum of inner chunk {number} do not match")
        return body

    def _decode(self, body: bytes, number: int) -> np.ndarray:
        """An inner chunk's data, in the chunk's shape without the image axis."""
        chunk = self.encoder.chunk[1:]
        try:
            data = np.frombuffer(self.encoder.blosc.decode(body), np.uint8)
        except MemoryError:  # this process's, not the store's
            raise
        except Exception as e:  # noqa: BLE001 (numcodecs raises RuntimeError or others)
            raise ShardDamaged(f"inner chunk {number} does not decode ({e})") from None
        if data.size != math.prod(chunk):
            raise ShardDamaged(f"inner chunk {number} decodes to {data.size} bytes")
        return data.reshape(chunk)

    def _chunks(self, blob: bytes, entries: np.ndarray):
        """(number, body) of one image's stored inner chunks, each CRC-checked."""
        end = len(blob) - self.index_bytes
        for number, (offset, nbytes) in enumerate(entries.tolist()):
            if offset == ABSENT and nbytes == ABSENT:
                continue
            yield number, self._body(blob, 0, end, number, offset, nbytes)

    def check(self, blob: bytes, entries: np.ndarray) -> None:
        """Checksums of one image's inner chunks (``index(blob)[slot]``), no decoding;
        raises ``ShardDamaged``."""
        for _ in self._chunks(blob, entries):
            pass

    def image(self, blob: bytes, entries: np.ndarray) -> np.ndarray:
        """One image's whole padded data (the shard's shape without the image axis), its
        absent chunks as the fill value; checksums checked, raises ``ShardDamaged``."""
        out = np.full(self.encoder.shard[1:], self.fill, np.uint8)
        chunk, grid = self.encoder.chunk[1:], self.encoder.grid[1:]
        for number, body in self._chunks(blob, entries):
            coords = np.unravel_index(number, grid)
            out[tuple(slice(i * c, (i + 1) * c) for i, c in zip(coords, chunk))] = self._decode(
                body, number
            )
        return out

    def window(self, i: int, window: tuple[slice, ...]) -> np.ndarray:
        """Image ``i``'s data in ``window`` (slices of step 1 over the axes after the image
        axis; axes left out are whole): what ``arr[i, *window]`` returns, read from its local
        shard file (``folder`` is not None): the index, then one read spanning the inner
        chunks the window touches. An absent shard or chunk reads as the fill value, as in
        zarr. Raises ``ShardDamaged``, and ``IndexError`` for an image the array lacks."""
        images = self.arr.shape[0]
        if not -images <= i < images:
            raise IndexError(f"image {i} of an array of {images}")
        i, per = i % images, self.encoder.grid[0]  # a negative i counts from the end, as numpy's
        chunk, grid, shape = self.encoder.chunk[1:], self.encoder.grid[1:], self.arr.shape[1:]
        window = tuple(window) + (slice(None),) * (len(shape) - len(window))
        bounds = [s.indices(size)[:2] for s, size in zip(window, shape)]
        out = np.full([max(0, b - a) for a, b in bounds], self.fill, np.uint8)
        if out.size == 0:
            return out
        spans = (range(a // c, (b - 1) // c + 1) for (a, b), c in zip(bounds, chunk))
        touched = list(itertools.product(*spans))
        path = self.folder / _shard_key(self.arr, i // per)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return out
        try:
            stat = os.fstat(fd)
            if not S_ISREG(stat.st_mode):  # absent, as zarr reads it
                return out
            size = stat.st_size
            if size < self.index_bytes:
                raise ShardDamaged(f"shard of {size} bytes is shorter than its index")
            end = size - self.index_bytes
            entries = self.index(os.pread(fd, self.index_bytes, end))[i % per]
            numbers = [int(np.ravel_multi_index(coords, grid)) for coords in touched]
            stored = {k for k in numbers if entries[k, 0] != ABSENT or entries[k, 1] != ABSENT}
            if not stored:
                return out
            base = min(int(entries[k, 0]) for k in stored)
            stop = min(end, max(int(entries[k, 0]) + int(entries[k, 1]) for k in stored))
            data = os.pread(fd, stop - base, base) if stop > base else b""
        finally:
            os.close(fd)
        for coords, number in zip(touched, numbers):
            if number not in stored:
                continue
            offset, nbytes = (int(v) for v in entries[number])
            decoded = self._decode(self._body(data, base, end, number, offset, nbytes), number)
            src, dst = [], []
            for k, ((a, b), c) in enumerate(zip(bounds, chunk)):
                lo, hi = max(a, coords[k] * c), min(b, (coords[k] + 1) * c)
                src.append(slice(lo - coords[k] * c, hi - coords[k] * c))
                dst.append(slice(lo - a, hi - a))
            out[tuple(dst)] = decoded[tuple(src)]
        return out


class SoftStore:
    """Read access to a store; what ``softprep info/verify/show`` and ``softtrain`` use."""

    def __init__(self, url: str, mode: str = "r"):
        try:
            self.root = open_group(url, mode=mode)
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
        self._readers: dict[str, ShardReader | None] = {}

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

    @property
    def has_full_labels(self) -> bool:
        """Whether the store keeps full-resolution labels (it has evaluation splits)."""
        return FULL_LABEL in self.root

    @property
    def has_statistics(self) -> bool:
        """Whether per-image class statistics were recorded (built by softprep build)."""
        return FULL_STATS in self.root

    def done(self) -> np.ndarray:
        return self.root[DONE][:]

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
        return paths + ([FULL_LABEL] if self.has_full_labels else [])

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
        index (a damaged shard, which reading it reports, or another layout's)."""
        reader = ShardReader.for_array(self.array(path))
        if reader is None:
            return None
        blob = sync(
            reader.arr.store.get(
                self.shard_key(path, i),
                default_buffer_prototype(),
                byte_range=SuffixByteRequest(reader.index_bytes),
            )
        )
        try:
            return reader.index(blob.to_bytes())[..., 0]
        except ShardDamaged:
            return None

    def hw(self, scale) -> np.ndarray:
        """(N, 2) int32 true sizes at a level."""
        return self.array(f"{self.level_path(scale)}/hw")[:]

    def _window(self, path: str, i: int, window) -> tuple[int, int, int, int]:
        return window or (0, 0, *self.array(f"{path}/hw")[i])

    def _read(self, path: str, i: int, selection: tuple) -> np.ndarray:
        """``array(path)[selection]`` of image ``i`` (local shards of this layout read by
        ``ShardReader.window``); damaged bytes (a checksum that does not match, an
        unreadable shard) raise ``StoreError`` naming the store, array and image."""
        if path not in self._readers:  # local shards of this layout: read directly
            reader = ShardReader.for_array(self.array(path))
            self._readers[path] = reader if reader and reader.folder else None
        reader = self._readers[path]
        damage = ShardDamaged if reader else (ValueError, RuntimeError)  # what zarr raises
        try:
            if reader:
                return reader.window(i, selection[1:])
            return self.array(path)[selection]
        except damage as e:
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
        if not self.has_full_labels:
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
        return self.root[FULL_STATS][:]

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
