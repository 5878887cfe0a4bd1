"""The training loaders: the run's sample order, the DataLoader, and its workers' end.

A run's order is fixed by (seed, epoch) and cut into whole steps per rank (``RunSampler``),
so a resumed run reads exactly what the uninterrupted one would. Loader workers ignore
SIGTERM/SIGINT (schedulers and Ctrl-C signal the whole process group; the main process
saves ``last.pt`` first), so ``batches`` stops them itself on every way out: the end, an
error, a signal. An error raised in a worker comes back as one sentence, not the worker's
pasted traceback.
"""

from __future__ import annotations

import re
import signal
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class RunSampler(Sampler):
    """Sample indices for a whole run: epoch after epoch, each a fresh permutation from
    (seed, epoch) cut to whole steps of ``batch_size`` per rank x ``world`` ranks, encoded as
    ``epoch * n + item`` (so loader workers need no epoch updates), starting at the
    rank's micro-batch ``start`` (for resuming). Rank ``r`` takes the ``r``-th share of
    every step: the ranks' shares of an epoch are disjoint and together equal the epoch of
    one process with a ``batch_size * world`` batch.
    """

    def __init__(
        self, n: int, batch_size: int, seed: int, start: int = 0, rank: int = 0, world: int = 1
    ):
        self.n, self.batch_size, self.seed, self.start = n, batch_size, seed, start
        self.rank, self.world = rank, world
        self.per_epoch = n // (batch_size * world)  # steps per epoch

    def __iter__(self):
        epoch, skip = divmod(self.start, self.per_epoch)
        b, w = self.batch_size, self.world
        while True:
            g = torch.Generator().manual_seed(self.seed * 100_003 + epoch)
            perm = torch.randperm(self.n, generator=g)[: self.per_epoch * w * b]
            mine = perm.view(self.per_epoch, w, b)[skip:, self.rank].reshape(-1)
            yield from (epoch * self.n + mine).tolist()
            epoch, skip = epoch + 1, 0


def _leave_stop_signals_to_the_main_process(worker_id: int) -> None:
    """Loader worker start-up: ignore SIGTERM/SIGINT, which schedulers and Ctrl-C send to
    the whole process group; the main process saves ``last.pt`` and then stops them."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def run_loader(
    data: Dataset,
    batch_size: int,
    seed: int,
    start: int,
    rank: int,
    world: int,
    workers: int,
    pin_memory: bool,
) -> DataLoader:
    """Endless batches of ``data`` in the run's order from micro-batch ``start`` (per rank);
    the loader's own generator is seeded, so the global RNG is left untouched."""
    return DataLoader(
        data,
        batch_size=batch_size,
        sampler=RunSampler(len(data), batch_size, seed, start, rank, world),
        num_workers=workers,
        pin_memory=pin_memory,
        drop_last=True,
        prefetch_factor=4 if workers else None,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=_leave_stop_signals_to_the_main_process,
    )


@contextmanager
def batches(loader: DataLoader) -> Iterator[Iterator[dict]]:
    """Iterate ``loader``; on leaving, however, its workers are gone within seconds."""
    iterator = iter(loader)
    try:
        yield iterator
    finally:
        stop_workers(iterator)


def stop_workers(iterator) -> None:
    """End a DataLoader iterator's workers now: torch's own orderly shutdown (a few seconds
    at most), then SIGKILL for any that still lives (they ignore SIGTERM). Without this, an
    error that keeps the iterator referenced (a traceback) left the process waiting on its
    workers at exit, forever."""
    workers = list(getattr(iterator, "_workers", []))
    shutdown = getattr(iterator, "_shutdown_workers", None)
    if shutdown is not None:
        shutdown()
    for w in workers:
        if w.is_alive():
            w.kill()
            w.join(timeout=5)


WORKER_ERROR = re.compile(r"^Caught \w+ in DataLoader worker process \d+\.")


def worker_error(e: BaseException) -> BaseException:
    """An exception re-raised from a loader worker, as the worker's own one-sentence
    message (torch pastes the worker's traceback into it); others unchanged."""
    text = str(e.args[0]) if e.args and isinstance(e.args[0], str) else ""
    if not WORKER_ERROR.match(text):
        return e
    name = type(e).__name__
    message = re.split(rf"^(?:[\w.]+\.)?{name}: ", text, flags=re.M)[-1].strip()
    try:
        return type(e)(message)
    except TypeError:  # an exception class with another signature
        return e
