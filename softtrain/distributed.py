"""Data-parallel training under ``torchrun`` (DistributedDataParallel), one process per GPU.

``torchrun --nproc-per-node N -m softtrain fit ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; without them everything here is a no-op for a single process. Rank 0
writes every file; collectives keep the ranks in step: a failure on any rank before
training stops every rank with its message, a stop signal on any rank stops all of them
at the same step, evaluation confusion matrices are summed over the ranks.
"""

from __future__ import annotations

import logging
import os
import sys
import traceback
from contextlib import suppress
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist

_joined = False  # this process joined a torchrun process group (``setup``), left since or not


@dataclass(frozen=True)
class Ranks:
    """This process's place: ``rank`` of ``world`` processes, on ``device``."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        """The process that writes files and reports (rank 0)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1


def setup(device: torch.device) -> Ranks:
    """Join the ``torchrun`` process group (NCCL on CUDA, Gloo on the CPU) if the launcher
    started this process; each rank takes the GPU ``LOCAL_RANK``."""
    global _joined
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(device=device)
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    _joined = True
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def joined() -> bool:
    """Whether this process has joined a process group (``setup``), even if ``teardown``
    has left it since: then it ends with ``exit_rank``."""
    return _joined


def exit_rank(ending: BaseException) -> NoReturn:
    """End a process that joined a process group at once, as ``ending`` would have ended
    it (``SystemExit``: its code; ``KeyboardInterrupt``: 130; any other: its traceback, 1),
    its output flushed, skipping the interpreter's finalisation and exit handlers.

    Why: ``DistributedDataParallel`` keeps the Gloo process group alive past
    ``destroy_process_group`` (its worker threads still run at exit, checked with torch
    2.14; pytorch#107298), and a worker thread that frees a collective's tensors once
    finalisation has begun needs the GIL and is ended inside C++ (the mechanism pytorch
    PR #179291 describes): a rank of a finished run then aborted (SIGABRT, "terminate
    called without an active exception"), and torchrun reported the run failed: twice in
    about ten runs of the test suite; a two-rank script with DDP and a few collectives,
    5 and 10 of 30 runs, 0 of 30 ending so (measured). What exit handlers would close is closed
    before: ``fit`` ends the run's trackers, lock and loader workers however it ends; a
    user's script that calls ``softtrain.fit.fit`` under torchrun can end the same way."""
    if isinstance(ending, SystemExit):
        code = ending.code
        if code is not None and not isinstance(code, int):
            print(code, file=sys.stderr)  # as Python prints a SystemExit message
            code = 1
    elif isinstance(ending, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        code = 130
    else:
        traceback.print_exception(ending)
        code = 1
    for flush in (sys.stdout.flush, sys.stderr.flush, logging.shutdown):
        with suppress(Exception):  # a closed or broken stream: nothing more to save
            flush()
    with suppress(OSError, AttributeError):  # C stdio too, as exit() does
        import ctypes

        ctypes.CDLL(None).fflush(None)
    os._exit(code or 0)


def teardown(ranks: Ranks) -> None:
    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()


def agree(ranks: Ranks, error: BaseException | None) -> str | None:
    """Every rank's outcome of a step that may fail on some ranks only (opening the store,
    reading a checkpoint): the first failure as ``"rank R: message"``, or None."""
    if not ranks.distributed:
        return None if error is None else str(error)
    outcomes = [None] * ranks.world
    dist.all_gather_object(outcomes, None if error is None else str(error))
    failed = [(r, m) for r, m in enumerate(outcomes) if m is not None]
    return f"rank {failed[0][0]}: {failed[0][1]}" if failed else None


def any_rank(ranks: Ranks, flag: bool) -> bool:
    """True on every rank if ``flag`` is true on any (one small all-reduce)."""
    if not ranks.distributed:
        return flag
    t = torch.tensor([int(flag)], device=ranks.device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def mean(ranks: Ranks, value: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar tensor over the ranks (a copy; the input is untouched)."""
    value = value.detach().clone()
    if ranks.distributed:
        dist.all_reduce(value)
        value /= ranks.world
    return value


def sum_(ranks: Ranks, value: torch.Tensor) -> None:
    """Sum a tensor over the ranks, in place."""
    if ranks.distributed:
        dist.all_reduce(value)


def gather(ranks: Ranks, obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` for one process)."""
    if not ranks.distributed:
        return [obj]
    out = [None] * ranks.world
    dist.all_gather_object(out, obj)
    return out


def share_buffers(ranks: Ranks, module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running statistics, which each rank
    updates from its own crops), so all ranks evaluate the model rank 0 saves."""
    if ranks.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)
