"""Training on a softprep store: read it top to bottom.

``fit``: SGD (momentum, weight decay) with a poly learning rate (optional linear warm-up)
on random-scale crops; what a micro-batch's loss is belongs to the run's regime
(``softtrain.regime``: supervised on soft, hard or weak labels; teacher-student). ``last.pt``
is written every ``save_every`` steps, at every evaluation, on SIGTERM/SIGINT and at the end
(atomically: a kill at any moment leaves the previous one intact); every ``eval_every``
steps and at the end the regime's evaluation model is scored on the store's evaluation
split at full resolution and ``best.pt`` kept for the best mIoU. ``resume`` continues
exactly: model, optimiser, schedule, step, data order, RNG states and the regime's state
come from the checkpoint, so a killed and resumed run ends with the weights of an
uninterrupted one. A folder that holds a run is refused unless ``resume`` or ``overwrite``.
"""

from __future__ import annotations

import logging
import math
import random
import signal
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from softprep.store import SoftStore, StoreError, scale_label
from softtrain import distributed
from softtrain.augment import PHOTOMETRIC, draws, photometric
from softtrain.checkpoint import (
    CheckpointError,
    RunCheckpoints,
    check_run_folder,
    clear_run,
    load_checkpoint,
    lock_run,
    resume_checkpoint,
    rng_state,
)
from softtrain.config import NO_EVAL, FitConfig, parse_crop
from softtrain.data import CropDataset, EvalDataset, normalise
from softtrain.distributed import Ranks
from softtrain.errors import TrainingError
from softtrain.evaluate import eval_dataset, evaluate, resolve_device
from softtrain.loader import worker_error
from softtrain.metrics import eval_record
from softtrain.models import build_model
from softtrain.optim import Stepper, poly_lr
from softtrain.regime import Regime, RunData, make_regime
from softtrain.runlog import RunLog, StepLog, Throughput
from softtrain.signals import Interrupted, stop_signals
from softtrain.tracking import picture, trackers

log = logging.getLogger("softtrain")


@dataclass
class RunInputs:
    """Everything a run needs that bad input can break, opened before anything is written."""

    store: SoftStore
    regime: Regime
    evalset: EvalDataset | None  # None: the store has no evaluation split
    eval_level: str
    model: torch.nn.Module
    ckpt: dict | None  # the checkpoint a resume continues from
    trackers: list  # softtrain.tracking.Tracker, rank 0 only


def _resume_checks(cfg: FitConfig, ckpt: dict, store: SoftStore, path: Path) -> None:
    changed = cfg.changed_for_resume(ckpt["config"])
    if changed:
        was = ", ".join(f"{k}={ckpt['config'][k]!r}" for k in changed)
        raise TrainingError(
            f"{path}: --resume cannot change {', '.join(changed)} (the run has {was}); "
            "drop those options, or start a new run with another --out"
        )
    if ckpt["store_meta"].get("build_id") != store.meta.get("build_id"):
        raise TrainingError(f"{path}: the run was trained on another store than {cfg.data.store}")
    if ckpt["step"] >= cfg.optim.iters and not ckpt.get("pending_eval"):
        raise TrainingError(
            f"{path}: the run is already at step {ckpt['step']} of {cfg.optim.iters}; "
            "give a larger --iters to train further"
        )


def _evaluation_set(cfg: FitConfig, store: SoftStore, level: str, main: bool):
    """What the run evaluates on (``EvalDataset``); None for ``--eval-split none`` and for a
    store without evaluation splits (said, where ``main``). A split or level the store
    cannot evaluate is refused (a typo once trained a whole run unevaluated)."""
    split = cfg.run.eval_split
    if split == NO_EVAL:
        return None
    evaluable = [s for s in store.splits if s in store.meta.get("eval_splits", [])]
    if split not in store.splits and evaluable:
        raise TrainingError(
            f"--eval-split {split}: {cfg.data.store} has no such split; its evaluation "
            f"split(s): {', '.join(evaluable)} (or none: train unevaluated)"
        )
    try:
        return eval_dataset(cfg.data.store, level, split)
    except StoreError as e:
        if evaluable:  # a level or split asked for that the store cannot evaluate at
            raise TrainingError(f"--eval-level/--eval-split: {e}") from None
        if main:
            log.warning("evaluation skipped, best.pt not written: %s", e)
        return None


def open_inputs(cfg: FitConfig, ranks: Ranks, resume: bool, overwrite: bool, cleanup: ExitStack):
    """``RunInputs``; the run folder's lock (rank 0) is taken last and released by
    ``cleanup``, so a refused run writes nothing."""
    store = SoftStore(cfg.data.store)
    image_only = store.image_only_splits if cfg.regime == "teacher-student" else []
    train = CropDataset(
        cfg.data.store,
        parse_crop(cfg.data.crop),
        ["train", *image_only],
        cfg.data.levels or None,
        cfg.data.level_weights or None,
        cat_max_ratio=cfg.data.cat_max_ratio,
        seed=cfg.optim.seed,
    )
    regime = make_regime(cfg, RunData(store, train, image_only, ranks))
    per_step = cfg.optim.batch_size * ranks.world
    if len(regime.labelled) < per_step:
        what = f"labelled images (--labeled {cfg.semi.labeled})" if cfg.semi.labeled else (
            "training images")  # fmt: skip
        raise TrainingError(
            f"{cfg.data.store}: {len(regime.labelled)} {what}, fewer than one step's "
            f"batch of {cfg.optim.batch_size} per process x {ranks.world} process(es)"
        )
    eval_level = cfg.run.eval_level or scale_label(max(train.scales))
    evalset = _evaluation_set(cfg, store, eval_level, ranks.main)
    model = build_model(cfg.optim.model, store.num_classes, cfg.optim.pretrained)
    out = Path(cfg.run.out)
    check_run_folder(out, resume, overwrite)
    ckpt = None
    if resume:
        ckpt, path = resume_checkpoint(out, store.classes)
        _resume_checks(cfg, ckpt, store, path)
    run = cfg.run
    chosen = trackers(out, run.tensorboard, run.mlflow, run.tracker) if ranks.main else []
    if ranks.main:
        cleanup.callback(lock_run(out).release)
    return RunInputs(store, regime, evalset, eval_level, model, ckpt, chosen)


def fit(
    cfg: FitConfig,
    resume: bool = False,
    overwrite: bool = False,
    on_log=None,
    on_eval=None,
    on_start=None,
) -> dict:
    """Train per ``cfg``; returns {"best_miou", "last_miou", "step", "rank"} (mIoU None when
    the store has no evaluation split). ``on_start(lines)`` once, with what the run uses
    (device, model, data, crop against the levels); ``on_log(StepLog)`` every ``log_every``
    steps and ``on_eval(record)`` (``metrics.eval_record``) report progress (rank 0 only). Raises
    ``TrainingError`` for unusable inputs (before anything is written) and ``Interrupted``
    on SIGTERM/SIGINT. Under ``torchrun``, one process per GPU (``softtrain.distributed``).
    """
    ranks = distributed.setup(resolve_device(cfg.speed.device))
    try:
        with ExitStack() as cleanup:  # the run folder's lock, loader workers: on any exit
            return _fit(cfg, ranks, resume, overwrite, on_log, on_eval, on_start, cleanup)
    finally:
        distributed.teardown(ranks)


def _fit(cfg: FitConfig, ranks, resume, overwrite, on_log, on_eval, on_start, cleanup) -> dict:
    optim, every = cfg.optim, cfg.run
    inputs = _start(cfg, ranks, resume, overwrite, cleanup)
    if on_start and ranks.main:
        on_start(banner(cfg, inputs, ranks))
    out, regime, ckpt = Path(every.out), inputs.regime, inputs.ckpt
    runlog = _start_run_folder(cfg, ranks, resume, ckpt, inputs.trackers)
    if runlog:
        cleanup.callback(runlog.close)  # trackers end their runs however this one ends
    model = _place(inputs.model, cfg, ranks)
    stepper = Stepper(model, cfg, ranks.device)
    regime.start(model)
    saves = RunCheckpoints(out, cfg, inputs.store, inputs.eval_level, ranks, runlog)
    step, best = saves.restore(ckpt, model, stepper, regime)
    forward = _forward(model, cfg, ranks)
    micro = step * optim.accum  # micro-batches (per rank) consumed so far
    meter, last_miou, evaluated = Throughput(step, optim.iters), None, set()

    def save(pending_eval: bool = False) -> None:
        saves.save(step, best, model, stepper, regime, pending_eval)

    def run_eval() -> float | None:
        """Score the evaluation model; a stop signal meanwhile ends it within an image
        (one process), saves with the evaluation pending (a resume redoes it) and stops."""
        nonlocal best
        try:
            miou = _evaluate(
                regime.eval_model(model), inputs, cfg, ranks, step, runlog, on_eval, stop
            )
        except EvaluationStopped:
            save(pending_eval=True)
            raise Interrupted(stop["signum"], step, out) from None
        if miou is not None and miou > best:
            saves.save_best(step, miou, model, regime)
        best = max(best, miou if miou is not None else -1.0)
        evaluated.add(step)
        return miou

    model.train()
    batches = regime.batches(micro, cleanup)
    step_loss, step_kl = 0.0, 0.0
    with stop_signals() as stop:
        if ckpt and ckpt.get("pending_eval") and inputs.evalset is not None:
            last_miou = run_eval()  # the evaluation a stop signal cut short
            save()
        while step < optim.iters:
            with meter.waiting():
                batch = _next(batches, stop)
            if distributed.any_rank(ranks, stop["signum"] is not None):
                save()
                raise Interrupted(stop["signum"] or signal.SIGTERM, step, out)
            batch = _prepare(batch, micro, cfg, ranks.device, ranks.rank)
            result, value = _backward(regime, forward, stepper, batch, step, micro, cfg, ranks)
            micro += 1
            meter.saw(batch["image"].shape[0] * ranks.world)
            step_loss += value / optim.accum  # the step's loss: its micro-batches' mean
            step_kl += result.kl.detach() / optim.accum
            if micro % optim.accum:
                continue
            stepper.step()
            regime.after_step(model, step)
            step += 1
            saves.stepped()  # a save records the RNG state of the last optimiser step
            if step % every.log_every == 0 or step == optim.iters:
                kl = distributed.mean(ranks, step_kl)  # every rank takes part, as for the loss
                if ranks.main:
                    _log_step(
                        runlog, on_log, step, optim.iters, step_loss, kl, stepper.lr, meter, ranks
                    )
            step_loss, step_kl = 0.0, 0.0
            if step == optim.iters:
                break
            with meter.paused():  # rates count training time only
                if inputs.evalset is not None and every.eval_every and step % every.eval_every == 0:
                    last_miou = run_eval()
                    save()
                elif every.save_every and step % every.save_every == 0:
                    save()
        if inputs.evalset is not None and step not in evaluated:
            last_miou = run_eval()
        save()
    best_miou = best if best >= 0 else None
    return {"best_miou": best_miou, "last_miou": last_miou, "step": step, "rank": ranks.rank}


def banner(cfg: FitConfig, inputs: RunInputs, ranks: Ranks) -> list[str]:
    """What a run uses, said once at its start: device, model, data, crop against levels."""
    train = inputs.regime.labelled
    n = sum(p.numel() for p in inputs.model.parameters())
    params = f"{n / 1e6:.1f} M" if n >= 100_000 else f"{n / 1e3:.1f} k"  # a user's small model
    ch, cw = train.crop
    levels = ", ".join(scale_label(s) for s in train.scales)
    sizes = ", ".join(
        f"{hw[:, 0].max()}x{hw[:, 1].max()}"
        for hw in (train.hw[s][train.items] for s in train.scales)
    )
    device = f"{ranks.device}" + (f" x {ranks.world} processes" if ranks.distributed else "")
    unevaluated = f"--eval-split {NO_EVAL}" if cfg.run.eval_split == NO_EVAL else (
        "no evaluation split")  # fmt: skip
    lines = [
        f"{cfg.regime} training of {cfg.optim.model} ({params} parameters) on {device}"
        + (", bf16" if cfg.speed.bf16 else ""),
        f"data: {len(train)} training images of {cfg.data.store}; batch {cfg.optim.batch_size}"
        f" x {cfg.optim.accum} accumulated, {cfg.optim.iters} steps",
        f"crops {ch}x{cw} (height x width) from levels {levels}, whose images are up to {sizes}",
        f"evaluation: {cfg.run.eval_split} at {inputs.eval_level}"
        if inputs.evalset is not None
        else f"evaluation: none ({unevaluated})",
    ]
    padding = train.padding_note()
    if padding:
        lines.append(f"note: {padding}")
    if cfg.speed.bf16 and ranks.device.type == "cpu":
        lines.append("note: --bf16 on the CPU is slow and less precise; it is meant for GPUs")
    return lines


def _start(cfg: FitConfig, ranks: Ranks, resume, overwrite, cleanup) -> RunInputs:
    """Seeds set, inputs opened on every rank; every rank stops if any cannot start."""
    torch.manual_seed(cfg.optim.seed + ranks.rank)  # dropout differs per rank; DDP syncs
    np.random.seed(cfg.optim.seed)
    random.seed(cfg.optim.seed)
    try:
        inputs, error = open_inputs(cfg, ranks, resume, overwrite, cleanup), None
    except (StoreError, TrainingError, CheckpointError, ValueError, FileNotFoundError) as e:
        error = e
    failed = distributed.agree(ranks, error)
    if failed:
        raise error if error is not None else TrainingError(failed)
    return inputs


def _backward(regime: Regime, forward, stepper, batch: dict, step: int, micro: int, cfg, ranks):
    """One micro-batch's loss and gradients: (LossOutput, the loss averaged over ranks).
    Under DDP gradients are all-reduced on the last micro-batch of a step only."""
    accum = cfg.optim.accum
    last_micro = (micro + 1) % accum == 0
    no_sync = forward.model.no_sync if ranks.distributed and not last_micro else nullcontext
    with no_sync():
        result = regime.loss(forward, batch, step, micro)
        value = distributed.mean(ranks, result.loss).item()
        if not math.isfinite(value):
            raise TrainingError(_non_finite_message(value, step, Path(cfg.run.out)))
        stepper.backward(result.loss / accum)
    return result, value


def _log_step(runlog, on_log, step, iters, loss, kl, lr, meter, ranks) -> None:
    """Log optimiser step ``step``: ``loss`` (float) and ``kl`` (scalar tensor) are the
    means over the step's micro-batches and the ranks."""
    entry = StepLog(
        step=step, iters=iters, loss=loss, kl=float(kl), lr=lr,
        **meter.report(step, ranks.device),
    )  # fmt: skip
    runlog.train(entry)
    if on_log:
        on_log(entry)


def _start_run_folder(cfg: FitConfig, ranks: Ranks, resume: bool, ckpt: dict | None, chosen):
    """The inputs are usable: from here on rank 0 writes the run folder. Returns its
    ``RunLog`` (None on other ranks)."""
    if not ranks.main:
        return None
    out = Path(cfg.run.out)
    if not resume:  # --overwrite, or what a run that never saved left
        clear_run(out)
    (out / "config.toml").write_text(cfg.to_toml())
    return RunLog(out, chosen, cfg.flat(), resume_step=ckpt["step"] if ckpt else None)


def _place(model: torch.nn.Module, cfg: FitConfig, ranks: Ranks) -> torch.nn.Module:
    """The model on its device (SyncBatchNorm, channels_last as asked)."""
    if cfg.speed.sync_bn and ranks.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(ranks.device)
    if cfg.speed.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if ranks.device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size
    return model


def _forward(model: torch.nn.Module, cfg: FitConfig, ranks: Ranks):
    """``forward(images, module=None)``: the training model (DDP-wrapped, compiled as asked)
    or ``module`` under the run's autocast. ``forward.model`` is the wrapped model."""
    device = ranks.device
    train_model = model
    if ranks.distributed:
        ids = [device.index] if device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    step_model = torch.compile(train_model) if cfg.speed.compile else train_model

    dtype = torch.float16 if cfg.speed.fp16 else torch.bfloat16
    amp = cfg.speed.bf16 or cfg.speed.fp16

    def forward(images: torch.Tensor, module: torch.nn.Module | None = None) -> torch.Tensor:
        with torch.autocast(device.type, dtype=dtype, enabled=amp):
            return (module or step_model)(images)

    forward.model = train_model
    return forward


def _next(batches, stop: dict) -> dict | None:
    """The next micro-batch; None when a stop signal came while waiting; a worker's error
    as its own one-sentence message."""
    try:
        return next(batches)
    except Exception as e:
        if stop["signum"] is None:
            raise worker_error(e) from None
        return None


def _prepare(batch: dict, micro: int, cfg: FitConfig, device: torch.device, rank: int) -> dict:
    """Tensors on ``device``: ``colour`` (B, 3, h, w) uint8 as loaded, ``image`` float32
    normalised (after the photometric distortion, seeded by rank and micro-batch, if asked)."""
    moved = {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
    moved["colour"] = image = moved["image"]
    if cfg.data.photometric:
        image = photometric(image, draws(cfg.optim.seed, PHOTOMETRIC, rank, micro))
    moved["image"] = normalise(image)
    if cfg.speed.channels_last:
        moved["image"] = moved["image"].contiguous(memory_format=torch.channels_last)
    return moved


class EvaluationStopped(Exception):
    """A stop signal came during an evaluation (one process): it was cut short."""


def _evaluate(model, inputs: RunInputs, cfg, ranks, step, runlog, on_eval, stop) -> float | None:
    """mIoU of ``model`` on the evaluation split (every rank takes part), recorded by rank 0.
    In one process a stop signal ends it after the current image (``EvaluationStopped``);
    under torchrun the ranks finish it together (they score different images)."""

    def check(done: int, total: int) -> None:
        if stop["signum"] is not None:
            raise EvaluationStopped

    names = [c["name"] for c in inputs.store.classes]
    distributed.share_buffers(ranks, model)  # evaluate exactly the model rank 0 saves
    kept = [] if runlog is not None and runlog.trackers else None
    confusion = evaluate(
        model, inputs.evalset, len(names), ranks.device, crop=cfg.data.crop,
        progress=None if ranks.distributed else check, ranks=ranks, keep=kept,
    )  # fmt: skip
    record = eval_record(
        confusion, names, step=step, split=cfg.run.eval_split, level=inputs.eval_level,
        mode="whole",
    )  # fmt: skip
    if ranks.main:
        palette = np.zeros((256, 3), np.uint8)
        palette[: len(names)] = inputs.store.manifest.palette
        shown = [(f"val/image{i}", picture(*k, palette)) for i, k in enumerate(kept or [])]
        runlog.eval(record, shown)
        if on_eval:
            on_eval(record)
    return record["mIoU"]


def _non_finite_message(value: float, step: int, out: Path) -> str:
    last = out / "last.pt"
    saved = load_checkpoint(last)["step"] if last.exists() else None
    if saved is None:
        return (
            f"loss is {value} at step {step}; stopped. No checkpoint was saved yet: lower --lr "
            "or add --warmup-iters and start again"
        )
    return (
        f"loss is {value} at step {step}; stopped. The last checkpoint ({last}, step {saved}) "
        "is intact: lower --lr or add --warmup-iters, then --resume"
    )


__all__ = ["FitConfig", "Interrupted", "TrainingError", "fit", "poly_lr", "rng_state"]
