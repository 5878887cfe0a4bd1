"""Writing images into a store: the shard encoder, the image writer, the one-writer lock and
the temporary files a killed write leaves.

Workers each write whole shards (zarr is safe for concurrent writers only on different
shards); a shard's bytes are written to a temporary file and renamed, so a kill leaves the
previous shard or none, never a torn one.
"""

from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path

import numcodecs
import numpy as np
import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from softprep.layout import ABSENT, StoreError, _all, _crc32c, _shard_key
from softprep.lockfile import LockBusy, LockFile


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
    name = (
        path.name
        if len(path.name) <= 200
        else (f"{path.name[:180]}~{hashlib.sha1(path.name.encode()).hexdigest()[:12]}")
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


def _padded(data: np.ndarray, shape: tuple, fill: int) -> np.ndarray:
    if data.shape == tuple(shape):
        return np.ascontiguousarray(data)
    out = np.full(shape, fill, dtype=np.uint8)
    out[tuple(slice(0, n) for n in data.shape)] = data
    return out


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
        """The encoder of a uint8 array with this module's layout (one image per inner chunk,
        whole images per shard; one sharding codec over bytes, blosc and crc32c; index with
        crc32c, at the end); None for any other."""
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
        if any(s < n for s, n in zip(shard[1:], arr.shape[1:])):  # images split over shards
            return None
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
