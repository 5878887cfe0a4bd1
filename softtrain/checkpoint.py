"""Checkpoints and run folders: atomic saves, damaged files named, runs never overwritten.

A run folder holds ``config.toml``, ``metrics.jsonl``, ``last.pt`` (every ``save_every``
steps, at evaluations, on SIGTERM/SIGINT and at the end), ``best.pt`` (best mIoU),
optionally ``iter_<step>.pt`` (the last ``keep_checkpoints``), ``curves.png`` and ``tb/``.
"""

from __future__ import annotations

import os
import pickle
import shutil
import zipfile
from pathlib import Path

import torch

REQUIRED = ("model", "classes", "config", "step")
RUN_FILES = ("config.toml", "metrics.jsonl", "last.pt", "best.pt", "curves.png")


class CheckpointError(ValueError):
    """A checkpoint or run folder cannot be used; the message names the file and why."""


def save_checkpoint(path: Path, **content) -> None:
    """Atomic and durable: written to a temporary file, flushed to disk, then renamed, so a
    crash (or a full disk) at any moment leaves the previous checkpoint intact."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(content, f)
            f.flush()
            os.fsync(f.fileno())
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
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
    return any((out / f).exists() for f in RUN_FILES) or bool(list(out.glob("iter_*.pt")))


def describe_run(out: Path) -> str:
    """One line about the run in ``out``: its last saved step and best mIoU, if readable."""
    try:
        ckpt = load_checkpoint(out / "last.pt")
    except CheckpointError:
        return "a run without a readable last.pt"
    best = ckpt.get("best_miou", -1.0)
    return f"a run saved at step {ckpt['step']}" + (f", best mIoU {best:.4f}" if best >= 0 else "")


def check_run_folder(out: Path, resume: bool, overwrite: bool) -> None:
    """Refuse to start a run where one already is, unless told what to do with it."""
    if resume and overwrite:
        raise CheckpointError("give --resume (continue the run) or --overwrite, not both")
    if resume:
        if not (out / "last.pt").exists():
            raise CheckpointError(
                f"{out}: nothing to resume, no last.pt (the run saved no checkpoint yet); "
                "start it again with --overwrite"
            )
    elif holds_run(out) and not overwrite:
        raise CheckpointError(
            f"{out} already holds {describe_run(out)}; pass --resume to continue it, "
            "--overwrite to start again (its files are deleted), or another --out"
        )


def clear_run(out: Path) -> None:
    """Delete a run's files (``--overwrite``); other files in the folder stay."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for p in out.glob("iter_*.pt"):
        p.unlink()
    shutil.rmtree(out / "tb", ignore_errors=True)
