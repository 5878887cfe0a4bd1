"""``softprep verify``: check that a store is complete and every stored pixel is valid."""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field

import numpy as np

from softprep import keep_freed_buffers
from softprep.build import (
    SharedTasks,
    blosc_thread_lock,
    end_workers,
    local_pool,
    parallel,
    start_workers,
)
from softprep.layout import SOURCE, SOURCE_FIELDS, in_process
from softprep.manifest import VOID
from softprep.options import build_command
from softprep.planes import TOTAL
from softprep.resample import KERNELS
from softprep.store import (
    ABSENT,
    ShardDamaged,
    ShardReader,
    SoftStore,
    StoreError,
    level_name,
    scale_label,
)
from softprep.writer import litter, remove_litter, writer_lock


@dataclass
class VerifyReport:
    checked: int = 0
    problems: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # left out by --on-error skip: not a failure
    damaged: set[int] = field(default_factory=set)  # finished images with bad or missing data
    layout: bool = True  # False: metadata and arrays disagree (a repair cannot fix that)
    notes: list[str] = field(default_factory=list)  # warnings that are not problems (litter)
    quick: bool = False  # checksums and indexes only: no decoding, no recomputed statistics
    images: int = 0  # images in the store
    seconds: float = 0.0
    meta: dict | None = None  # the store's metadata (its build options), for the advice
    names: np.ndarray | None = field(default=None, repr=False, compare=False)  # (images,)
    # the store's image names, where its metadata is readable

    @property
    def ok(self) -> bool:
        return not self.problems

    def advice(self, url: str) -> str:
        """What to do about the problems: the command that fixes them."""
        if not self.layout:
            return f"{url}: its metadata is damaged; delete it and build it again"
        command = (
            build_command(self.meta, url, repair=bool(self.damaged))
            if self.meta and "config" in self.meta
            else "the same 'softprep build ...' command"
            + (" with --repair" if self.damaged else "")
        )
        if self.damaged:
            return (
                f"{url}: {len(self.damaged)} image(s) have damaged or missing data; rebuild "
                f"them: {command}"
            )
        return f"{url}: the build did not finish; resume it: {command}"

    def to_dict(self, url: str, names=None) -> dict:
        """The report as plain data (``softprep verify --json``); ``names``: image names for
        the damaged images, if not the report's own."""
        damaged = sorted(self.damaged)
        names = self.names if names is None else names
        return {
            "store": url,
            "ok": self.ok,
            "mode": "quick" if self.quick else "full",
            "images": self.images,
            "checked": self.checked,
            "problems": list(self.problems),
            "damaged": [
                {"index": i, "name": None if names is None else str(names[i])} for i in damaged
            ],
            "metadata_ok": self.layout,
            "skipped": list(self.skipped),
            "notes": list(self.notes),
            "next_step": None if self.ok else self.advice(url),
            "seconds": round(self.seconds, 3),
        }


def check_planes(planes: np.ndarray, num_classes: int) -> list[str]:
    """Problems in one image's (2K-1, h, w) store planes: probabilities that do not sum to
    255, class ids outside the class table, slot 0 that is not the largest."""
    k = (planes.shape[0] + 1) // 2
    index, rest = planes[:k], planes[k:].astype(np.int32)
    first = TOTAL - rest.sum(axis=0)
    out = []
    if (first < 0).any():
        out.append(f"{int((first < 0).sum())} pixel(s) whose probabilities exceed 255")
    if (rest > first[None]).any():
        out.append(
            f"{int((rest > first[None]).any(axis=0).sum())} pixel(s) whose slot 0 is not the largest"
        )
    prob = np.concatenate([first[None], rest])
    bad = (prob > 0) & (index >= num_classes) & (index != VOID)
    if bad.any():
        out.append(
            f"class ids {sorted(set(index[bad].tolist()))[:10]} outside 0..{num_classes - 1} and void"
        )
    return out


def check_source_record(store: SoftStore) -> list[str]:
    """A problem if ``images/source`` (the record of the source files, no image data) is
    there but unreadable or misshapen; the next build replaces it. Older stores lack it."""
    images = store.root["images"]
    try:
        if "source" not in images:
            return []
        shape = images["source"][:].shape
        want = (len(store), len(SOURCE_FIELDS))
        if shape == want:
            return []
        reason = f"shape {shape}, expected {want}"
    except (ValueError, RuntimeError, KeyError) as e:
        reason = f"unreadable ({type(e).__name__}: {e})"
    return [
        f"{SOURCE}: {reason}; it records the source files, not image data: the same "
        "'softprep build ...' command replaces it"
    ]


def check_attributes(store: SoftStore) -> list[str]:
    """Problems where the store's metadata disagrees with itself or with its arrays: the
    options block against the build config, levels, planes (K), class count, strategies,
    image count. An empty list means the arrays can be read as the metadata says."""
    meta, config, out = store.meta, store.meta.get("config", {}), []
    for key in ("kernel", "antialias", "k", "scales", "short_side"):
        if key in config and config[key] != meta.get(key):
            out.append(
                f"attribute '{key}' is {meta.get(key)!r} but the build recorded {config[key]!r}"
            )
    if meta.get("kernel") not in KERNELS:
        out.append(f"attribute 'kernel' {meta.get('kernel')!r} is not a known kernel")
    try:
        n, c = len(store), store.num_classes
        levels = set(store.root["levels"].group_keys())
        wanted = {level_name(s) for s in store.scales}
        if levels != wanted:
            out.append(f"levels {sorted(levels)} but attribute 'scales' says {sorted(wanted)}")
        paths = [f"levels/{name}/soft" for name in sorted(levels & wanted)]
        for path in paths:
            planes = store.root[path].shape[1]
            if planes != 2 * store.k - 1:
                out.append(
                    f"{path} holds {planes} planes but attribute 'k' = {store.k} needs {2 * store.k - 1}"
                )
        expect = {"stats/full": (n, c + 1), "images/done": (n,), "images/hw": (n, 2)}
        for name in sorted(levels & wanted):
            for arr in ("soft", "rgb", "hw"):
                expect[f"levels/{name}/{arr}"] = (n,)
            for strategy in meta.get("strategies", []):
                expect[f"levels/{name}/stats/{strategy}"] = (n, c + 1)
        for path, shape in expect.items():
            if path not in store.root:
                out.append(f"{path}: array missing")
            elif store.root[path].shape[: len(shape)] != shape:
                out.append(f"{path}: shape {store.root[path].shape}, expected {shape}")
    except (KeyError, ValueError, FileNotFoundError) as e:
        out.append(f"store layout unreadable ({type(e).__name__}: {e})")
    return out


def _row_sum_problems(row: np.ndarray, pixels: int, what: str) -> list[str]:
    """Class masses of one image must add up to its pixel count (mass is conserved)."""
    if abs(float(row.sum()) - pixels) > 1e-6 * pixels + 1e-6:
        return [f"{what} add up to {float(row.sum()):.6g}, not the {pixels} pixels"]
    return []


def _clean_litter(url: str, report: VerifyReport) -> None:
    """Remove the temporary files an interrupted write left (a note, not a problem: nothing
    reads them); while a build holds the store, or where it cannot be written, only list
    them."""
    found = litter(url)
    if not found:
        return
    try:
        with writer_lock(url):
            remove_litter(url)
    except (StoreError, OSError) as e:
        reason = e if isinstance(e, StoreError) else f"cannot remove them: {e}"
        report.notes.append(
            f"{len(found)} temporary file(s) of an interrupted or running write, e.g. "
            f"{found[0]}, left in place ({reason})"
        )
        return
    report.notes.append(
        f"removed {len(found)} temporary file(s) left by an interrupted write, e.g. {found[0]}"
    )


def _label_problems(label: np.ndarray, counts: np.ndarray, c: int, name: str) -> list[str]:
    """A full-resolution label's histogram (void last) against its recorded counts."""
    hist = np.bincount(label.ravel(), minlength=VOID + 1)
    if hist[c:VOID].any() or not np.array_equal(np.append(hist[:c], hist[VOID]), counts):
        return [f"{name}: full-resolution counts differ from the stored full label"]
    return []


class _Checker:
    """What checking the data of a store's images needs, opened once per process: the
    store, sizes, a ``ShardReader`` per image array (None for arrays of another layout)."""

    def __init__(self, store: SoftStore):
        keep_freed_buffers()  # each shard's decoded arrays reuse the last one's memory
        self.store = store
        self.names = store.names()
        self.full_hw = store.root["images/hw"][:]
        self.level_hw = {s: store.hw(s) for s in store.scales}
        self.paths = store.image_arrays()
        self.readers = {p: ShardReader.for_array(store.array(p)) for p in self.paths}
        self.own_layout = all(r is not None for r in self.readers.values())
        self.per = store.images_per_shard
        self.c = store.num_classes


@functools.lru_cache(maxsize=2)
def _checker_for(url: str, build_id: str | None) -> _Checker:
    """A worker's ``_Checker``, kept while it verifies the same store: ``build_id`` changes
    when a store is created again at the same place (workers outlive one verify)."""
    return _Checker(SoftStore(url))


def _check_shard(checker, images, evaluated, counts, quick) -> list[tuple]:
    """The data problems of the finished ``images`` (one shard's) of a store: per image
    (index, arrays whose data is missing, full-label problems, {scale: problems}). Each
    image array's shard is read once; ``quick``: checksums only (no decoding)."""
    if isinstance(checker, tuple):  # (url, build id) in a worker: opened once per process
        blosc_thread_lock()  # as the build's workers: no semaphore left when it is killed
        checker = _checker_for(*checker)
    names, per = checker.names, checker.per
    if not checker.own_layout:
        return [
            _check_image_zarr(checker, i, e, row, quick)
            for i, e, row in zip(images, evaluated, counts)
        ]
    shard = images[0] // per
    lost: dict[int, list[str]] = {i: [] for i in images}
    found: dict[str, tuple] = {}  # path -> (blob, index) or (None, error)
    for path in checker.paths:
        wanted = [i for i, e in zip(images, evaluated) if e or path != "full/label"]
        if not wanted:
            continue
        reader = checker.readers[path]
        blob = reader.blob(shard)
        if blob is None:
            for i in wanted:
                lost[i].append(path)
            continue
        try:
            found[path] = (blob, reader.index(blob))
        except ShardDamaged as e:
            found[path] = (None, e)
            continue
        if per > 1:  # an image of a shared shard without its chunks: missing
            for i in wanted:
                if (found[path][1][i % per] == ABSENT).any():
                    lost[i].append(path)

    def data(path: str, i: int, decode: bool):
        blob, index = found[path]
        if blob is None:
            raise index
        reader = checker.readers[path]
        if decode:
            return reader.image(blob, index[i % per])
        reader.check(blob, index[i % per])
        return None

    out = []
    for i, e, row in zip(images, evaluated, counts):
        full, levels = [], {}
        if not lost[i]:
            if e:
                h, w = (int(v) for v in checker.full_hw[i])
                try:
                    label = data("full/label", i, not quick)
                except ShardDamaged as err:
                    full.append(f"{names[i]}: full label unreadable ({type(err).__name__}: {err})")
                else:
                    if not quick:
                        full += _label_problems(label[:h, :w], row, checker.c, names[i])
            for scale in checker.store.scales:
                where = f"{names[i]} at {scale_label(scale)}"
                path = f"levels/{level_name(scale)}"
                hh, ww = (int(v) for v in checker.level_hw[scale][i])
                try:
                    planes = data(f"{path}/soft", i, not quick)
                    data(f"{path}/rgb", i, not quick)
                except ShardDamaged as err:
                    levels[scale] = [f"{where}: unreadable ({type(err).__name__}: {err})"]
                    continue
                if not quick:
                    levels[scale] = [
                        f"{where}: {p}" for p in check_planes(planes[:, :hh, :ww], checker.c)
                    ]
        out.append((i, lost[i], full, levels))
    return out


def _check_image_zarr(checker: _Checker, i: int, evaluated: bool, row, quick: bool) -> tuple:
    """``_check_shard``'s answer for one image of a store of another layout (older ones,
    without checksums), read through zarr; missing data is found by the parent."""
    store, names, c = checker.store, checker.names, checker.c
    full, levels = [], {}
    if evaluated:
        h, w = (int(v) for v in checker.full_hw[i])
        try:
            label = store.array("full/label")[i, :h, :w]
        except Exception as e:  # noqa: BLE001 (damaged chunks raise codec errors of any type)
            full.append(f"{names[i]}: full label unreadable ({type(e).__name__}: {e})")
        else:
            full += _label_problems(label, row, c, names[i])
    for scale in store.scales:
        where = f"{names[i]} at {scale_label(scale)}"
        path = store.level_path(scale)
        hh, ww = (int(v) for v in checker.level_hw[scale][i])
        try:
            planes = store.array(f"{path}/soft")[i, :, :hh, :ww]
            store.array(f"{path}/rgb")[i, :hh, :ww]
        except Exception as e:  # noqa: BLE001
            levels[scale] = [f"{where}: unreadable ({type(e).__name__}: {e})"]
            continue
        levels[scale] = [f"{where}: {p}" for p in check_planes(planes, c)]
    return i, [], full, levels


def _bad_rows(rows: np.ndarray, pixels: np.ndarray) -> np.ndarray:
    """Rows (N, C+1) whose sum is not their pixel count (``_row_sum_problems``'s rule)."""
    sums = rows.sum(axis=1, dtype=np.float64)
    return np.abs(sums - pixels) > 1e-6 * pixels + 1e-6


def verify(
    store: SoftStore | str,
    progress=None,
    jobs: int = 1,
    quick: bool = False,
    keep_workers: bool = True,
    workers=None,
) -> VerifyReport:
    """Metadata consistent with the arrays; every image complete (or skipped on purpose,
    listed apart); every finished image's shards present and readable (CRC32C-checked in
    stores that have checksums); soft planes valid; statistics consistent with the sizes
    and, for full-resolution labels, equal to their histogram. Reads the whole store.
    ``damaged`` lists the finished images with a problem (what ``build --repair`` rebuilds);
    temporary files of an interrupted write are removed (a note; see ``_clean_litter``).

    ``store``: an open store, or its path or URL: then the CLI forks the worker processes of
    ``jobs`` > 1 before it opens the store (``start_workers``: not once zarr's I/O thread
    runs), ready at once instead of fresh interpreters (~0.7 s each).
    ``jobs``: processes checking shards in parallel (joblib, as the build); one for a store
    in this process's memory (``layout.in_process``).
    ``quick``: metadata, statistics sums, shard indexes and every chunk's checksum, without
    decoding: finds lost, truncated and flipped bytes, not invalid planes written with valid
    checksums or statistics that disagree with the labels. ``progress(done, total)`` is
    called after each shard. ``keep_workers``: see ``softprep.build.end_workers``.
    ``workers``: a running pool (``local_pool``'s) to check the shards on instead, left
    running (``build --repair``: the build's own, forked). Sets glibc to keep freed buffers
    for the rest of the process (``keep_freed_buffers``)."""
    start, pool = time.monotonic(), workers
    jobs = 1 if in_process(getattr(store, "url", store)) else jobs
    try:
        if not isinstance(store, SoftStore):
            pool = pool or start_workers(jobs)
            store = SoftStore(store)
        if pool is None and jobs != 1 and len(store) > store.images_per_shard:
            pool = local_pool(jobs)  # fresh interpreters here, in a process running zarr
        return _verify(store, progress, jobs, quick, start, pool)
    finally:
        if not keep_workers and pool is not workers:
            end_workers(pool)


def _verify(store, progress, jobs, quick, start, pool) -> VerifyReport:
    report = VerifyReport(quick=quick)
    _clean_litter(store.url, report)
    report.problems += check_attributes(store)
    if report.problems:
        report.layout = False
        report.seconds = time.monotonic() - start
        return report
    report.problems += check_source_record(store)
    report.meta = store.meta
    checker = _Checker(store)
    report.images = len(store)
    done = store.done()
    names = report.names = checker.names
    skipped = {
        s["index"]: f"{s['path']}: {s['error']}"
        for s in store.meta.get("skipped", [])
        if s.get("index") is not None
    }
    for i in np.flatnonzero(~done):
        if i in skipped:
            report.skipped.append(f"{names[i]}: skipped by the build ({skipped[i]})")
        else:
            report.problems.append(f"{names[i]}: not built (incomplete build; run the build again)")
    finished = np.flatnonzero(done)
    evaluated = np.isin(store.split_of(), store.meta.get("eval_splits", []))
    lost: dict[int, list[str]] = {}
    for path in checker.paths:  # absent shard files: one listing per array
        wanted = finished[evaluated[finished]] if path == "full/label" else finished
        read_indexes = not checker.own_layout  # else each task reads its shards' indexes
        for i in store.missing_shards(path, wanted, read_indexes=read_indexes):
            lost.setdefault(int(i), []).append(path)
    counts = store.full_counts()
    per = checker.per
    groups: dict[int, list[int]] = {}
    for i in finished:
        if int(i) not in lost:
            groups.setdefault(int(i) // per, []).append(int(i))
    tasks = [(g, [bool(evaluated[i]) for i in g], counts[g]) for g in groups.values()]
    results: dict[int, tuple] = {}
    total = len(finished)
    if progress:
        progress(len(lost), total)
    key = (store.url, store.meta.get("build_id"))
    if jobs == 1 or len(tasks) <= 1:
        outputs = (_check_shard(checker, g, e, c, quick) for g, e, c in tasks)
    elif pool is not None:  # jobs - 1 workers and this process, as the build
        outputs = SharedTasks(pool, tasks, lambda t: (key, *t, quick), _check_shard).results()
    else:  # another joblib backend (Dask)
        outputs = parallel(jobs, _check_shard, ((key, *t, quick) for t in tasks))
    done_images = len(lost)
    try:
        for shard_results in outputs:
            for r in shard_results:
                results[r[0]] = r
                if r[1]:
                    lost.setdefault(r[0], []).extend(r[1])
            done_images += len(shard_results)
            if progress:
                progress(done_images, total)
    finally:
        outputs.close()  # no more shards sent, before the workers go (``verify``)

    def problem(i: int, problems: list[str]) -> None:
        report.problems.extend(problems)
        if problems:
            report.damaged.add(int(i))

    for i, paths in sorted(lost.items()):
        order = [p for p in checker.paths if p in paths]
        problem(i, [f"{names[i]}: data missing in {', '.join(order)}"])
    full_hw = checker.full_hw.astype(np.int64)
    bad_full = _bad_rows(counts, full_hw[:, 0] * full_hw[:, 1])
    bad_level = {}
    for scale in store.scales:
        hw = checker.level_hw[scale].astype(np.int64)
        g = store.level(scale)
        for strategy in store.meta.get("strategies", []):
            rows = g[f"stats/{strategy}"][:]
            bad_level[scale, strategy] = (rows, _bad_rows(rows, hw[:, 0] * hw[:, 1]))
    for i in finished:
        h, w = (int(v) for v in checker.full_hw[i])
        if bad_full[i]:
            problem(i, _row_sum_problems(counts[i], h * w, f"{names[i]}: full-resolution counts"))
        _, _, full, levels = results.get(int(i), (i, [], [], {}))
        problem(i, full)
        for scale in store.scales:
            where = f"{names[i]} at {scale_label(scale)}"
            hh, ww = (int(v) for v in checker.level_hw[scale][i])
            for strategy in store.meta.get("strategies", []):
                rows, bad = bad_level[scale, strategy]
                if bad[i]:
                    problem(
                        i,
                        _row_sum_problems(rows[i], hh * ww, f"{where}: '{strategy}' statistics"),
                    )
            problem(i, levels.get(scale, []))
        report.checked += 1
    report.seconds = time.monotonic() - start
    return report
