"""Training on a softprep store: read it top to bottom.

``fit``: SGD (momentum, weight decay) with a poly learning rate (optional linear warm-up)
on random-scale crops; the loss is soft cross-entropy on the densified soft labels (or hard
CE on their argmax). ``last.pt`` is written every ``save_every`` steps, at every
evaluation, on SIGTERM/SIGINT and at the end (atomically: a kill at any moment leaves the
previous one intact); every ``eval_every`` steps and at the end the model is evaluated on
the store's evaluation split at full resolution and ``best.pt`` kept for the best mIoU.
``resume`` continues exactly: model, optimiser, schedule, step, data order and RNG states
come from ``last.pt``, so a killed and resumed run ends with the weights of an
uninterrupted one. A folder that holds a run is refused unless ``resume`` or ``overwrite``.
"""

from __future__ import annotations

import logging
import math
import random
import signal
import threading
import time
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from softprep.store import SoftStore, StoreError, scale_label
from softtrain import distributed
from softtrain.checkpoint import (
    CheckpointError,
    check_run_folder,
    clear_run,
    keep_last,
    load_checkpoint,
    lock_run,
    resume_checkpoint,
    save_checkpoint,
)
from softtrain.config import FitConfig
from softtrain.data import CropDataset, normalise, parse_crop
from softtrain.distributed import Ranks
from softtrain.evaluate import eval_dataset, evaluate, resolve_device
from softtrain.loader import batches, run_loader, worker_error
from softtrain.metrics import eval_record
from softtrain.models import build_model
from softtrain.runlog import RunLog, StepLog
from softtrain.semi import SemiOptions, TeacherStudent, partition
from softtrain.weak import training_loss

log = logging.getLogger("softtrain")


class TrainingError(RuntimeError):
    """Training cannot start or had to stop (non-finite loss, refused resume); the message
    says why and what to do."""


class Interrupted(Exception):
    """SIGTERM or SIGINT stopped the run after ``last.pt`` was saved at ``step``."""

    def __init__(self, signum: int, step: int, out: Path):
        self.signum, self.step = signum, step
        super().__init__(
            f"{signal.Signals(signum).name}: stopped at step {step} with {out / 'last.pt'} "
            f"saved; continue with: softtrain fit --out {out} --resume"
        )


def poly_lr(step: int, cfg: FitConfig) -> float:
    """Learning-rate factor at ``step``: linear warm-up, then (1 - t)^power."""
    if step < cfg.warmup_iters:
        return (step + 1) / cfg.warmup_iters
    return max(0.0, 1 - step / max(1, cfg.iters)) ** cfg.power


def _rng_state() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextmanager
def stop_signals():
    """Within: SIGTERM and SIGINT only set ``flag["signum"]`` (the loop saves and stops at
    the next step). Outside the main thread nothing is installed."""
    flag = {"signum": None}
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return

    def handler(signum, frame):
        flag["signum"] = signum

    previous = {s: signal.signal(s, handler) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _resume_checks(cfg: FitConfig, ckpt: dict, store: SoftStore, path: Path) -> None:
    changed = cfg.changed_for_resume(ckpt["config"])
    if changed:
        was = ", ".join(f"{k}={ckpt['config'][k]!r}" for k in changed)
        raise TrainingError(
            f"{path}: --resume cannot change {', '.join(changed)} (the run has {was}); "
            "drop those options, or start a new run with another --out"
        )
    if ckpt["store_meta"].get("build_id") != store.meta.get("build_id"):
        raise TrainingError(f"{path}: the run was trained on another store than {cfg.store}")
    if ckpt["step"] >= cfg.iters:
        raise TrainingError(
            f"{path}: the run is already at step {ckpt['step']} of {cfg.iters}; "
            "give a larger --iters to train further"
        )


def _open_inputs(cfg: FitConfig, ranks: Ranks, resume: bool, overwrite: bool):
    """Everything a run needs that bad input can break, opened before anything is written:
    (store, training crops, unlabelled crops or None, evaluation set or None, evaluation
    level, model, checkpoint, the run folder's lock (rank 0) or None). The lock is taken last,
    so a refused run writes nothing."""
    store = SoftStore(cfg.store)
    image_only = store.image_only_splits if cfg.labeled else []
    train = CropDataset(
        cfg.store,
        parse_crop(cfg.crop),
        ["train", *image_only],
        cfg.levels or None,
        cfg.level_weights or None,
        cat_max_ratio=cfg.cat_max_ratio,
        seed=cfg.seed,
    )
    unlabeled = None
    if cfg.labeled:  # semi-supervised: a labelled share of train; its rest and image-only splits
        in_train = store.split_of()[train.items] == "train"
        labelled, rest = partition(
            store.names(),
            train.items[in_train],
            cfg.labeled,
            cfg.labeled_seed,
            store.manifest.layout["image_suffix"],
        )
        rest = np.union1d(rest, train.items[~in_train])
        train, unlabeled = train.subset(labelled, cfg.seed), train.subset(rest, cfg.seed + 1)
        if len(unlabeled) < (cfg.unlabeled_batch or cfg.batch_size) * ranks.world:
            raise TrainingError(
                f"{cfg.store}: {len(unlabeled)} unlabelled images (the rest of train"
                + "".join(f", {s}" for s in image_only)
                + "), fewer than one step's unlabelled batch; lower --unlabeled-batch, label "
                "fewer images or add image-only splits (softprep build --unlabeled DIR)"
            )
    per_step = cfg.batch_size * ranks.world
    if len(train) < per_step:
        raise TrainingError(
            f"{cfg.store}: {len(train)} training images, fewer than one step's batch of "
            f"{cfg.batch_size} per process x {ranks.world} process(es)"
        )
    eval_level = cfg.eval_level or scale_label(max(train.scales))
    try:
        evalset = eval_dataset(cfg.store, eval_level, cfg.eval_split)
    except StoreError as e:
        evalset = None
        if ranks.main:
            log.warning("evaluation skipped, best.pt not written: %s", e)
    model = build_model(cfg.model, store.num_classes, cfg.pretrained)
    out = Path(cfg.out)
    check_run_folder(out, resume, overwrite)
    ckpt = None
    if resume:
        ckpt, path = resume_checkpoint(out, store.classes)
        _resume_checks(cfg, ckpt, store, path)
    lock = lock_run(out) if ranks.main else None
    return store, train, unlabeled, evalset, eval_level, model, ckpt, lock


def fit(
    cfg: FitConfig, resume: bool = False, overwrite: bool = False, on_log=None, on_eval=None
) -> dict:
    """Train per ``cfg``; returns {"best_miou", "last_miou", "step", "rank"} (mIoU None when
    the store has no evaluation split). ``on_log(StepLog)`` every ``log_every`` steps and
    ``on_eval(record)`` (``metrics.eval_record``) report progress (rank 0 only). Raises
    ``TrainingError`` for unusable inputs (before anything is written) and ``Interrupted``
    on SIGTERM/SIGINT. Under ``torchrun``, one process per GPU (``softtrain.distributed``).
    """
    ranks = distributed.setup(resolve_device(cfg.device))
    try:
        with ExitStack() as cleanup:  # the run folder's lock, loader workers: on any exit
            return _fit(cfg, ranks, resume, overwrite, on_log, on_eval, cleanup)
    finally:
        distributed.teardown(ranks)


def _fit(cfg: FitConfig, ranks: Ranks, resume, overwrite, on_log, on_eval, cleanup) -> dict:
    device = ranks.device
    torch.manual_seed(cfg.seed + ranks.rank)  # dropout differs per rank; DDP syncs weights
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    try:
        store, train, unlabeled, evalset, eval_level, model, ckpt, lock = _open_inputs(
            cfg, ranks, resume, overwrite
        )
        if lock is not None:
            cleanup.callback(lock.release)
        error = None
    except (StoreError, TrainingError, CheckpointError, ValueError, FileNotFoundError) as e:
        error = e
    failed = distributed.agree(ranks, error)  # every rank stops if any cannot start
    if failed:
        raise error if error is not None else TrainingError(failed)
    classes = store.classes
    names = [c["name"] for c in classes]
    out = Path(cfg.out)
    runlog = None
    if ranks.main:  # the inputs are usable: from here on the run folder is written
        if not resume:  # --overwrite, or what a run that never saved left
            clear_run(out)
        (out / "config.toml").write_text(cfg.to_toml())
        runlog = RunLog(out, cfg.tensorboard, resume_step=ckpt["step"] if ckpt else None)
    if cfg.sync_bn and ranks.distributed:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    model = model.to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(
        model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: poly_lr(s, cfg))
    step, best, last_miou = 0, -1.0, None
    if ckpt:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        step, best = ckpt["step"], ckpt["best_miou"]
        scheduler.base_lrs = [cfg.lr] * len(optimizer.param_groups)  # --lr, --iters apply
        for group in optimizer.param_groups:
            group["initial_lr"], group["lr"] = cfg.lr, cfg.lr * poly_lr(step, cfg)
        states = ckpt["rng"]  # one per rank of the run that saved it
        states = [states] if isinstance(states, dict) else states
        _set_rng_state(states[ranks.rank] if len(states) == ranks.world else states[0])
    semi = None
    if unlabeled is not None:  # the teacher starts as the (restored) student
        semi = TeacherStudent(model, SemiOptions.from_config(cfg), cfg.seed, cfg.iters)
        if ckpt and "teacher" in ckpt:
            semi.teacher.load_state_dict(ckpt["teacher"])
    train_model = model
    if ranks.distributed:
        ids = [device.index] if device.type == "cuda" else None
        train_model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    step_model = torch.compile(train_model) if cfg.compile else train_model
    loss_fn = training_loss(cfg)  # soft-label loss, or a weak-supervision regime
    rng_at_step = _rng_state()  # RNG state at the last optimiser step: what a save records
    micro = step * cfg.accum  # micro-batches (per rank) consumed so far
    meta = {
        "classes": classes,
        "config": asdict(cfg),
        "store_meta": {
            k: store.meta.get(k)
            for k in ("kernel", "antialias", "short_side", "dataset", "build_id", "manifest")
        },
        "eval_level": eval_level,
        "world_size": ranks.world,
    }

    def checkpoint(path: Path, rng: list) -> None:
        save_checkpoint(
            path,
            model=model.state_dict(),
            optimizer=optimizer.state_dict(),
            scheduler=scheduler.state_dict(),
            step=step,
            best_miou=best,
            rng=rng,
            **({"teacher": semi.teacher.state_dict()} if semi else {}),
            **meta,
        )

    def save() -> None:
        rng = distributed.gather(ranks, rng_at_step)  # every rank calls; rank 0 writes
        if not ranks.main:
            return
        checkpoint(out / "last.pt", rng)
        if cfg.keep_checkpoints:
            checkpoint(out / f"iter_{step}.pt", rng)
            keep_last(out, cfg.keep_checkpoints)
        runlog.plot()

    def run_eval() -> float | None:
        nonlocal best
        scored = semi.teacher if semi and cfg.semi_eval == "teacher" else model
        distributed.share_buffers(ranks, scored)  # evaluate exactly the model rank 0 saves
        confusion = evaluate(scored, evalset, len(classes), device, crop=cfg.crop, ranks=ranks)
        record = eval_record(
            confusion, names, step=step, split=cfg.eval_split, level=eval_level, mode="whole"
        )
        miou = record["mIoU"]
        rng = distributed.gather(ranks, rng_at_step)  # every rank calls; rank 0 writes
        if ranks.main:
            runlog.eval(record)
            if on_eval:
                on_eval(record)
            if miou is not None and miou > best:
                checkpoint(out / "best.pt", rng)
        best = max(best, miou if miou is not None else -1.0)
        return miou

    model.train()
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed crop size
    pin = device.type == "cuda"
    loader = run_loader(
        train, cfg.batch_size, cfg.seed, micro, ranks.rank, ranks.world, cfg.workers, pin
    )
    batches_ = cleanup.enter_context(batches(loader))
    if semi:
        per_rank = cfg.unlabeled_batch or cfg.batch_size
        loader = run_loader(
            unlabeled, per_rank, cfg.seed + 1, micro, ranks.rank, ranks.world, cfg.workers, pin
        )
        unlabeled_batches = cleanup.enter_context(batches(loader))
    t_start, step_start = time.perf_counter(), step
    t_log, wait, seen = t_start, 0.0, 0
    with stop_signals() as stop:
        while step < cfg.iters:
            t0 = time.perf_counter()
            try:
                batch = next(batches_)
                extra = next(unlabeled_batches)["image"] if semi else None
            except Exception as e:
                if stop["signum"] is None:  # a signal also stops the loader's workers
                    raise worker_error(e) from None
                batch = None
            if distributed.any_rank(ranks, stop["signum"] is not None):
                save()
                raise Interrupted(stop["signum"] or signal.SIGTERM, step, out)
            wait += time.perf_counter() - t0
            colour = batch["image"].to(device, non_blocking=True)  # (B, 3, h, w) uint8
            image = normalise(colour)
            if cfg.channels_last:
                image = image.contiguous(memory_format=torch.channels_last)
            index = batch["index"].to(device, non_blocking=True)
            prob = batch["prob"].to(device, non_blocking=True)
            last_micro = (micro + 1) % cfg.accum == 0  # gradients are all-reduced only then
            no_sync = train_model.no_sync if ranks.distributed and not last_micro else nullcontext
            with no_sync():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    if semi:  # one pass over labelled crops and the unlabelled strong view
                        logits, unsupervised = semi.forward(
                            step_model, image, extra.to(device, non_blocking=True), normalise,
                            step, micro,
                        )
                    else:
                        logits = step_model(image)
                logits = F.interpolate(
                    logits.float(), size=index.shape[-2:], mode="bilinear", align_corners=False
                )
                out_loss = loss_fn(logits, index, prob, colour, step)
                if semi:
                    out_loss.loss = out_loss.loss + unsupervised
                value = distributed.mean(ranks, out_loss.loss).item()
                if not math.isfinite(value):
                    raise TrainingError(_non_finite_message(value, step, out))
                (out_loss.loss / cfg.accum).backward()
            micro += 1
            seen += image.shape[0] * ranks.world
            if micro % cfg.accum:
                continue
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            if semi:
                semi.update(model, step)  # the teacher follows the student
            step += 1
            rng_at_step = _rng_state()
            if ranks.main and (step % cfg.log_every == 0 or step == cfg.iters):
                now = time.perf_counter()
                peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else 0.0
                entry = StepLog(
                    step=step,
                    iters=cfg.iters,
                    loss=value,
                    kl=out_loss.kl.item(),
                    lr=scheduler.get_last_lr()[0],
                    crops_per_s=seen / (now - t_log),
                    data_wait_share=wait / (now - t_log),
                    peak_memory_gib=peak,
                    eta_s=(cfg.iters - step) * (now - t_start) / (step - step_start),
                )
                runlog.train(entry)
                if on_log:
                    on_log(entry)
                t_log, wait, seen = time.perf_counter(), 0.0, 0
            if step == cfg.iters:
                break
            t_pause = time.perf_counter()  # rates count training time only
            if evalset is not None and cfg.eval_every and step % cfg.eval_every == 0:
                last_miou = run_eval()
                save()
            elif cfg.save_every and step % cfg.save_every == 0:
                save()
            t_log += time.perf_counter() - t_pause
        if evalset is not None:
            last_miou = run_eval()
        save()
    if runlog:
        runlog.close()
    best_miou = best if best >= 0 else None
    return {"best_miou": best_miou, "last_miou": last_miou, "step": step, "rank": ranks.rank}


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
