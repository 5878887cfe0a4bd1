"""``softprep build``: read a dataset once, write paired soft-label pyramids to a store.

The parent discovers pairs, reads their sizes from file headers, creates every array, then
runs one task per shard (``G`` consecutive images: one for 2048x1024 images, more for small
ones); with ``jobs`` N on the local (loky) backend, N - 1 worker processes and the parent
itself take shards from one queue (``SharedTasks``), elsewhere (Dask) joblib runs them. A
task decodes its pairs, computes every level (soft label, colour, statistics) and writes the
whole shards; it returns only the small per-image statistics, which the parent writes in
batches followed by the ``done`` flags. Killing the build at any point loses at most the
unflushed batch and the shards being built; running the same command again removes the
temporary files a killed write left, skips completed shards and rewrites the others whole
(their images count as not done until then). An image whose files changed since it was
built counts as not done: each image records its files' sizes, times and CRC-32C as its
task read them, and a file whose time alone differs is read again to compare its bytes.
``repair`` also rewrites the shards of images that ``softprep verify`` finds damaged.
"""

from __future__ import annotations

import collections
import ctypes
import errno
import functools
import json
import multiprocessing
import os
import queue
import signal
import socket
import sys
import threading
import time
import uuid
import warnings
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import zarr

from softprep import OWN_PROCESS, __version__, gc_paused, keep_freed_buffers, layout, writer
from softprep.datasets import (
    UNLABELED_SPLIT,
    DatasetError,
    Pair,
    Problem,
    check_config_json,
    discover,
    file_crc,
    images_without_labels,
    load_pair,
    pair_size,
    source_record,
    source_stamp,
    with_void_last,
)
from softprep.manifest import VOID, Manifest, same_labels
from softprep.options import (
    BuildOptions,
    build_command,
    choose_images_per_shard,
    level_size,
    strategy_masses,
)
from softprep.planes import RULE
from softprep.resample import Resampler, change_counts
from softprep.store import SoftStore, StoreError
from softprep.weak_labels import WeakProtocol

FLUSH_EVERY = 256
FLUSH_SECONDS = 10.0


class BuildError(RuntimeError):
    """The build cannot start or had to stop; the message names the files concerned."""


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. a container's or
    ``taskset``'s share), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def auto_jobs() -> int:
    """``--jobs auto``: the usable cores less the load already on them (the 1-minute load
    average, rounded), at least 1. On 2 cores with one other busy process this is 1: two
    jobs there were slower than one (0.83x, measured), as both wait for the core the other
    process holds while paying the worker's start-up."""
    cores = usable_cores()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        load = 0.0
    return max(1, min(cores, int(cores - load + 0.5)))


def parse_jobs(text: str | int) -> int:
    """``--jobs``: a positive number of processes, or ``auto`` (``auto_jobs``)."""
    if str(text).strip().lower() == "auto":
        return auto_jobs()
    try:
        jobs = int(text)
    except ValueError:
        raise ValueError(f"--jobs takes a positive number or auto, not '{text}'") from None
    if jobs < 1:
        raise ValueError(f"--jobs takes a positive number or auto, not {jobs}")
    return jobs


@dataclass
class ImageResult:
    """What a task returns to the parent: statistics or the error that stopped it."""

    index: int
    full: np.ndarray | None = None  # (C+1,) int64
    levels: dict = field(default_factory=dict)  # name -> {"truncated": (2,), strategy: (C+1,)}
    error: Problem | None = None
    source: np.ndarray | None = None  # (6,) int64, the files as read (``source_record``)


def process_pair(
    pair: Pair, manifest: Manifest, options: BuildOptions, keep_full: bool, number: int = 0
):
    """Decode one pair and compute every level: returns ({level: (planes, rgb)}, result
    without index, full label or None). Training pairs (not ``keep_full``) are thinned by
    ``options.weak``, seeded by the image ``number``. Pure: writes nothing."""
    image, label, counts = load_pair(pair, manifest)
    if options.weak and not keep_full:
        label = WeakProtocol.parse(options.weak).thin(label, options.weak_seed, number)
        counts = np.bincount(label.ravel(), minlength=256).astype(np.int64)
    c = manifest.num_classes
    result = ImageResult(index=-1, full=with_void_last(counts, c))
    arrays = {}
    changes = change_counts(label)
    for scale in options.scales:
        out_hw = level_size(label.shape, scale, options.short_side)
        r = Resampler.make(label.shape, out_hw, options.kernel, options.antialias)
        planes, soft_mass, truncated = r.soft_planes(label, options.k, changes)
        rc = r
        if options.colour_kernel is not None:  # unpaired on purpose (a baseline)
            rc = Resampler.make(label.shape, out_hw, options.colour_kernel, options.antialias)
        arrays[layout.level_name(scale)] = (planes, rc.colour(image))
        stats = {"truncated": np.array([truncated.sum(), truncated.max()])}
        stats |= strategy_masses(
            label, counts, out_hw, options, options.strategies, c, r, soft_mass
        )
        result.levels[layout.level_name(scale)] = stats
    return arrays, result, (label if keep_full else None)


@functools.lru_cache(maxsize=4)
def _open_for_write(url: str, build_id: str) -> writer.ImageWriter:
    """The store's writer, opened once per worker process, which is set up for the build:

    - one zarr IO thread: parallelism comes from ``--jobs``, and one thread per job
      avoids oversubscribing the cores (2 jobs on 2 cores: ~10% more images/s, measured);
    - freed buffers kept for the next image (``keep_freed_buffers``).
    """
    zarr.config.set({"threading.max_workers": 1})
    keep_freed_buffers()
    return writer.ImageWriter(layout.open_group(url, mode="r+"))


def _local_worker(parent: tuple[str, int]) -> bool:
    """Whether this process is a worker on the build's own host (not a Dask worker
    elsewhere, not the build process itself as with ``--jobs 1``)."""
    return parent[0] == socket.gethostname() and parent[1] != os.getpid()


def _exit_if_orphaned(parent: tuple[str, int]) -> None:
    """End this local worker if the build process ``parent`` = (host name, pid) is gone,
    instead of writing shards that a resumed build is rewriting."""
    if not _local_worker(parent):
        return
    try:
        os.kill(parent[1], 0)
    except ProcessLookupError:
        os._exit(1)
    except PermissionError:
        pass  # alive, under another user


@functools.lru_cache(maxsize=1)
def _watch_parent(parent: tuple[str, int]) -> None:
    """In a local loky worker that has taken a shard: a daemon thread checks every second
    that the build process is alive, so it ends when idle too (loky's idle workers also
    time out after 300 s; forked workers: ``_die_with_parent``)."""
    if not _local_worker(parent):
        return

    def watch() -> None:
        while True:
            _exit_if_orphaned(parent)
            time.sleep(1.0)

    threading.Thread(target=watch, name="softprep-parent-watch", daemon=True).start()


@contextmanager
def _workers_ignore_interrupts():
    """Worker processes started within (and by the pool's manager thread, started within
    too) inherit a blocked SIGINT: Ctrl-C, which a terminal sends to the whole process group,
    reaches only the build process, which stops the workers itself (no worker tracebacks,
    no workers dying mid-start). A SIGINT that arrives meanwhile is delivered on leaving."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    if not _may_fork():  # loky's workers register semaphores with it (a fork's are unlinked)
        from multiprocessing import resource_tracker

        resource_tracker.ensure_running()  # its start unblocks SIGINT: started first, it does not
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


@functools.lru_cache(maxsize=1)
def blosc_thread_lock() -> None:
    """In a worker: numcodecs guards blosc's global context with a lock it creates on first
    use, a ``multiprocessing.Lock``, which in a loky worker is a named semaphore; a worker
    ended by an interrupted build leaves it to Python's resource tracker, which warns
    "leaked semaphore objects" at exit. The context is per process, so a thread lock guards
    it equally (numcodecs 0.16: ``_MUTEX``; skipped where that changes)."""
    import numcodecs.blosc as blosc

    if getattr(blosc, "_MUTEX_IS_INIT", None) is False:
        blosc._MUTEX, blosc._MUTEX_IS_INIT = threading.Lock(), True


@contextmanager
def _interrupts_held():
    """Ctrl-C (SIGINT) held while the block runs, then handled as it would have been: numba
    loading the compiled kernels must not be cut short by a KeyboardInterrupt, after which
    the next kernel call crashed the build process (-SIGSEGV) or the interrupt was lost,
    each in about 1 of 15 Ctrl-C tests. Main thread only, where Python runs its handlers."""
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or not callable(previous):
        yield  # elsewhere, or SIGINT ignored (the workers): nothing to hold
        return
    held = []
    signal.signal(signal.SIGINT, lambda *args: held.append(args))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    for args in held[:1]:
        previous(*args)


@functools.lru_cache(maxsize=4)
def _warm_up(options: BuildOptions) -> None:
    """Imports, and the compiled kernels loaded from numba's cache by a tiny image through
    the real path, once per process and with Ctrl-C held (``_interrupts_held``): a worker
    does it while the build process reads the headers, the build process before its first
    shard."""
    from PIL import Image

    with _interrupts_held(), gc_paused():
        from softprep import kernels

        raw = np.asarray(Image.new("L", (64, 64)))  # read-only, like a decoded label
        label, counts = kernels.map_counted(raw, np.zeros(256, np.uint8))
        r = Resampler.make(label.shape, (8, 8), options.kernel, options.antialias)
        r.soft_planes(label, options.k, change_counts(label))
        strategy_masses(label, counts, (8, 8), options, options.strategies, 1, r)


def _task(url, build_id, first, pairs, manifest, options, keep_full, parent) -> list:
    """One shard: compute images ``first``, ``first + 1``, ... (``pairs``, ``keep_full``:
    one per image) and write their shards (runs in a worker). Returns an ``ImageResult``
    per image; a bad file comes back as its ``error`` (plain, picklable data), never as an
    exception, and its image is left out of the shard."""
    _watch_parent(parent)
    blosc_thread_lock()
    _warm_up(options)
    results, images = [], []
    for i, (pair, full) in enumerate(zip(pairs, keep_full), start=first):
        try:
            source = np.array(source_record(pair), dtype=np.int64)  # before the decode
            arrays, result, label = process_pair(pair, manifest, options, full, i)
            result.source = source
        except DatasetError as e:
            result, arrays = ImageResult(index=i, error=Problem(e.path, e.message, i)), None
        except MemoryError:
            message = "not enough memory to process this pair (free memory or use fewer --jobs)"
            result, arrays = ImageResult(index=i, error=Problem(str(pair.image), message, i)), None
        result.index = i
        results.append(result)
        images.append(None if arrays is None else (arrays, label))
    _exit_if_orphaned(parent)  # the last moment before writing
    _open_for_write(url, build_id).write(first, images)
    return results


def local_pool(jobs: int):
    """For ``jobs`` > 1 (or joblib's -1, -2, ...) on the default (loky) backend: ``jobs - 1``
    worker processes, as this process builds shards too (``SharedTasks``); None for one job
    (run here) or another joblib backend (Dask), which runs them (``parallel``). The workers
    are forked where that is safe (``_may_fork``), else loky's reusable executor (fresh
    interpreters).

    Why the build process works: a loky worker's start-up (a fresh interpreter, imports,
    the compiled kernels from numba's cache) costs ~0.6 s of CPU before its first task,
    where this process is warm already and would otherwise only wait; on 2 cores and 701
    CamVid images (~9 s of work) that start-up was most of the gap to 2x."""
    if jobs == 1 or not default_backend():
        return None
    if jobs < 1 or multiprocessing.current_process().daemon:  # joblib's rules: -1 is one
        jobs = _effective_jobs(jobs)  # per core, -2 all but one; a daemon process starts none
    workers = jobs - 1
    if workers < 1:
        return None
    if _may_fork():
        return ProcessPoolExecutor(
            workers, multiprocessing.get_context("fork"), _die_with_parent, (os.getpid(),)
        )
    import joblib
    from joblib.executor import get_memmapping_executor

    backend, _ = joblib.parallel.get_active_backend()
    # the executor joblib.Parallel itself shares (loky's reusable one), set up as joblib does
    return get_memmapping_executor(
        workers, timeout=300, env=backend._prepare_worker_env(n_jobs=workers)
    )


def start_workers(jobs: int):
    """``local_pool(jobs)``'s workers forked now, SIGINT blocked in them
    (``_workers_ignore_interrupts``), where ``_may_fork``: for a command that must start them
    before it opens a store (zarr's I/O thread rules out a fork). None elsewhere (a fresh
    interpreter gains nothing from starting early), and where ``local_pool`` gives none
    (one job, another joblib backend, a daemon process)."""
    if not _may_fork():
        return None
    with _workers_ignore_interrupts():
        pool = local_pool(jobs)
        for _ in range(pool._max_workers if pool is not None else 0):
            pool.submit(blosc_thread_lock)
    return pool


def default_backend() -> bool:
    """Whether joblib's active backend is its default (loky), as it is where joblib was
    never imported and ``JOBLIB_MULTIPROCESSING`` (0: threads) is not set: no one chose
    another, and the build does not import joblib (~50 ms of every command's start-up)
    unless it runs on another (Dask) or on loky's own workers."""
    if "joblib" not in sys.modules and "JOBLIB_MULTIPROCESSING" not in os.environ:
        return True
    import joblib

    return type(joblib.parallel.get_active_backend()[0]).__name__ == "LokyBackend"


def parallel(jobs: int, function, argument_lists):
    """``function(*arguments)`` for each of ``argument_lists`` on joblib's active backend
    (Dask), in completion order (a generator)."""
    import joblib

    calls = (joblib.delayed(function)(*arguments) for arguments in argument_lists)
    return joblib.Parallel(n_jobs=jobs, return_as="generator_unordered")(calls)


def _effective_jobs(jobs: int) -> int:
    """How many processes ``jobs`` is on joblib's active backend (-1: all its workers)."""
    import joblib

    return joblib.effective_n_jobs(jobs)


def _may_fork() -> bool:
    """Whether ``local_pool`` forks its workers: each then starts with this process's
    imports and is ready once it has loaded the compiled kernels (0.29-0.31 s, measured),
    where a loky worker starts a fresh interpreter (0.65 s, 0.85 s of CPU; with 2 jobs on
    701 CamVid images 1.68x against 1.77-1.80x forked). Only in softprep's own CLI process
    (``OWN_PROCESS``), on Linux, while it runs no other Python thread: the build forks
    before it has used zarr or Blosc (no zarr I/O thread yet), and numpy's BLAS threads
    handle fork themselves. Python 3.10.0-3.10.4 forked such workers later, on demand, from
    a process with threads (gh-90622). A user's process may hold threads and their locks,
    and keeps loky's workers warm between calls."""
    return (
        os.environ.get(OWN_PROCESS) == "1"
        and sys.platform == "linux"
        and sys.version_info >= (3, 10, 5)
        and threading.active_count() == 1
    )


def _die_with_parent(parent_pid: int) -> None:
    """A forked worker's first act: ask the kernel to kill it (SIGKILL) when the build
    process dies, however it dies and whether or not the worker ever took a shard (Linux
    ``PR_SET_PDEATHSIG``; loky's workers time out and have ``_watch_parent``)."""
    pr_set_pdeathsig = 1  # <sys/prctl.h>
    ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)
    if os.getppid() != parent_pid:  # it died before the call
        os._exit(1)


def end_workers(pool) -> None:
    """End ``local_pool``'s worker processes now, without waiting for their interpreters'
    orderly exit (0.2-0.3 s after a 2-job build with loky, measured): for a process about to
    exit, the CLI (``keep_workers=False``). Kept, the next call in this process reuses loky's
    workers warm. No-op for None."""
    if pool is None:
        return
    if isinstance(pool, ProcessPoolExecutor):
        processes = list((pool._processes or {}).values())  # Python 3.14: kill_workers()
        # tasks still queued for them are dropped, not flushed into a pipe nobody reads
        # (which could hold the pool's manager thread, and the interpreter's exit, forever)
        if pool._call_queue is not None:  # None once shut down (a second call)
            pool._call_queue.cancel_join_thread()
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.kill()
        # its manager thread, seeing them killed, closes a pipe that Python's exit hook
        # writes to: waited for, else the two race ("Bad file descriptor" traceback at exit,
        # 1 in ~25 Ctrl-C tests on Python 3.11)
        manager = pool._executor_manager_thread
        if manager is not None:
            manager.join(timeout=5)
    else:
        pool.shutdown(wait=False, kill_workers=True)


class SharedTasks:
    """Tasks run by a pool of workers and by this process from one queue: each worker gets
    its next item the moment it returns one (a callback), this process takes the next
    whenever it has handled what came back. ``results()`` yields ``function(*arguments(item))``
    in completion order; closing it early sends no more items. (The build's shards and
    verify's.)"""

    def __init__(self, pool, items: list, arguments, function=None):
        self.pool, self.arguments = pool, arguments
        self.function = function or _task
        self.todo = collections.deque(items)
        self.lock = threading.RLock()
        self.done: queue.Queue = queue.Queue()
        self.running, self.stopped = 0, False

    def _submit(self) -> None:
        with self.lock:
            if self.stopped or not self.todo:
                return
            shard = self.todo.popleft()
            self.running += 1
        try:
            future = self.pool.submit(self.function, *self.arguments(shard))
        except BaseException:
            with self.lock:
                self.running -= 1
            raise
        future.add_done_callback(self._returned)

    def _returned(self, future) -> None:
        try:
            self.done.put(future.result())
        except BaseException as e:  # noqa: BLE001 (re-raised in this process's loop)
            self.done.put(e)
        with self.lock:
            self.running -= 1
        try:
            self._submit()
        except Exception as e:  # noqa: BLE001 (the pool broke: the loop raises it)
            self.done.put(e)

    def _here(self) -> range | None:
        with self.lock:
            return self.todo.popleft() if self.todo and not self.stopped else None

    def results(self):
        for _ in range(self.pool._max_workers):
            self._submit()
        try:
            while True:
                try:
                    got = self.done.get_nowait()
                except queue.Empty:
                    shard = self._here()
                    if shard is not None:
                        yield self.function(*self.arguments(shard))
                        continue
                    with self.lock:
                        if self.running == 0 and self.done.empty():
                            return
                    got = self.done.get()
                if isinstance(got, BaseException):
                    raise got
                yield got
        finally:
            with self.lock:  # stopping early: queued shards are never sent
                self.stopped = True
                self.todo.clear()


def _write_failure(url: str, e: OSError) -> BuildError:
    """A write error as one message; finished images are durable, so the build resumes."""
    reason = "no space left on the device" if e.errno == errno.ENOSPC else str(e)
    return BuildError(
        f"{url}: writing failed ({reason}); the images finished so far are saved: fix this, "
        "then run the same command to resume"
    )


@dataclass
class BuildSummary:
    url: str
    total: int
    built: int
    already_done: int
    skipped: list[Problem]
    seconds: float  # the whole build: discovery, headers, store creation, images
    image_seconds: float  # from the first image task to the end
    repaired: int = 0  # damaged images found by ``repair`` (rebuilt with their shards)
    litter: int = 0  # temporary files of an interrupted write removed
    changed: list[str] = field(default_factory=list)  # done images whose files changed: rebuilt
    retimed: int = 0  # done images whose files have new times, the same bytes: kept
    record_replaced: bool = False  # images/source was unreadable: replaced, empty

    @property
    def images_per_second(self) -> float:
        """Images built per second of image work (as the progress bar's rate)."""
        return self.built / self.image_seconds if self.image_seconds else 0.0

    def notes(self) -> list[str]:
        """What this build did besides building, one sentence each (the CLI's notes)."""
        notes = []
        if self.litter:
            notes.append(f"removed {self.litter} temporary file(s) left by an interrupted write")
        if self.changed:
            shown = ", ".join(self.changed[:3]) + (", ..." if len(self.changed) > 3 else "")
            notes.append(
                f"{len(self.changed)} image(s) changed since they were built (file size or "
                f"bytes), rebuilt with the images sharing their shards: {shown}"
            )
        if self.retimed:
            notes.append(
                f"{self.retimed} image(s) have files with new modification times but the same "
                "bytes (a copied dataset?): kept"
            )
        if self.record_replaced:
            notes.append(
                "the store's record of its source files (images/source) was unreadable and is "
                "replaced: images built before are no longer checked for changed files"
            )
        return notes


def _config(manifest: Manifest, options: BuildOptions) -> dict:
    cfg = asdict(options)
    cfg["scales"] = list(options.scales)
    cfg["stats_for"] = list(options.stats_for)
    cfg["splits"] = list(options.splits) if options.splits else None
    if options.weak is None:  # stores built without weak labels record no weak options
        del cfg["weak"], cfg["weak_seed"]
    if options.unlabeled is None:
        del cfg["unlabeled"]
    if options.colour_kernel is None:  # paired stores record no colour kernel of their own
        del cfg["colour_kernel"]
    cfg.update(dataset=manifest.dataset, version=manifest.version, variant=manifest.variant)
    return cfg


def _metadata(
    manifest: Manifest, options: BuildOptions, splits: list[str], image_only: list[str]
) -> dict:
    return {
        "format": layout.FORMAT,
        "softprep_version": __version__,
        "build_id": uuid.uuid4().hex,
        "config": _config(manifest, options),
        "dataset": manifest.dataset,
        "dataset_version": manifest.version,
        "manifest": manifest.to_json(),
        "kernel": options.kernel,
        **({"colour_kernel": options.colour_kernel} if options.colour_kernel else {}),
        "antialias": options.antialias,
        "scales": list(options.scales),
        "short_side": options.short_side,
        "k": options.k,
        "quantisation": RULE,
        "void_index": VOID,
        "strategies": options.strategies,
        "splits": splits,
        "eval_splits": list(manifest.eval_splits),
        "image_only_splits": image_only,
        "skipped": [],
        "complete": False,
        # OME-NGFF vocabulary for the pyramid of soft planes, finest level first; not a
        # conformant OME-NGFF label image (those hold integer labels).
        "multiscales": [
            {
                "name": manifest.dataset,
                "axes": [
                    {"name": "image"},
                    {"name": "plane", "type": "channel"},
                    {"name": "y", "type": "space"},
                    {"name": "x", "type": "space"},
                ],
                "datasets": [
                    {
                        "path": f"{layout.level_path(s)}/soft",
                        "coordinateTransformations": [
                            {"type": "scale", "scale": [1, 1, 1 / s, 1 / s]},
                            {
                                "type": "translation",
                                "translation": [0, 0, (1 / s - 1) / 2, (1 / s - 1) / 2],
                            },
                        ],
                    }
                    for s in sorted(options.scales, reverse=True)
                ],
            }
        ],
    }


def _prepare(manifest, root, options, on_error):
    pairs, problems = discover(manifest, Path(root), list(options.splits or []) or None)
    if options.unlabeled:
        folder = Path(options.unlabeled)
        if UNLABELED_SPLIT in manifest.splits:
            raise BuildError(f"{manifest.source}: has a split '{UNLABELED_SPLIT}' already")
        if not folder.is_dir():
            raise BuildError(f"{folder}: folder of unlabelled images not found")
        pairs += images_without_labels(folder, UNLABELED_SPLIT, problems)
    config_problems = check_config_json(manifest, Path(root))
    if config_problems:
        lines = "\n".join(f"  {p}" for p in config_problems[:20])
        raise BuildError(f"the dataset's class config disagrees with the manifest:\n{lines}")
    sizes, stamps, kept = [], [], []
    for pair in pairs:
        try:
            hw = pair_size(pair)
            stamp = source_stamp(pair)
        except DatasetError as e:
            problems.append(Problem(e.path, e.message))
            continue
        except OSError as e:
            problems.append(Problem(str(e.filename or pair.image), f"unreadable ({e.strerror})"))
            continue
        sizes.append(hw)
        stamps.append(stamp)
        kept.append(pair)
    if problems and on_error == "fail":
        lines = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        raise BuildError(
            f"{len(problems)} problem(s) in the dataset (use --on-error skip to build "
            f"without them):\n{lines}{more}"
        )
    if not kept:
        raise BuildError(f"{root}: no usable image/label pairs")
    sizes = np.array(sizes, dtype=np.int64).reshape(-1, 2)
    return kept, sizes, np.array(stamps, dtype=np.int64).reshape(-1, 4), problems


def _open_or_create(url, manifest, options, pairs, sizes, root, repair):
    names = [f"{p.split}/{p.name}" for p in pairs]
    splits = list(dict.fromkeys(p.split for p in pairs))
    try:
        existing = SoftStore(url, mode="r+")
    except StoreError:
        existing = None  # layout.create refuses to overwrite anything that is not a store
    if existing is not None:
        old, new = dict(existing.meta.get("config", {})), _config(manifest, options)
        if old.get("unlabeled"):  # relative in stores built through the API before
            # BuildOptions resolved it: the same folder from here
            old["unlabeled"] = str(Path(old["unlabeled"]).resolve())
        stored = existing.meta.get("manifest")
        same_manifest = not stored or same_labels(stored, manifest.to_json())
        diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        anew = "use another --out or delete it"
        try:  # what deleting it loses: after a first run stopped by a bad file, often nothing
            anew += f" ({int(existing.done().sum())} finished image(s) in it)"
        except Exception:  # noqa: BLE001 (its flags unreadable: the refusal without the count)
            pass
        if diff:
            changes = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff)
            given = manifest.source if same_manifest else None
            if old.get("dataset") != manifest.dataset:  # this root is another dataset's
                root = None  # (printed as ROOT, explained)
            command = build_command(existing.meta, url, root, repair=repair, manifest=given)
            raise BuildError(
                f"{url} was built with other options ({changes}); to resume or repair it, "
                f"give its options: {command}; to build anew, {anew}"
            )
        if not same_manifest:  # the same name, other classes or label values
            raise BuildError(
                f"{url} was built with another {manifest.dataset} manifest (its classes or "
                f"label values differ from {manifest.source}'s); give the manifest it was "
                f"built with; to build anew, {anew}"
            )
        if list(existing.names()) != names:
            raise BuildError(
                f"{url} holds a different list of images than {len(names)} pairs found now "
                "(dataset changed?); use another --out or delete it to rebuild"
            )
        return existing.root, existing.meta
    image_only = list(dict.fromkeys(p.split for p in pairs if p.label is None))
    meta = _metadata(manifest, options, splits, image_only)
    split_idx = np.array([splits.index(p.split) for p in pairs], dtype=np.uint8)
    level_hw = {
        s: np.array([level_size(tuple(hw), s, options.short_side) for hw in sizes])
        for s in options.scales
    }
    eval_mask = np.array([p.split in manifest.eval_splits for p in pairs])
    root = layout.create(
        url,
        meta,
        names,
        split_idx,
        sizes,
        level_hw,
        manifest.num_classes,
        options.k,
        options.strategies,
        eval_mask,
        choose_images_per_shard(sizes, options),
    )
    return root, meta


def _clear_done(zroot: zarr.Group, images) -> None:
    """Mark ``images`` not done, the store's ``complete`` attribute false first: a run
    stopped before its end must not leave a store called complete with images to build."""
    meta = dict(zroot.attrs[layout.NAMESPACE])
    if meta.get("complete"):
        zroot.attrs[layout.NAMESPACE] = {**meta, "complete": False}
    zroot[layout.DONE].oindex[images] = False


def _refuse_resized(zroot: zarr.Group, url: str, pairs, sizes: np.ndarray) -> None:
    """Refuse a resume where an image's pixel size (``sizes`` (N, 2)) differs from the
    store's: its arrays and levels were sized for the old one."""
    stored = zroot[layout.FULL_HW][:]
    (moved,) = np.nonzero((stored != sizes).any(axis=1))
    if len(moved):
        i = int(moved[0])
        (h, w), (h0, w0) = sizes[i], stored[i]
        raise BuildError(
            f"{pairs[i].image}: is {w}x{h} now, {w0}x{h0} in {url} ({len(moved)} image(s) "
            "changed size); use another --out or delete the store to rebuild"
        )


def _source_record(images: zarr.Group, n: int) -> tuple[np.ndarray | None, bool]:
    """The store's ``images/source`` (N, 6) and whether it had to be replaced: None when
    the store has none (made here, empty) or it is unreadable or misshapen (replaced: it
    holds no image data, only what is compared to notice changed files)."""
    try:
        if "source" not in images:
            layout.source_array(images, n)
            return None, False
        record = images["source"][:]
        if record.shape == (n, len(layout.SOURCE_FIELDS)):
            return record, False
    except (ValueError, RuntimeError, KeyError):  # bad JSON, codec or chunk
        pass
    layout.source_array(images, n, overwrite=True)
    return None, True


# columns of images/source: the sizes, what source_stamp gives (sizes, times), the CRCs
SIZES, STAMP, CRCS = [0, 3], [0, 1, 3, 4], [2, 5]


def _mark_changed(
    zroot: zarr.Group, pairs, stamps: np.ndarray, checking=None
) -> tuple[list[int], int, bool]:
    """Clear the ``done`` flag of every image whose source files changed since it was
    built, so that the build rewrites their shards. ``stamps`` (N, 4): the files' sizes and
    times now (``source_stamp``). A file whose size differs has changed; one whose time
    alone differs (a copied dataset, ``touch``) has changed only if its CRC-32C differs too
    (those files are read here, 4 at a time), else its new time is recorded. Images
    without a record (older stores) are never flagged. Returns the changed images'
    indices, the number of retimed but unchanged ones, and whether the record was replaced
    (unreadable). ``checking``: see ``build``."""
    record, replaced = _source_record(zroot["images"], len(stamps))
    if record is None:
        return [], 0, replaced
    done = zroot[layout.DONE][:]
    differ = done & (record[:, 0] > 0) & (record[:, STAMP] != stamps).any(axis=1)
    resized = differ & (record[:, SIZES] != stamps[:, [0, 2]]).any(axis=1)
    retimed = np.flatnonzero(differ & ~resized)

    def crcs(i: int) -> list[int]:
        pair = pairs[i]
        try:
            return [file_crc(pair.image), file_crc(pair.label) if pair.label else 0]
        except OSError:
            return [-1, -1]  # unreadable now: rebuilt, where its error is reported

    read = []
    with ThreadPoolExecutor(4) as pool:  # the reads release the GIL
        for crc in pool.map(crcs, retimed):
            read.append(crc)
            if checking:
                checking("checking changed files", len(read), len(retimed))
    now = np.array(read, dtype=np.int64).reshape(-1, 2)
    same = (now == record[retimed][:, CRCS]).all(axis=1)
    kept = retimed[same]
    if len(kept):
        record[np.ix_(kept, STAMP)] = stamps[kept]
        zroot[layout.SOURCE].oindex[kept, :] = record[kept]
    changed = np.union1d(np.flatnonzero(resized), retimed[~same]).astype(int)
    if len(changed):
        _clear_done(zroot, changed)
    return [int(i) for i in changed], len(kept), False


class _StatsWriter:
    """Buffers per-image statistics in the parent and writes them with the images' source
    records, then ``done``, in batches."""

    def __init__(self, root: zarr.Group, strategies: list[str]):
        self.root, self.strategies = root, strategies
        self.buffer: list[ImageResult] = []
        self.last = time.monotonic()

    def add(self, results: list[ImageResult]) -> None:
        self.buffer += results
        if len(self.buffer) >= FLUSH_EVERY or time.monotonic() - self.last > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        idx = [r.index for r in self.buffer]
        self.root[layout.FULL_STATS].oindex[idx, :] = np.stack([r.full for r in self.buffer])
        for name in self.buffer[0].levels:
            g = self.root[f"{layout.LEVELS}/{name}"]
            rows = [r.levels[name] for r in self.buffer]
            g["truncated"].oindex[idx, :] = np.stack([r["truncated"] for r in rows])
            for s in self.strategies:
                g[f"stats/{s}"].oindex[idx, :] = np.stack([r[s] for r in rows])
        self.root[layout.SOURCE].oindex[idx, :] = np.stack([r.source for r in self.buffer])
        self.root[layout.DONE].oindex[idx] = True
        self.buffer, self.last = [], time.monotonic()


def _shards_to_build(zroot: zarr.Group, options: BuildOptions) -> tuple[np.ndarray, list]:
    """The images already done (N,) bool and the shards to write, each a ``range`` of
    image indices. A shard with any image not done is rewritten whole, so its images count
    as not done (the flags are cleared here) until its new statistics are written."""
    done = zroot[layout.DONE][:]
    per = zroot[f"{layout.level_path(options.scales[0])}/soft"].shards[0]
    starts = range(0, len(done), per)
    shards = [range(a, min(a + per, len(done))) for a in starts if not done[a : a + per].all()]
    redo = [i for shard in shards for i in shard if done[i]]
    if redo:
        zroot[layout.DONE].oindex[redo] = False
        done[redo] = False
    return done, shards


def _mark_damaged(url: str, zroot: zarr.Group, jobs: int, checking, pool) -> int:
    """For ``repair``: clear the ``done`` flag of every image ``verify`` finds damaged (data
    missing, unreadable or invalid, statistics that do not add up), so that the build
    rewrites their shards whole. Returns their number; metadata damage is refused.
    ``checking``: see ``build``; ``pool``: the build's workers (``local_pool``), checking
    shards too."""
    from softprep.verify import verify

    progress = (
        (lambda done, total: checking("checking the store", done, total)) if checking else None
    )
    report = verify(SoftStore(url), jobs=jobs, progress=progress, workers=pool)
    if not report.layout:
        raise BuildError(
            f"{url}: its metadata is damaged ({report.problems[0]}); --repair rebuilds "
            "images only: delete the store and build it again"
        )
    damaged = sorted(report.damaged)
    if damaged:
        _clear_done(zroot, damaged)
    return len(damaged)


def build(
    manifest: Manifest,
    root: str | Path,
    url: str,
    options: BuildOptions,
    jobs: int = 1,
    on_error: str = "fail",
    progress=None,
    repair: bool = False,
    keep_workers: bool = True,
    checking=None,
) -> BuildSummary:
    """Build (or resume) the store at ``url`` from the dataset at ``root``.

    ``repair``: check the existing store first, as ``softprep verify`` does (reads it
    whole), and rebuild the shards of every damaged image too; the result equals a clean
    build. Temporary files an interrupted write left in the store are removed in any case.

    ``jobs``: processes (one task: one shard of images); one for a store in this process's
    memory (``layout.in_process``). ``on_error``: ``fail`` stops at the first bad pair
    (after saving finished images), ``skip`` records it in the store's ``skipped`` list and
    goes on. Tasks run on the active joblib backend (default loky processes; wrap the call
    in ``joblib.parallel_config(backend="dask")`` with a dask Client to use a cluster).
    ``progress(done, total)`` is called after each image; ``checking(what, done, total)``
    during the reads before them: "checking the store" (``repair``) and "checking changed
    files" (files whose times changed since they were built, compared by CRC-32C: all of
    them once a dataset is copied without its times). ``keep_workers``: see ``end_workers``.
    """
    if on_error not in ("fail", "skip"):
        raise ValueError("on_error must be 'fail' or 'skip'")
    jobs = 1 if layout.in_process(url) else jobs
    if "://" not in str(url) and Path(url).is_file():
        raise BuildError(f"{url} is a file, not a store (a folder); choose another --out")
    twice = [s for i, s in enumerate(options.scales) if s in options.scales[:i]]
    if twice and not layout.holds_data(url):  # a new store (one built so still resumes)
        shown = Fraction(twice[0]).limit_denominator(1 << 16)
        raise BuildError(f"scale {shown} is given twice; give each scale once")
    start, pool = time.monotonic(), None
    try:
        with _workers_ignore_interrupts():  # workers start with SIGINT blocked
            pool = local_pool(jobs)  # before zarr's I/O thread runs: forked (_may_fork)
            warming = []
            if pool is not None:  # workers start (imports, kernels) while this reads the
                # headers, and this process starts on the images before they are ready
                warming = [pool.submit(_warm_up, options) for _ in range(pool._max_workers)]
            elif jobs != 1:  # the same on another joblib backend (Dask: -1), waited for
                warming = parallel(jobs, _warm_up, [(options,)] * _effective_jobs(jobs))
        if repair:
            try:
                SoftStore(url)
            except StoreError as e:
                raise BuildError(f"{e}: nothing to repair; build it without --repair") from None
        pairs, sizes, stamps, problems = _prepare(manifest, root, options, on_error)
        if pool is None:
            for _ in warming:
                pass
        with writer.writer_lock(url):
            try:
                return _build_locked(
                    manifest, url, options, jobs, on_error, progress, start, pairs, sizes,
                    stamps, problems, repair, pool, checking, root,
                )  # fmt: skip
            finally:  # while the lock is held: nothing of this build writes after it goes
                if not keep_workers:
                    end_workers(pool)
    finally:  # and where it failed before the lock
        if not keep_workers:
            end_workers(pool)


def _build_locked(
    manifest, url, options, jobs, on_error, progress, start, pairs, sizes, stamps, problems,
    repair, pool, checking, root,
):  # fmt: skip
    try:
        zroot, meta = _open_or_create(url, manifest, options, pairs, sizes, root, repair)
        litter = len(writer.remove_litter(url))  # what a killed write left; nothing reads it
        _refuse_resized(zroot, url, pairs, sizes)
        repaired = _mark_damaged(url, zroot, jobs, checking, pool) if repair else 0
        changed, retimed, record_replaced = _mark_changed(zroot, pairs, stamps, checking)
        done, shards = _shards_to_build(zroot, options)
    except (KeyError, json.JSONDecodeError) as e:  # zarr: an array's metadata lost or cut
        what = f"array {e.args[0]} missing" if isinstance(e, KeyError) else f"bad JSON: {e}"
        raise BuildError(
            f"{url}: its metadata is damaged ({what}); delete the store and build it again"
        ) from None
    except OSError as e:
        raise _write_failure(url, e) from None
    eval_splits = set(manifest.eval_splits)
    stats = _StatsWriter(zroot, options.strategies)
    skipped = list(problems)
    parent = (socket.gethostname(), os.getpid())

    def arguments(shard: range) -> tuple:
        keep_full = [pairs[i].split in eval_splits for i in shard]
        chosen = [pairs[i] for i in shard]
        return url, meta["build_id"], shard.start, chosen, manifest, options, keep_full, parent

    with _workers_ignore_interrupts():
        if pool is not None:
            results = SharedTasks(pool, shards, arguments).results()
        elif jobs != 1:
            results = parallel(jobs, _task, (arguments(shard) for shard in shards))
        else:
            results = (_task(*arguments(shard)) for shard in shards)
    built, processed = 0, int(done.sum())
    loop_start = time.monotonic()
    if progress:
        progress(processed, len(pairs))  # the rate counts from here, as the summary's
    try:
        for shard_results in results:
            errors = [r.error for r in shard_results if r.error]
            if errors and on_error == "fail":  # the shard's other images are not marked done:
                # a resume rewrites the shard whole, so they are not counted as saved
                raise BuildError(
                    f"{errors[0]}\n(stopped; {built} image(s) finished in this run are "
                    "saved; fix the file or use --on-error skip, then run the same command "
                    "to resume)"
                )
            stats.add([r for r in shard_results if not r.error])
            built += sum(not r.error for r in shard_results)
            skipped += errors
            processed += len(shard_results)
            if progress:
                progress(processed, len(pairs))
    except OSError as e:
        raise _write_failure(url, e) from None
    except BrokenExecutor:
        raise BuildError(
            f"a worker process was killed (out of memory? use fewer --jobs); {built} image(s) "
            "finished in this run are saved: run the same command to resume"
        ) from None
    finally:
        with warnings.catch_warnings():  # stopping early cancels the queued tasks: intended
            warnings.filterwarnings("ignore", r".*tasks .*(cancelled|not used)", UserWarning)
            results.close()
        try:
            stats.flush()
        except OSError as e:
            raise _write_failure(url, e) from None
    meta = dict(zroot.attrs[layout.NAMESPACE])
    meta["skipped"] = [{"path": p.path, "error": p.message, "index": p.index} for p in skipped]
    meta["complete"] = bool(zroot[layout.DONE][:].all())
    try:
        zroot.attrs[layout.NAMESPACE] = meta
    except OSError as e:
        raise _write_failure(url, e) from None
    now = time.monotonic()
    return BuildSummary(
        url, len(pairs), built, int(done.sum()), skipped, now - start, now - loop_start,
        repaired, litter, [f"{pairs[i].split}/{pairs[i].name}" for i in changed], retimed,
        record_replaced,
    )  # fmt: skip
