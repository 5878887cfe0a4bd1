"""The ``softtrain`` command line: parses arguments, calls the library, reports."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

import softtrain.fit as training
from softprep.cli import expand_multi_value, user_errors
from softprep.store import SoftStore, StoreError
from softtrain.bench import bench_loader as run_bench_loader
from softtrain.fit import FitConfig, StepLog, TrainingError
from softtrain.metrics import Confusion
from softtrain.models import MODELS

app = typer.Typer(
    help="Single-GPU segmentation training on softprep soft-label stores.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()
USER_ERRORS = (StoreError, TrainingError, ValueError, FileNotFoundError)
MULTI_VALUE = ("--levels", "--level-weights")


def iou_rows(confusion: Confusion, names: list[str]) -> list[dict]:
    """Per class: name and IoU (None where the class is absent from truth and prediction)."""
    return [
        {"class": n, "iou": None if np.isnan(v) else float(v)}
        for n, v in zip(names, confusion.iou())
    ]


def print_iou(confusion: Confusion, names: list[str], title: str) -> None:
    table = Table(
        "class",
        "IoU",
        title=f"{title}: mIoU {confusion.miou():.4f}, pixel acc {confusion.pixel_accuracy():.4f}",
    )
    for row in iou_rows(confusion, names):
        table.add_row(row["class"], "-" if row["iou"] is None else f"{row['iou']:.4f}")
    out.print(table)


def write_iou(
    confusion: Confusion, names: list[str], csv_path: Path | None, json_path: Path | None
):
    rows = iou_rows(confusion, names)
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["class", "iou"])
            writer.writeheader()
            writer.writerows(rows)
    if json_path:
        summary = {"miou": confusion.miou(), "pixel_accuracy": confusion.pixel_accuracy()}
        json_path.write_text(json.dumps(summary | {"classes": rows}, indent=1))


@app.command()
def fit(
    store: str = typer.Option(None, help="Store built by 'softprep build'."),
    config: Path = typer.Option(
        None, help="A config.toml (as written next to every run); flags given here override it."
    ),
    out_dir: str = typer.Option(
        None,
        "--out",
        help="Run directory: config.toml, last.pt, best.pt, metrics.jsonl. (default: runs/run)",
    ),
    model: str = typer.Option(None, help=f"One of {', '.join(MODELS)}. (default: hrnetv2_w48)"),
    pretrained: str = typer.Option(None, help="Local file with trunk weights (never downloaded)."),
    crop: str = typer.Option(None, help="Crop HEIGHTxWIDTH. (default: 256x512)"),
    levels: list[str] = typer.Option(None, help="Store levels to draw scales from. (default: all)"),
    level_weights: list[float] = typer.Option(
        None, help="Sampling weight per level. (default: uniform)"
    ),
    cat_max_ratio: float = typer.Option(
        None, help="Class-balanced crops (mmseg cat_max_ratio, e.g. 0.75). (default: 1.0 = off)"
    ),
    batch_size: int = typer.Option(None, help="Crops per step. (default: 12)"),
    accum: int = typer.Option(None, help="Gradient accumulation steps. (default: 1)"),
    iters: int = typer.Option(None, help="Optimiser steps. (default: 1000)"),
    lr: float = typer.Option(None, help="Base learning rate. (default: 0.01)"),
    momentum: float = typer.Option(None, help="SGD momentum. (default: 0.9)"),
    weight_decay: float = typer.Option(None, help="Weight decay. (default: 1e-4)"),
    warmup_iters: int = typer.Option(None, help="Linear warm-up steps. (default: 0)"),
    loss: str = typer.Option(
        None, help="soft (KL / soft CE) or ce-hard (CE on the argmax). (default: soft)"
    ),
    mc: str = typer.Option(
        None, help="Multi-class pixels in the loss: include or exclude. (default: include)"
    ),
    workers: int = typer.Option(None, help="Loader worker processes. (default: 2)"),
    eval_every: int = typer.Option(
        None, help="Evaluate every N steps (0: only at the end). (default: 0)"
    ),
    eval_level: str = typer.Option(
        None, help="Level to evaluate at. (default: the largest training level)"
    ),
    bf16: bool = typer.Option(None, "--bf16/--no-bf16", help="bf16 autocast (GPU)."),
    channels_last: bool = typer.Option(
        None, "--channels-last/--no-channels-last", help="channels_last memory format (GPU)."
    ),
    compile_model: bool = typer.Option(
        None, "--compile/--no-compile", help="torch.compile the model (GPU; slow first step)."
    ),
    device: str = typer.Option(None, help="cuda, cpu or auto. (default: auto)"),
    seed: int = typer.Option(None, help="Random seed. (default: 0)"),
    log_every: int = typer.Option(None, help="Progress/metrics every N steps. (default: 10)"),
    resume: bool = typer.Option(False, help="Continue the run in --out from its last.pt."),
):
    """Train a segmentation model on a store's crops and evaluate at full resolution."""
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
        warmup_iters=warmup_iters,
        loss=loss,
        mc=mc,
        workers=workers,
        eval_every=eval_every,
        eval_level=eval_level,
        bf16=bf16,
        channels_last=channels_last,
        compile=compile_model,
        device=device,
        seed=seed,
        log_every=log_every,
    )
    with user_errors(USER_ERRORS):
        if config:
            cfg = FitConfig.from_toml(config, **flags)
        else:
            if not store:
                raise ValueError("give --store STORE (or --config run/config.toml)")
            cfg = FitConfig(**{k: v for k, v in flags.items() if v is not None})
        metrics = Path(cfg.out) / "metrics.jsonl"
        if not resume:
            metrics.unlink(missing_ok=True)  # a new run starts a new log; --resume appends
        with Progress(
            TextColumn("[bold]training"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeRemainingColumn(),
            console=console,
        ) as bar:
            task = bar.add_task("fit", total=cfg.iters, info="")

            def on_log(log: StepLog) -> None:
                bar.update(
                    task,
                    completed=log.step,
                    info=(
                        f"loss {log.loss:.4f} KL {log.kl:.4f} lr {log.lr:.2e} "
                        f"{log.crops_per_s:.1f} crops/s, data wait {log.data_wait_share:.0%}"
                        + (f", {log.peak_memory_gib:.1f} GiB" if log.peak_memory_gib else "")
                    ),
                )
                with open(metrics, "a") as f:
                    f.write(json.dumps(log.__dict__) + "\n")

            names = [c["name"] for c in SoftStore(cfg.store).classes]

            def on_eval(step: int, confusion: Confusion) -> None:
                bar.console.print(f"step {step}: mIoU {confusion.miou():.4f}")
                entry = {"step": step, "miou": confusion.miou(), "iou": iou_rows(confusion, names)}
                with open(metrics, "a") as f:
                    f.write(json.dumps(entry) + "\n")

            result = training.fit(cfg, resume=resume, on_log=on_log, on_eval=on_eval)
    out.print(
        f"[green]done[/green]: {result['step']} steps, last mIoU {result['last_miou']:.4f}, best {result['best_miou']:.4f}; run in {cfg.out}"
    )


@app.command("eval")
def evaluate(
    store: str = typer.Option(..., help="Store with an evaluation split."),
    checkpoint: str = typer.Option(..., help="A checkpoint (best.pt or last.pt)."),
    level: str = typer.Option(None, help="Level to evaluate at. (default: the checkpoint's)"),
    split: str = typer.Option("val", help="Evaluation split."),
    device: str = typer.Option("auto", help="cuda, cpu or auto."),
    bf16: bool = typer.Option(False, help="bf16 autocast."),
    csv_path: Path = typer.Option(None, "--csv", help="Write per-class IoU as CSV."),
    json_path: Path = typer.Option(None, "--json", help="Write mIoU and per-class IoU as JSON."),
):
    """Full-resolution mIoU and per-class IoU of a checkpoint."""
    with user_errors(USER_ERRORS):
        confusion = training.eval_checkpoint(checkpoint, store, level, split, device, bf16)
        names = [c["name"] for c in SoftStore(store).classes]
    print_iou(confusion, names, f"{checkpoint} on {store} ({split})")
    write_iou(confusion, names, csv_path, json_path)


@app.command()
def predict(
    images: list[Path] = typer.Argument(..., help="Image files."),
    checkpoint: str = typer.Option(..., help="A checkpoint."),
    out_dir: Path = typer.Option(Path("predictions"), "--out", help="Output folder."),
    device: str = typer.Option("auto", help="cuda, cpu or auto."),
):
    """Write label PNGs (class-colour palette) and colour overlays for images."""
    with user_errors(USER_ERRORS):
        written = training.predict(checkpoint, images, out_dir, device)
    out.print(f"wrote {len(written)} files to {out_dir}")


@app.command("bench-loader")
def bench_loader(
    store: str = typer.Option(..., help="Store to read."),
    crop: str = typer.Option("256x512", help="Crop HEIGHTxWIDTH."),
    workers: int = typer.Option(2, help="Loader worker processes."),
    batch_size: int = typer.Option(8, help="Crops per batch."),
    batches: int = typer.Option(30, help="Batches to time."),
):
    """Crops/s and MB/s of the training loader on a store."""
    with user_errors(USER_ERRORS):
        r = run_bench_loader(store, crop, workers, batch_size, batches)
    out.print(
        f"{r['crops_per_s']:.1f} crops/s ({r['crops_per_s_per_worker']:.1f} per worker), {r['mb_per_s']:.1f} MB/s at {crop} with {workers} workers"
    )


def main() -> None:
    app(args=expand_multi_value(sys.argv[1:], MULTI_VALUE), prog_name="softtrain")
