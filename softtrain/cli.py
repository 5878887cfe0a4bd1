"""The ``softtrain`` command line: parses arguments, calls the library, reports.

torch, timm and the training modules are imported inside the commands, so ``--help``
answers at once.
"""

from __future__ import annotations

import csv
import json
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from softprep.terminal import (
    progress_bar,
    run_app,
    show_notes,
    tagged,
    user_errors,
)
from softtrain.config import LOSSES, MC_MODES, POTTS, WEAK_LOSSES, XENT, FitConfig

app = typer.Typer(
    help="Segmentation training on softprep soft-label stores: fit, eval, predict.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, soft_wrap=True)  # log files get whole lines
out = Console()
MULTI_VALUE = ("--levels", "--level-weights", "--tta-levels", "--arm", "--seeds")


def _user_errors():
    from softprep.store import StoreError
    from softtrain.checkpoint import CheckpointError
    from softtrain.fit import TrainingError

    return user_errors((StoreError, TrainingError, CheckpointError, ValueError, FileNotFoundError))


@app.callback()
def _setup() -> None:
    show_notes("softtrain")


def _step_text(log) -> str:
    return (
        f"step {log.step}/{log.iters} loss {log.loss:.4f} KL {log.kl:.4f} lr {log.lr:.2e} "
        f"{log.crops_per_s:.1f} crops/s data wait {log.data_wait_share:.0%}"
        + (f" mem {log.peak_memory_gib:.1f} GiB" if log.peak_memory_gib else "")
    )


def _eval_text(record: dict) -> str:
    miou = "n/a" if record["mIoU"] is None else f"{record['mIoU']:.4f}"
    macc = "n/a" if record["mAcc"] is None else f"{record['mAcc']:.4f}"
    return (
        f"step {record['step']} eval {record['split']} at {record['level']}: mIoU {miou} "
        f"mAcc {macc} aAcc {record['aAcc']:.4f}"
    )


@contextmanager
def fit_reporter(iters: int):
    """(on_log, on_eval): a rich bar on a terminal; otherwise (nohup, SLURM) one plain,
    flushed, timestamped line per report, so log files get every line."""
    if console.is_terminal:
        with Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
        ) as bar:
            task = bar.add_task("fit", total=iters, info="")

            def on_log(log) -> None:
                bar.update(task, completed=log.step, info=_step_text(log).split(" ", 2)[2])

            def on_eval(record: dict) -> None:
                bar.console.print(_eval_text(record))

            yield on_log, on_eval
        return

    def line(text: str) -> None:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        print(f"{stamp} {text}", file=sys.stderr, flush=True)

    def on_log(log) -> None:
        line(f"{_step_text(log)} ETA {timedelta(seconds=round(log.eta_s))}")

    def on_eval(record: dict) -> None:
        line(_eval_text(record))

    yield on_log, on_eval


def print_eval(record: dict, title: str) -> None:
    fmt = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    table = Table(
        "class",
        "IoU",
        "Acc",
        title=f"{title}\naAcc {fmt(record['aAcc'])}  mIoU {fmt(record['mIoU'])}  "
        f"mAcc {fmt(record['mAcc'])}",
    )
    for row in record["classes"]:
        table.add_row(row["class"], fmt(row["iou"]), fmt(row["acc"]))
    out.print(table)


def write_eval(record: dict, csv_path: Path | None, json_path: Path | None) -> None:
    """The record as JSON (NaN-free) and its per-class rows as CSV (class, iou, acc)."""
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["class", "iou", "acc"])
            writer.writeheader()
            writer.writerows(record["classes"])
    if json_path:
        json_path.write_text(json.dumps(record, indent=1, allow_nan=False))


@app.command()
def fit(
    store: str = typer.Option(
        None, help="Store built by 'softprep build'.", rich_help_panel="Data"
    ),
    config: Path = typer.Option(
        None, help="A config.toml (as written next to every run); flags given here override it."
    ),
    out_dir: str = typer.Option(
        None,
        "--out",
        help="Run folder: config.toml, metrics.jsonl, last.pt, best.pt, curves.png, tb/. "
        "(default: runs/run)",
    ),
    resume: bool = typer.Option(
        False,
        help="Continue the run in --out from its last.pt (its config.toml is the base; only "
        "--iters, --lr, --workers, --device, logging, saving and evaluation options may change).",
    ),
    overwrite: bool = typer.Option(False, help="Delete the run in --out and start again."),
    model: str = typer.Option(
        None,
        help="Model name; 'softtrain models' lists them. (default: hrnetv2_w48)",
        rich_help_panel="Optimisation",
    ),
    pretrained: str = typer.Option(
        None,
        help="Local file with trunk weights (never downloaded).",
        rich_help_panel="Optimisation",
    ),
    crop: str = typer.Option(
        None, help="Crop HEIGHTxWIDTH. (default: 256x512)", rich_help_panel="Data"
    ),
    levels: list[str] = typer.Option(
        None, help="Store levels to draw scales from. (default: all)", rich_help_panel="Data"
    ),
    level_weights: list[float] = typer.Option(
        None,
        help="Sampling weight per level. (default: uniform)",
        rich_help_panel="Data",
    ),
    cat_max_ratio: float = typer.Option(
        None,
        help="Class-balanced crops (mmseg cat_max_ratio, e.g. 0.75). (default: 1.0 = off)",
        rich_help_panel="Data",
    ),
    batch_size: int = typer.Option(
        None,
        help="Crops per step and GPU: under torchrun with N processes a step sees N x this; "
        "--lr is used as given (scale it yourself, e.g. linearly). (default: 12)",
        rich_help_panel="Optimisation",
    ),
    accum: int = typer.Option(
        None, help="Gradient accumulation steps. (default: 1)", rich_help_panel="Optimisation"
    ),
    iters: int = typer.Option(
        None, help="Optimiser steps. (default: 1000)", rich_help_panel="Optimisation"
    ),
    lr: float = typer.Option(
        None, help="Base learning rate. (default: 0.01)", rich_help_panel="Optimisation"
    ),
    momentum: float = typer.Option(
        None, help="SGD momentum. (default: 0.9)", rich_help_panel="Optimisation"
    ),
    weight_decay: float = typer.Option(
        None, help="Weight decay. (default: 1e-4)", rich_help_panel="Optimisation"
    ),
    power: float = typer.Option(
        None, help="Poly learning-rate power. (default: 0.9)", rich_help_panel="Optimisation"
    ),
    warmup_iters: int = typer.Option(
        None, help="Linear warm-up steps. (default: 0)", rich_help_panel="Optimisation"
    ),
    loss: str = typer.Option(
        None,
        help=f"{' or '.join(LOSSES)}: KL / soft CE, or CE on the argmax. (default: soft)",
        rich_help_panel="Optimisation",
    ),
    mc: str = typer.Option(
        None,
        help=f"Multi-class pixels in the loss: {' or '.join(MC_MODES)}. (default: include)",
        rich_help_panel="Optimisation",
    ),
    workers: int = typer.Option(
        None, help="Loader worker processes. (default: 2)", rich_help_panel="Data"
    ),
    eval_every: int = typer.Option(
        None,
        help="Evaluate every N steps (0: only at the end). (default: 0)",
        rich_help_panel="Evaluation, checkpoints, logs",
    ),
    eval_level: str = typer.Option(
        None,
        help="Level to evaluate at. (default: the largest training level)",
        rich_help_panel="Evaluation, checkpoints, logs",
    ),
    eval_split: str = typer.Option(
        None,
        help="Split to evaluate on; a store without it trains unevaluated. (default: val)",
        rich_help_panel="Evaluation, checkpoints, logs",
    ),
    save_every: int = typer.Option(
        None,
        help="Save last.pt every N steps (0: only at evaluations and the end). (default: 500)",
        rich_help_panel="Evaluation, checkpoints, logs",
    ),
    keep_checkpoints: int = typer.Option(
        None,
        help="Also keep the last N checkpoints as iter_<step>.pt. (default: 0)",
        rich_help_panel="Evaluation, checkpoints, logs",
    ),
    tensorboard: bool = typer.Option(
        None,
        "--tensorboard/--no-tensorboard",
        help="TensorBoard scalars in <out>/tb (pip install 'softprep[tensorboard]').",
        rich_help_panel="Evaluation, checkpoints, logs",
    ),
    sync_bn: bool = typer.Option(
        None,
        "--sync-bn/--no-sync-bn",
        help="SyncBatchNorm across GPUs (under torchrun).",
        rich_help_panel="Speed (GPU), several GPUs",
    ),
    weak_loss: str = typer.Option(
        None,
        help=f"Weak supervision ({', '.join(WEAK_LOSSES)}): none = CE on labelled pixels; potts "
        "= + dense Potts on the predictions; self-label = + soft pseudo-labels. (default: none)",
        rich_help_panel="Weak supervision",
    ),
    weak_potts: str = typer.Option(
        None,
        help=f"Potts relaxation: {', '.join(POTTS)}. (default: collision-divergence)",
        rich_help_panel="Weak supervision",
    ),
    weak_xent: str = typer.Option(
        None,
        help=f"Pseudo-label cross-entropy: {', '.join(XENT)}. (default: collision)",
        rich_help_panel="Weak supervision",
    ),
    weak_eta: float = typer.Option(
        None, help="Weight of H(y, s). (default: 1.0)", rich_help_panel="Weak supervision"
    ),
    weak_lambda: float = typer.Option(
        None, help="Weight of the Potts term. (default: 10.0)", rich_help_panel="Weak supervision"
    ),
    weak_sigma: float = typer.Option(
        None,
        help="Colour bandwidth of the pair weights, 0..255. (default: 3)",
        rich_help_panel="Weak supervision",
    ),
    weak_neighbours: int = typer.Option(
        None, help="Pairs: 4 or 8 neighbours. (default: 4)", rich_help_panel="Weak supervision"
    ),
    weak_steps: int = typer.Option(
        None, help="Pseudo-label solver steps. (default: 200)", rich_help_panel="Weak supervision"
    ),
    weak_step_lr: float = typer.Option(
        None, help="Pseudo-label solver step. (default: 0.075)", rich_help_panel="Weak supervision"
    ),
    weak_start: int = typer.Option(
        None,
        help="Steps of CE on the labelled pixels before the weak term. (default: 0)",
        rich_help_panel="Weak supervision",
    ),
    labeled: str = typer.Option(
        None,
        "--labeled",
        "--labeled-list",
        help="Semi-supervised: the labelled share of the training split, a fraction (1/8) or a "
        "partition list file (lines starting with image names); the rest, and the store's image-only splits (softprep build "
        "--split train_extra, --unlabeled DIR), are unlabelled (teacher-student). "
        "(default: all labelled)",
        rich_help_panel="Semi-supervised",
    ),
    labeled_seed: int = typer.Option(
        None, help="Seed of the --labeled choice. (default: 0)", rich_help_panel="Semi-supervised"
    ),
    unlabeled_batch: int = typer.Option(
        None,
        help="Unlabelled crops per step and GPU. (default: --batch-size)",
        rich_help_panel="Semi-supervised",
    ),
    semi_threshold: float = typer.Option(
        None,
        help="Teacher confidence for hard pseudo-labels. (default: 0.95)",
        rich_help_panel="Semi-supervised",
    ),
    semi_esl: bool = typer.Option(
        None,
        "--semi-esl/--no-semi-esl",
        help="ESL dynamic soft labels below the threshold.",
        rich_help_panel="Semi-supervised",
    ),
    semi_esl_weight: float = typer.Option(
        None, help="Weight of the ESL term. (default: 0.2)", rich_help_panel="Semi-supervised"
    ),
    semi_ipix: str = typer.Option(
        None,
        help="IPixMatch inter-pixel loss: none, kl or corr. (default: none)",
        rich_help_panel="Semi-supervised",
    ),
    semi_ipix_weight: float = typer.Option(
        None,
        help="Weight of the inter-pixel loss. (default: 1)",
        rich_help_panel="Semi-supervised",
    ),
    semi_ipix_pixels: int = typer.Option(
        None, help="Pixels sampled for it. (default: 256)", rich_help_panel="Semi-supervised"
    ),
    semi_ema: float = typer.Option(
        None, help="Teacher EMA momentum. (default: 0.999)", rich_help_panel="Semi-supervised"
    ),
    semi_cutmix: bool = typer.Option(
        None,
        "--semi-cutmix/--no-semi-cutmix",
        help="CutMix in the strong view. (default: on)",
        rich_help_panel="Semi-supervised",
    ),
    semi_eval: str = typer.Option(
        None,
        help="Evaluate (and predict with) the teacher or the student. (default: teacher)",
        rich_help_panel="Semi-supervised",
    ),
    bf16: bool = typer.Option(
        None,
        "--bf16/--no-bf16",
        help="bf16 autocast (GPU).",
        rich_help_panel="Speed (GPU), several GPUs",
    ),
    channels_last: bool = typer.Option(
        None,
        "--channels-last/--no-channels-last",
        help="channels_last memory format (GPU).",
        rich_help_panel="Speed (GPU), several GPUs",
    ),
    compile_model: bool = typer.Option(
        None,
        "--compile/--no-compile",
        help="torch.compile the model (GPU; slow first step).",
        rich_help_panel="Speed (GPU), several GPUs",
    ),
    device: str = typer.Option(
        None, help="cuda, cpu or auto. (default: auto)", rich_help_panel="Speed (GPU), several GPUs"
    ),
    seed: int = typer.Option(
        None, help="Random seed. (default: 0)", rich_help_panel="Optimisation"
    ),
    log_every: int = typer.Option(
        None,
        help="Progress/metrics every N steps. (default: 10)",
        rich_help_panel="Evaluation, checkpoints, logs",
    ),
):
    """Train a segmentation model on a store's crops and evaluate at full resolution.

    Several GPUs: torchrun --nproc-per-node N -m softtrain fit ... (DDP; rank 0 writes).

    A folder that holds a run is never overwritten by accident: pass --resume or
    --overwrite. SIGTERM / Ctrl-C save last.pt and exit (143 / 130); --resume continues
    exactly where the run stopped.
    """
    flags = dict(
        store=store,
        out=out_dir,
        model=model,
        pretrained=pretrained,
        crop=crop,
        levels=levels or None,
        level_weights=level_weights or None,
        cat_max_ratio=cat_max_ratio,
        batch_size=batch_size,
        accum=accum,
        iters=iters,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        power=power,
        warmup_iters=warmup_iters,
        loss=loss,
        mc=mc,
        workers=workers,
        eval_every=eval_every,
        eval_level=eval_level,
        eval_split=eval_split,
        save_every=save_every,
        keep_checkpoints=keep_checkpoints,
        tensorboard=tensorboard,
        sync_bn=sync_bn,
        weak_loss=weak_loss,
        weak_potts=weak_potts,
        weak_xent=weak_xent,
        weak_eta=weak_eta,
        weak_lambda=weak_lambda,
        weak_sigma=weak_sigma,
        weak_neighbours=weak_neighbours,
        weak_steps=weak_steps,
        weak_step_lr=weak_step_lr,
        weak_start=weak_start,
        labeled=labeled,
        labeled_seed=labeled_seed,
        unlabeled_batch=unlabeled_batch,
        semi_threshold=semi_threshold,
        semi_esl=semi_esl,
        semi_esl_weight=semi_esl_weight,
        semi_ipix=semi_ipix,
        semi_ipix_weight=semi_ipix_weight,
        semi_ipix_pixels=semi_ipix_pixels,
        semi_ema=semi_ema,
        semi_cutmix=semi_cutmix,
        semi_eval=semi_eval,
        bf16=bf16,
        channels_last=channels_last,
        compile=compile_model,
        device=device,
        seed=seed,
        log_every=log_every,
    )
    with _user_errors():
        if resume and not config:
            config = Path(out_dir or FitConfig.__dataclass_fields__["out"].default) / "config.toml"
            if not config.exists():
                raise FileNotFoundError(f"{config}: no run to resume here (no config.toml)")
        if config:
            cfg = FitConfig.from_toml(config, **flags)
        else:
            if not store:
                raise ValueError("give --store STORE (or --config run/config.toml)")
            cfg = FitConfig(**{k: v for k, v in flags.items() if v is not None})
        import softtrain.fit as training

        with fit_reporter(cfg.iters) as (on_log, on_eval):
            try:
                result = training.fit(cfg, resume, overwrite, on_log=on_log, on_eval=on_eval)
            except training.Interrupted as e:
                console.print(tagged("interrupted", "yellow", e), highlight=False)
                raise typer.Exit(128 + e.signum) from None
    if result["rank"] != 0:
        return
    fmt = lambda v: "n/a" if v is None else f"{v:.4f}"  # noqa: E731
    out.print(
        f"[green]done[/green]: {result['step']} steps, last mIoU {fmt(result['last_miou'])}, "
        f"best {fmt(result['best_miou'])}; run in {cfg.out}"
    )


@app.command()
def compare(
    arm: list[str] = typer.Option(
        ...,
        help="STORE[:LOSS[:MC]], one per arm, e.g. bilinear.zarr, bilinear.zarr:ce-hard:exclude, "
        "nearest.zarr.",
    ),
    seeds: list[int] = typer.Option([0], help="Seeds; every arm is trained once per seed."),
    out_dir: Path = typer.Option(
        Path("runs/compare"), "--out", help="Runs go to OUT/<arm>/seed<N>; the table next to them."
    ),
    config: Path = typer.Option(None, help="A config.toml with the shared model and schedule."),
    model: str = typer.Option(None, help="Model name. (default: hrnetv2_w48)"),
    crop: str = typer.Option(None, help="Crop HEIGHTxWIDTH. (default: 256x512)"),
    levels: list[str] = typer.Option(None, help="Store levels to draw scales from."),
    batch_size: int = typer.Option(None, help="Crops per step and GPU. (default: 12)"),
    iters: int = typer.Option(None, help="Optimiser steps per run. (default: 1000)"),
    lr: float = typer.Option(None, help="Base learning rate. (default: 0.01)"),
    workers: int = typer.Option(None, help="Loader worker processes. (default: 2)"),
    eval_level: str = typer.Option(None, help="Level to evaluate at."),
    device: str = typer.Option(None, help="cuda, cpu or auto. (default: auto)"),
    bf16: bool = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast (GPU)."),
):
    """Train the same model and schedule on several stores / losses over seeds, then one
    side-by-side table: mean and spread of mIoU and per-class IoU, and each store's label
    fidelity (the paper's Tables I and III on your data). Finished runs are not retrained."""
    flags = dict(
        model=model, crop=crop, levels=levels or None, batch_size=batch_size, iters=iters,
        lr=lr, workers=workers, eval_level=eval_level, device=device, bf16=bf16,
    )  # fmt: skip
    with _user_errors():
        from softtrain.compare import Arm
        from softtrain.compare import compare as run_compare

        arms = [Arm.parse(a) for a in arm]
        first = dict(store=arms[0].store)
        if config:
            base = FitConfig.from_toml(config, **first, **flags)
        else:
            base = FitConfig(**first, **{k: v for k, v in flags.items() if v is not None})

        def on_run(name: str, seed: int, status: str) -> None:
            console.print(tagged(status, "cyan", f"{name} seed {seed}"), highlight=False)

        report = run_compare(base, arms, seeds, out_dir, on_run)
    fmt = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    rows = report.rows()
    summary = Table("arm", "seeds", "mIoU (%)", "label fidelity (%)", title=f"at {report.level}")
    for r in rows:
        spread = f"{fmt(r['mIoU_mean'])} ± {fmt(r['mIoU_std'])}"
        summary.add_row(r["arm"], str(r["seeds"]), spread, fmt(r["fidelity_mIoU"]))
    out.print(summary)
    per_class = Table("class", *report.arms, title="IoU (%), mean over seeds")
    for c in report.classes:
        per_class.add_row(c, *(fmt(r[f"IoU {c}"]) for r in rows))
    out.print(per_class)
    report.write_csv(out_dir / "compare.csv")
    report.write_json(out_dir / "compare.json")
    report.plot(out_dir / "compare.png")
    out.print(f"wrote {out_dir / 'compare.csv'}, compare.json, compare.png")


@app.command()
def models():
    """List the model names 'fit --model' accepts."""
    from softtrain.models import MODELS

    table = Table("model", "trunk (timm)", "head")
    for name, (cls, trunk) in MODELS.items():
        table.add_row(name, trunk, cls.__name__)
    out.print(table)


ModeOpt = typer.Option("whole", help="Inference: whole (image in one piece) or slide (windows).")
WindowOpt = typer.Option("", help="Slide window HxW at the level. (default: the training crop)")
StrideOpt = typer.Option("", help="Slide stride HxW. (default: 2/3 of the window)")
FlipOpt = typer.Option(False, "--flip", help="Test-time augmentation: add the flipped image.")
TtaOpt = typer.Option(None, help="Test-time augmentation: more stored levels, e.g. 1/4 1/2.")


def _inference(mode, window, stride, flip, tta_levels, bf16):
    from softtrain.evaluate import InferenceOptions

    return InferenceOptions(mode, window, stride, flip, tuple(tta_levels or ()), bf16)


@app.command("eval")
def evaluate(
    store: str = typer.Option(..., help="Store with an evaluation split."),
    checkpoint: str = typer.Option(..., help="A checkpoint (best.pt or last.pt)."),
    level: str = typer.Option(None, help="Level to evaluate at. (default: the checkpoint's)"),
    split: str = typer.Option("val", help="Evaluation split (one with full-resolution labels)."),
    mode: str = ModeOpt,
    window: str = WindowOpt,
    stride: str = StrideOpt,
    flip: bool = FlipOpt,
    tta_levels: list[str] = TtaOpt,
    device: str = typer.Option("auto", help="cuda, cpu or auto."),
    bf16: bool = typer.Option(False, help="bf16 autocast."),
    csv_path: Path = typer.Option(None, "--csv", help="Write per-class IoU and Acc as CSV."),
    json_path: Path = typer.Option(None, "--json", help="Write the metrics record as JSON."),
):
    """aAcc, mIoU, mAcc and per-class IoU / Acc of a checkpoint at full resolution."""
    with _user_errors():
        from softprep.store import SoftStore
        from softtrain.evaluate import eval_checkpoint
        from softtrain.metrics import eval_record

        opts = _inference(mode, window, stride, flip, tta_levels, bf16)
        names = [c["name"] for c in SoftStore(store).classes]
        with progress_bar("evaluating") as progress:
            confusion, context = eval_checkpoint(
                checkpoint, store, level, split, device, opts, progress
            )
        record = eval_record(confusion, names, **context)
    print_eval(record, f"{checkpoint} on {store} ({split}, {record['level']}, {mode})")
    write_eval(record, csv_path, json_path)


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="Image files and/or folders (searched below)."),
    checkpoint: str = typer.Option(..., help="A checkpoint."),
    out_dir: Path = typer.Option(Path("predictions"), "--out", help="Folder for the label PNGs."),
    fmt: str = typer.Option(
        "trainIds",
        "--format",
        help="trainIds (8-bit train ids), labelIds (the dataset's raw values, e.g. for the "
        "Cityscapes evaluator) or palette (class colours).",
    ),
    overlays: Path = typer.Option(
        None, help="Also write colour overlays (JPEG) to this folder, outside --out."
    ),
    mode: str = ModeOpt,
    window: str = WindowOpt,
    stride: str = StrideOpt,
    flip: bool = FlipOpt,
    tta_levels: list[str] = TtaOpt,
    device: str = typer.Option("auto", help="cuda, cpu or auto."),
    bf16: bool = typer.Option(False, help="bf16 autocast."),
):
    """One label PNG per image (same name, .png), at the image's full resolution."""
    with _user_errors():
        from softtrain.predict import predict as run_predict

        opts = _inference(mode, window, stride, flip, tta_levels, bf16)
        with progress_bar("predicting") as progress:
            written = run_predict(
                checkpoint, images, out_dir, fmt, overlays, device, opts, progress
            )
    out.print(f"wrote {len(written)} label PNGs ({fmt}) to {out_dir}")


@app.command("bench-loader")
def bench_loader(
    store: str = typer.Option(..., help="Store to read."),
    crop: str = typer.Option("256x512", help="Crop HEIGHTxWIDTH."),
    workers: int = typer.Option(2, help="Loader worker processes."),
    batch_size: int = typer.Option(8, help="Crops per batch."),
    batches: int = typer.Option(30, help="Batches to time."),
):
    """Crops/s and MB/s of the training loader on a store."""
    with _user_errors():
        from softtrain.bench import bench_loader as run_bench_loader

        r = run_bench_loader(store, crop, workers, batch_size, batches)
    out.print(
        f"{r['crops_per_s']:.1f} crops/s ({r['crops_per_s_per_worker']:.1f} per worker), "
        f"{r['mb_per_s']:.1f} MB/s at {crop} with {workers} workers"
    )


def main() -> None:
    run_app(app, sys.argv[1:], MULTI_VALUE, "softtrain")
