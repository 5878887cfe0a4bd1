"""Checkpoints and run folders: atomic saves, damaged files named, runs never overwritten.

A run folder holds ``config.toml``, ``metrics.jsonl``, ``last.pt`` (every ``save_every``
steps, at evaluations, on SIGTERM/SIGINT and at the end), ``best.pt`` (best mIoU),
optionally ``iter_<step>.pt`` (the last ``keep_checkpoints``), ``curves.png`` and ``tb/``.
"""

from __future__ import annotations

import logging
import os
import pickle
import random
import shutil
import zipfile
from pathlib import Path

import numpy as np
import torch

from softprep.lockfile import LockBusy, LockFile

log = logging.getLogger("softtrain")

REQUIRED = ("model", "classes", "config", "step")
RUN_FILES = ("config.toml", "metrics.jsonl", "last.pt", "best.pt", "curves.png")
LOCK = ".softtrain.lock"  # one writer per run folder


class CheckpointError(ValueError):
    """A checkpoint or run folder cannot be used; the message names the file and why."""


def save_checkpoint(path: Path, **content) -> None:
    """Atomic and durable: written to a temporary file of this process, flushed to disk,
    then renamed, so a crash (or a full disk) at any moment leaves the previous checkpoint
    intact. A failure to write is a ``CheckpointError`` that says so."""
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(content, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) or isinstance(e.__cause__, OSError):
            why = e if isinstance(e, OSError) else e.__cause__
            kept = f"the previous {path.name} is intact" if path.exists() else "nothing saved"
            raise CheckpointError(
                f"{path}: cannot save the checkpoint ({why.strerror or why}); {kept}. Free "
                "space or fix the folder, then continue with --resume"
            ) from None
        raise


def load_checkpoint(path: str | Path, classes: list[dict] | None = None) -> dict:
    """A checkpoint on the CPU; refused (``CheckpointError``) if missing, damaged, not a
    softtrain checkpoint, or trained on another class table than ``classes``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint file here")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, zipfile.BadZipFile, pickle.UnpicklingError, OSError) as e:
        with open(path, "rb") as f:
            head = f.read(2)
        if len(head) == 2 and not head.startswith((b"PK", b"\x80")):  # a zip or a pickle
            raise CheckpointError(
                f"{path}: not a checkpoint (torch.save did not write this file)"
            ) from None
        raise CheckpointError(
            f"{path}: damaged checkpoint, it cannot be read ({type(e).__name__}: "
            f"{str(e).splitlines()[0] if str(e) else 'empty or truncated'})"
        ) from None
    if not isinstance(ckpt, dict) or any(k not in ckpt for k in REQUIRED):
        raise CheckpointError(f"{path}: not a softtrain checkpoint (no {', '.join(REQUIRED)})")
    if classes is not None and ckpt["classes"] != classes:
        raise CheckpointError(
            f"{path} was trained on another class table ({len(ckpt['classes'])} classes: "
            f"{', '.join(c['name'] for c in ckpt['classes'][:4])}, ...) than this store "
            f"({len(classes)} classes: {', '.join(c['name'] for c in classes[:4])}, ...)"
        )
    return ckpt


def iter_checkpoints(out: Path) -> list[Path]:
    """``iter_<step>.pt`` files of a run, oldest first."""
    found = [(p.stem[5:], p) for p in out.glob("iter_*.pt")]
    return [p for _, p in sorted((int(s), p) for s, p in found if s.isdigit())]


def keep_last(out: Path, n: int) -> None:
    """Delete all but the newest ``n`` ``iter_<step>.pt``."""
    saved = iter_checkpoints(out)
    for p in saved[: max(0, len(saved) - n)]:
        p.unlink(missing_ok=True)


def holds_run(out: Path) -> bool:
    """Whether ``out`` holds a run worth keeping: a checkpoint. What a run that stopped
    before its first save left (config, metrics) is replaced by the next run."""
    return any((out / f).exists() for f in ("last.pt", "best.pt")) or bool(
        list(out.glob("iter_*.pt"))
    )


def describe_run(out: Path) -> str:
    """One line about the run in ``out``: its last saved step and best mIoU, if readable."""
    try:
        ckpt = load_checkpoint(out / "last.pt")
    except CheckpointError:
        return "a run without a readable last.pt"
    best = ckpt.get("best_miou", -1.0)
    return f"a run saved at step {ckpt['step']}" + (
        f", best mIoU {100 * best:.2f}%" if best >= 0 else ""
    )


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a run where one already is, unless told what to do with it, and an
    ``out`` that cannot be a run folder (a file, a folder this process cannot write)."""
    if resume and overwrite:
        raise CheckpointError("give --resume (continue the run) or --overwrite, not both")
    existing = next((p for p in (out, *out.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise CheckpointError(f"--out {out}: {existing} is a file, not a folder")
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"--out {out}: {existing} is not writable by this user")
    if resume:
        if not (out / "last.pt").exists() and not iter_checkpoints(out):
            raise CheckpointError(
                f"{out}: nothing to resume, no last.pt (the run saved no checkpoint yet); "
                "start it again without --resume"
            )
    elif holds_run(out) and not overwrite:
        raise CheckpointError(
            f"{out} already holds {describe_run(out)}; pass --resume to continue it, "
            "--overwrite to start again (its files are deleted), or another --out"
        )


def resume_checkpoint(out: Path, classes: list[dict]) -> tuple[dict, Path]:
    """The checkpoint a ``--resume`` continues from and its path: ``last.pt``, or, when it
    is damaged or missing, the newest intact ``iter_<step>.pt`` (said in the log)."""
    last = out / "last.pt"
    try:
        return load_checkpoint(last, classes), last
    except CheckpointError as e:
        for older in reversed(iter_checkpoints(out)):
            try:
                ckpt = load_checkpoint(older, classes)
            except CheckpointError:
                continue
            log.warning("%s; resuming from %s (step %d) instead", e, older.name, ckpt["step"])
            return ckpt, older
        raise


def lock_run(out: Path) -> LockFile:
    """Hold ``out`` (created if needed) for this process: a second ``fit`` on the same run
    folder is refused while this one lives; released by the OS however it exits."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        return LockFile(out / LOCK).acquire()
    except LockBusy as e:
        raise CheckpointError(
            f"{out}: another softtrain fit (pid {e.holder}) is writing this run folder; wait "
            "for it to end or give another --out"
        ) from None


def clear_run(out: Path) -> None:
    """Delete a run's files (``--overwrite``); other files in the folder stay."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for p in [*out.glob("iter_*.pt"), *out.glob("*.pt.*.tmp")]:
        p.unlink()
    shutil.rmtree(out / "tb", ignore_errors=True)


def rng_state() -> dict:
    """This process's RNG states (torch, CUDA, numpy, Python): what a resume restores."""
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


STORE_META = (
    "kernel",
    "colour_kernel",
    "antialias",
    "short_side",
    "dataset",
    "build_id",
    "manifest",
)


class RunCheckpoints:
    """A run's checkpoints: ``last.pt`` (and ``iter_<step>.pt``), ``best.pt`` and what a
    resume restores. Every rank calls ``save``/``save_best`` (the RNG states of all ranks
    are gathered), rank 0 writes. A checkpoint holds the model, optimiser, scheduler, step,
    best mIoU, RNG states (one per rank, as at the last optimiser step), the regime's state,
    the class table, the flat config, the store's metadata and the evaluation level."""

    def __init__(self, out: Path, cfg, store, eval_level: str, ranks, runlog):
        from softtrain import distributed

        self.out, self.cfg, self.ranks, self.runlog = Path(out), cfg, ranks, runlog
        self.gather = lambda state: distributed.gather(ranks, state)
        self.meta = {
            "classes": store.classes,
            "config": cfg.flat(),
            "store_meta": {k: store.meta.get(k) for k in STORE_META},
            "eval_level": eval_level,
            "world_size": ranks.world,
        }
        self.rng_at_step = rng_state()

    def stepped(self) -> None:
        """After an optimiser step: the RNG state a save records."""
        self.rng_at_step = rng_state()

    def restore(self, ckpt, model, stepper, regime) -> tuple[int, float]:
        """(step, best mIoU) of a resumed checkpoint, everything else restored in place;
        (0, -1) for a new run. ``--lr`` and ``--iters`` of this run apply."""
        if ckpt is None:
            self.stepped()
            return 0, -1.0
        model.load_state_dict(ckpt["model"])
        step = ckpt["step"]
        stepper.restore(ckpt, step)
        regime.restore(ckpt)
        states = ckpt["rng"]  # one per rank of the run that saved it
        states = [states] if isinstance(states, dict) else states
        rank, world = self.ranks.rank, self.ranks.world
        set_rng_state(states[rank] if len(states) == world else states[0])
        self.stepped()
        return step, ckpt["best_miou"]

    def _write(self, path: Path, rng, step, best, model, stepper, regime, pending_eval=False):
        save_checkpoint(
            path, model=model.state_dict(), **(stepper.state() if stepper else {}), step=step,
            best_miou=best, rng=rng, pending_eval=pending_eval, **regime.state(), **self.meta,
        )  # fmt: skip

    def save(self, step, best, model, stepper, regime, pending_eval=False) -> None:
        """``last.pt`` (and ``iter_<step>.pt`` with ``keep_checkpoints``), then the curves.
        ``pending_eval``: the evaluation at ``step`` was cut short; a resume redoes it."""
        rng = self.gather(self.rng_at_step)  # every rank calls; rank 0 writes
        if not self.ranks.main:
            return
        parts = (step, best, model, stepper, regime, pending_eval)
        self._write(self.out / "last.pt", rng, *parts)
        keep = self.cfg.run.keep_checkpoints
        if keep:
            self._write(self.out / f"iter_{step}.pt", rng, *parts)
            keep_last(self.out, keep)
        self.runlog.plot()

    def save_best(self, step, miou, model, regime) -> None:
        """``best.pt``: a new best mIoU ``miou`` at ``step``; the weights (and the regime's
        state) only, no optimiser state: it is for eval, predict and export (a third of
        ``last.pt``'s size with SGD momentum)."""
        rng = self.gather(self.rng_at_step)
        if self.ranks.main:
            self._write(self.out / "best.pt", rng, step, miou, model, None, regime)
