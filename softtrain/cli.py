"""The ``softtrain`` command line: parses arguments, calls the library, reports.

torch, timm and the training modules are imported inside the commands, so ``--help``
answers at once.
"""

from __future__ import annotations

import csv
import functools
import json
import sys
import time
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from softprep.terminal import (
    make_console,
    note_if_scored_where_fitted,
    output_files,
    progress_bar,
    reflow_help,
    run_app,
    show_notes,
    tagged,
    user_errors,
    version_option,
)
from softtrain.config import FitConfig

app = typer.Typer(
    help="Segmentation training on softprep soft-label stores: fit, compare, eval, predict, "
    "export, models, bench-loader.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = make_console(stderr=True)
out = make_console()
MULTI_VALUE = ("--levels", "--level-weights", "--tta-levels", "--arm", "--seeds")


def _user_errors():
    """Bad input as one line and exit 2. Store and checkpoint errors are ValueErrors; nothing
    here imports torch, so argument errors answer at once."""
    from softtrain.errors import TrainingError

    return user_errors((TrainingError, ValueError, FileNotFoundError))


@app.callback()
def _setup(version: bool = version_option("softtrain")) -> None:
    show_notes("softtrain")


def _say(lines: list[str]) -> None:
    """The run's start-up banner on stderr; ``note:`` lines in the notes' colour."""
    for line in lines:
        if line.startswith("note: "):
            console.print(tagged("note", "yellow", line[6:]), highlight=False)
        else:
            console.print(line, highlight=False)


def _step_text(log) -> str:
    return (
        f"step {log.step}/{log.iters} loss {log.loss:.4f} KL {log.kl:.4f} lr {log.lr:.2e} "
        f"{log.crops_per_s:.1f} crops/s data wait {log.data_wait_share:.0%}"
        + (f" mem {log.peak_memory_gib:.1f} GiB" if log.peak_memory_gib else "")
    )


def _percent(value: float | None) -> str:
    """A fraction as the screen shows it (files keep fractions): 0.4095 -> "40.95%"."""
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _eval_text(record: dict) -> str:
    return (
        f"step {record['step']} eval {record['split']} at {record['level']}: "
        f"mIoU {_percent(record['mIoU'])} mAcc {_percent(record['mAcc'])} "
        f"aAcc {_percent(record['aAcc'])}"
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
    """``title`` (paths whole, on one line), the per-class table, then the headline (in %)
    as the last line, where a log's tail shows it."""
    fmt = lambda v: "-" if v is None else f"{100 * v:.2f}"  # noqa: E731
    table = Table("class", "IoU", "Acc")
    for row in record["classes"]:
        table.add_row(row["class"], fmt(row["iou"]), fmt(row["acc"]))
    out.print(title, soft_wrap=True, highlight=False, markup=False)
    out.print(table)
    out.print(
        f"mIoU {fmt(record['mIoU'])}  aAcc {fmt(record['aAcc'])}  mAcc {fmt(record['mAcc'])}",
        highlight=False,
    )


def miou_cell(row: dict) -> str:
    """A compare row's mIoU in %: ``47.1 ± 0.8`` over several seeds, ``47.1`` for one (no
    spread to show)."""
    mean = f"{100 * row['mIoU_mean']:.1f}"
    return f"{mean} ± {100 * row['mIoU_std']:.1f}" if row["seeds"] > 1 else mean


def write_eval(record: dict, csv_path: Path | None, json_path: Path | None) -> None:
    """The record as JSON (NaN-free) and its per-class rows as CSV (class_id, class, iou,
    acc; class_id is the train id, as in the priors and fidelity CSVs)."""
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["class_id", "class", "iou", "acc"])
            writer.writeheader()
            writer.writerows({"class_id": c} | row for c, row in enumerate(record["classes"]))
    if json_path:
        json_path.write_text(json.dumps(record, indent=1, allow_nan=False))


def _shown(d) -> str:
    """A declared option's default (and choices) as ``--help`` says it, in brackets."""
    if d.required:
        return f"required, {d.required}"
    if d.shown:
        default = d.shown
    elif d.type is bool:
        default = "on" if d.default else "off"
    else:
        default = "none" if d.default is None else str(d.default)
    choices = f"; choices: {', '.join(map(str, d.choices))}" if d.choices else ""
    return f"default: {default}{choices}"


def config_options(keys=None):
    """Decorate a command whose ``**options`` are config options: its signature (and so
    its ``--help``) gains one Typer option per declared option (``softtrain.config``), or
    per flat key in ``keys``; given values arrive in ``options``, the others as None."""
    import inspect

    from softtrain.config import declared

    params, aliases = [], {}  # alias parameter -> the option's key
    for d in declared().values():
        if keys is not None and d.key not in keys:
            continue
        names = [f"{d.flag}/--no-{d.flag[2:]}"] if d.type is bool else [d.flag]
        also = f" (also {', '.join(d.aliases)})" if d.aliases else ""
        opt = typer.Option(
            None, *names, help=f"{d.help}{also} \\[{_shown(d)}]",
            rich_help_panel=d.panel, show_default=False,
        )  # fmt: skip
        params.append(
            inspect.Parameter(d.key, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=d.type)
        )
        for alias in d.aliases:  # hidden: one flag per row keeps --help whole at 80 columns
            name = "alias_" + alias.lstrip("-").replace("-", "_")
            aliases[name] = d.key
            hidden = typer.Option(None, alias, hidden=True)
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                            default=hidden, annotation=d.type))  # fmt: skip

    def decorate(fn):
        sig = inspect.signature(fn)
        fixed = [p for p in sig.parameters.values() if p.kind != p.VAR_KEYWORD]

        @functools.wraps(fn)
        def command(*args, **options):
            for name, key in aliases.items():
                value = options.pop(name, None)
                if value is not None and options.get(key) is None:
                    options[key] = value
            return fn(*args, **options)

        command.__signature__ = sig.replace(parameters=[*fixed, *params])
        return command

    return decorate


def _given(options: dict) -> dict:
    """The options given on the command line (lists given empty count as not given)."""
    return {k: v for k, v in options.items() if v is not None and v != []}


@app.command()
@config_options()
def fit(
    config: Path = typer.Option(
        None, help="A config.toml (as written next to every run); flags given here override it."
    ),
    resume: bool = typer.Option(
        False,
        help="Continue the run in --out from its last.pt (its config.toml is the base; only "
        "--iters, --lr, --workers, --device, logging, saving and evaluation options may change).",
    ),
    overwrite: bool = typer.Option(False, help="Delete the run in --out and start again."),
    **options,
):
    """Train a segmentation model on a store's crops and evaluate at full resolution.

    Several GPUs: torchrun --nproc-per-node N -m softtrain fit ... (DDP; rank 0 writes).

    A folder that holds a run is never overwritten by accident: pass --resume or
    --overwrite. SIGTERM / Ctrl-C save last.pt and exit (143 / 130); --resume continues
    exactly where the run stopped.
    """
    flags = _given(options)
    with _user_errors():
        if resume and not config:
            from softtrain.config import RunOptions

            config = Path(flags.get("out", RunOptions().out)) / "config.toml"
            if not config.exists():
                raise FileNotFoundError(f"{config}: no run to resume here (no config.toml)")
        cfg = FitConfig.from_toml(config, **flags) if config else FitConfig.of(**flags)
        import softtrain.fit as training

        with fit_reporter(cfg.optim.iters) as (on_log, on_eval):
            try:
                result = training.fit(
                    cfg, resume, overwrite, on_log=on_log, on_eval=on_eval, on_start=_say
                )
            except training.Interrupted as e:
                console.print(tagged("interrupted", "yellow", e), highlight=False)
                raise typer.Exit(128 + e.signum) from None
    if result["rank"] != 0:
        return
    out.print(
        f"[green]done[/green]: {result['step']} steps, last mIoU {_percent(result['last_miou'])}"
        f", best {_percent(result['best_miou'])}; run in {escape(str(cfg.run.out))}"
    )


COMPARED = ("model", "crop", "levels", "batch_size", "iters", "lr", "workers", "eval_level",
            "device", "bf16")  # fmt: skip


@app.command()
@config_options(COMPARED)
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
    **options,
):
    """Train the same model and schedule on several stores / losses over seeds, then one
    side-by-side table: mean and spread of mIoU and per-class IoU, and each store's label
    fidelity (the paper's Tables I and III on your data). Finished runs are not retrained."""
    flags = _given(options)
    with _user_errors():
        from softtrain.compare import Arm
        from softtrain.compare import compare as run_compare

        arms = [Arm.parse(a) for a in arm]
        first = dict(store=arms[0].store)
        if config:
            base = FitConfig.from_toml(config, **first, **flags)
        else:
            base = FitConfig.of(**first, **flags)

        def on_run(name: str, seed: int, status: str) -> None:
            console.print(tagged(status, "cyan", f"{name} seed {seed}"), highlight=False)

        report = run_compare(base, arms, seeds, out_dir, on_run)
    fmt = lambda v: "-" if v is None else f"{100 * v:.1f}"  # noqa: E731
    rows = report.rows()
    summary = Table("arm", "seeds", "mIoU (%)", "label fidelity (%)", title=f"at {report.level}")
    for r in rows:
        summary.add_row(r["arm"], str(r["seeds"]), miou_cell(r), fmt(r["fidelity_mIoU"]))
    out.print(summary)
    per_class = Table("class", *report.arms, title="IoU (%), mean over seeds")
    for c in report.classes:
        per_class.add_row(c, *(fmt(r[f"IoU {c}"]) for r in rows))
    out.print(per_class)
    report.write_csv(out_dir / "compare.csv")
    report.write_json(out_dir / "compare.json")
    report.plot(out_dir / "compare.png")
    out.print(f"wrote {out_dir / 'compare.csv'}, compare.json, compare.png", markup=False)


@app.command()
def models():
    """List the model names 'fit --model' accepts."""
    from softtrain.config import MODELS

    table = Table("model", "trunk (timm)", "head")
    for name, (head, trunk) in MODELS.items():
        table.add_row(name, trunk, head)
    out.print(table)


ModeOpt = typer.Option("whole", help="Inference: whole (image in one piece) or slide (windows).")
WindowOpt = typer.Option("", help="Slide window HxW at the level. (default: the training crop)")
StrideOpt = typer.Option("", help="Slide stride HxW. (default: 2/3 of the window)")
FlipOpt = typer.Option(False, "--flip", help="Test-time augmentation: add the flipped image.")
TtaOpt = typer.Option(None, help="Test-time augmentation: more stored levels, e.g. 1/4 1/2.")
DeviceOpt = typer.Option("auto", help="cuda, cpu or auto.")
Bf16Opt = typer.Option(False, "--bf16", help="bf16 autocast.")


DecodeFileOpt = typer.Option(
    None,
    "--decode",
    help="A decode fitted by 'softtrain eval --decode prior|bias --save-decode FILE' (JSON): "
    "per-class offsets that keep thin classes. [default: argmax]",
)


def _inference(mode, window, stride, flip, tta_levels, bf16, decode_file=None):
    from softtrain.evaluate import InferenceOptions

    decode = None
    if decode_file is not None:
        from softprep.decode import Decode

        try:
            decode = Decode.from_dict(json.loads(Path(decode_file).read_text()))
        except FileNotFoundError:
            raise FileNotFoundError(
                f"--decode {decode_file}: neither argmax, prior nor bias, and no such decode file"
            ) from None
        except (ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"{decode_file}: not a decode written by --save-decode ({e})"
            ) from None
    return InferenceOptions(mode, window, stride, flip, tuple(tta_levels or ()), bf16, decode)


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
    device: str = DeviceOpt,
    bf16: bool = Bf16Opt,
    csv_path: Path = typer.Option(None, "--csv", help="Write per-class IoU and Acc as CSV."),
    json_path: Path = typer.Option(None, "--json", help="Write the metrics record as JSON."),
    decode: str = typer.Option(
        "argmax",
        help="How probabilities become labels: argmax; prior (class-prior logit adjustment, "
        "strength chosen on --fit-split) or bias (per-class offsets fitted for --fit-split's "
        "mIoU), both keep thin classes; or a decode file (--save-decode).",
    ),
    fit_split: str = typer.Option("val", help="Split the prior/bias decode is fitted on."),
    save_decode: Path = typer.Option(
        None, help="Write the fitted decode (JSON) for 'eval/predict --decode FILE'."
    ),
):
    """aAcc, mIoU, mAcc and per-class IoU / Acc of a checkpoint at full resolution."""
    with _user_errors():
        from softprep.decode import KINDS
        from softprep.store import SoftStore

        names = [c["name"] for c in SoftStore(store).classes]  # a bad store: before torch
        from softtrain.evaluate import eval_checkpoint
        from softtrain.metrics import eval_record

        outputs = {"--csv": csv_path, "--json": json_path, "--save-decode": save_decode}
        output_files(outputs, (checkpoint, store))
        kind = decode if decode in KINDS else None
        opts = _inference(mode, window, stride, flip, tta_levels, bf16, None if kind else decode)
        if kind == "argmax":
            kind = None
        if kind:
            note_if_scored_where_fitted(fit_split, split)
        with progress_bar("evaluating") as progress:
            confusion, context = eval_checkpoint(
                checkpoint, store, level, split, device, opts, progress, kind, fit_split
            )
        record = eval_record(confusion, names, **context)
    how = [split, record["level"], mode] + ["flip"] * flip
    how += [f"TTA levels {' '.join(tta_levels)}"] if tta_levels else []
    print_eval(record, f"{checkpoint} on {store} ({', '.join(how)})")
    write_eval(record, csv_path, json_path)
    for path in (csv_path, json_path):
        if path:
            out.print(f"wrote {path}", markup=False)
    if save_decode and record["decode"]:
        save_decode.write_text(json.dumps(record["decode"], indent=1))
        out.print(f"wrote the {record['decode']['kind']} decode to {save_decode}", markup=False)


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
    device: str = DeviceOpt,
    bf16: bool = Bf16Opt,
    decode: Path = DecodeFileOpt,
):
    """One label PNG per image (same name, .png), at the image's full resolution."""
    with _user_errors():
        from softtrain.predict import predict as run_predict

        opts = _inference(mode, window, stride, flip, tta_levels, bf16, decode)
        with progress_bar("predicting") as progress:
            written = run_predict(
                checkpoint, images, out_dir, fmt, overlays, device, opts, progress
            )
    pngs = "label PNG" if len(written) == 1 else "label PNGs"
    out.print(f"wrote {len(written)} {pngs} ({fmt}) to {out_dir}", highlight=False, markup=False)


@app.command()
def export(
    checkpoint: str = typer.Option(..., help="A checkpoint (best.pt)."),
    out_path: Path = typer.Option(..., "--out", help="File to write (model.pt, model.onnx)."),
    fmt: str = typer.Option("torchscript", "--format", help="torchscript or onnx."),
    size: str = typer.Option(
        "1024x2048",
        help="HEIGHTxWIDTH of the example image it is traced with; the model takes any size.",
    ),
    decode: Path = DecodeFileOpt,
):
    """A self-contained model: uint8 RGB (B, 3, H, W) in, of any batch and size, uint8
    train ids (B, H, W) out, with the resize to the checkpoint's level, normalisation,
    upsampling and decode inside (the resize is torch's antialiased bilinear: labels agree
    with 'predict' but for a few pixels at class borders)."""
    with _user_errors():
        from softtrain.config import parse_crop
        from softtrain.segmenter import Segmenter, check_export_target
        from softtrain.segmenter import export as run_export

        check_export_target(out_path, fmt)
        output_files({"--out": out_path}, (checkpoint, decode))
        opts = _inference("whole", "", "", False, [], False, decode)
        hw = parse_crop(size)
        run_export(Segmenter.from_checkpoint(checkpoint, "cpu", opts), out_path, fmt, hw)
    out.print(
        f"wrote {out_path} ({fmt}, uint8 RGB images of any size; traced at {hw[0]}x{hw[1]})",
        markup=False,
    )


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
    if r["note"]:
        console.print(tagged("note", "yellow", r["note"]), highlight=False)
    where = f"{r['crops_per_s_per_worker']:.1f} per worker" if workers else "in this process"
    out.print(
        f"{r['crops_per_s']:.1f} crops/s ({where}), {r['mb_per_s']:.1f} MB/s at {crop} with "
        f"{workers} workers"
    )


reflow_help(app)


def main() -> None:
    try:
        run_app(app, sys.argv[1:], MULTI_VALUE, "softtrain")
    except BaseException as e:  # SystemExit ends every command, 0 included
        distributed = sys.modules.get("softtrain.distributed")  # commands that may join one
        if distributed is not None and distributed.joined():
            distributed.exit_rank(e)
        raise
