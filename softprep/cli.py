"""The ``softprep`` command line: parses arguments, calls the library, reports."""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import typer
from rich.markup import escape
from rich.table import Column, Table

from softprep import OWN_PROCESS
from softprep import manifest as manifests
from softprep.build import BuildError, BuildOptions, parse_jobs
from softprep.build import build as run_build
from softprep.datasets import DatasetError, detect_version
from softprep.datasets import scan as run_scan
from softprep.decode import KINDS as DECODES
from softprep.fidelity import from_dataset as fidelity_from_dataset
from softprep.fidelity import from_store as fidelity_from_store
from softprep.manifest import ManifestError, load_manifest
from softprep.priors import SHOWN_AS, PriorReport, from_dataset, from_store
from softprep.render import find_image, render
from softprep.resample import KERNELS
from softprep.sample import write_sample_folder
from softprep.store import SoftStore, StoreError, parse_scale
from softprep.terminal import (
    make_console,
    note_if_scored_where_fitted,
    output_files,
    progress_bar,
    reflow_help,
    run_app,
    show_notes,
    tagged,
    version_option,
)
from softprep.terminal import user_errors as _user_errors
from softprep.verify import verify as run_verify

app = typer.Typer(
    help="Soft-label pyramids for semantic segmentation: read a dataset once, write paired "
    "colour + soft-label levels to a Zarr store, report class-prior discrepancies.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
console = make_console(stderr=True)
out = make_console()

MULTI_VALUE = ("--scales", "--compare", "--stats-for", "--split", "--decode")
USER_ERRORS = (BuildError, DatasetError, ManifestError, StoreError, ValueError)


def user_errors():
    return _user_errors(USER_ERRORS)


@app.callback()
def _setup(version: bool = version_option("softprep")) -> None:
    show_notes("softprep")


def _manifest(dataset: str, root: Path, version: str | None, labels: str | None):
    """The manifest for ``root``: the version found in its folders unless ``--version``."""
    if version is None and not dataset.endswith(".json"):
        version = detect_version(dataset, root)
    return load_manifest(dataset, version, labels)


DatasetArg = typer.Argument(
    ...,
    help="cityscapes, mapillary, ade20k, camvid, or the path of your own manifest .json (the "
    "'folder' dataset; see manifests/folder-example.json).",
)
VersionOpt = typer.Option(
    None, "--version", help="Dataset version, e.g. v1.2 / v2.0 for mapillary."
)
LabelsOpt = typer.Option(
    None,
    "--labels",
    help="Label variant, e.g. trainIds to read the labelTrainIds files of Cityscapes.",
)
LEVELS, RUNNING = "Levels", "Store and processes"  # build --help's panels
DEFAULT_SCALES = ["1/8", "1/4", "1/2"]  # build's, and the reports' without a store
# how the reports (priors, fidelity) compute their levels from a dataset, without a store:
# None where not given (beside --store, any given is refused, the default included)
ReportScalesOpt = typer.Option(
    None, help=f"Without a store: levels to compute (default {' '.join(DEFAULT_SCALES)})."
)
ReportKernelOpt = typer.Option(
    None, help=f"Without a store: the soft-label kernel (default {BuildOptions.kernel})."
)
ReportAntialiasOpt = typer.Option(
    None,
    "--antialias/--no-antialias",
    help="Without a store: antialiased kernel (default "
    f"{'--antialias' if BuildOptions.antialias else '--no-antialias'}).",
)
ReportShortSideOpt = typer.Option(None, help="Without a store: reference short side.")


def _only_without_store(store: str | None, **given) -> None:
    """``--store`` reads the store's own levels and kernel: a dataset, ``--root`` or a
    report option given beside it is refused (they were ignored without a word:
    ``--scales 1/8`` still scored every level)."""
    if not store:
        return
    shown = {
        "dataset": "a dataset",
        "antialias": f"--{'' if given.get('antialias') else 'no-'}antialias",
    }
    set_ = [
        shown.get(name, f"--{name.replace('_', '-')}")
        for name, value in given.items()
        if value is not None
    ]
    if set_:
        raise ValueError(
            f"{', '.join(set_)}: for computing from a dataset; with --store, the store's own "
            f"levels and kernel are used ('softprep info {store}' lists them)"
        )


def _report_options(scales, kernel, antialias, short_side) -> BuildOptions:
    """The levels a report computes from a dataset: the report options, None where not
    given (the defaults: ``DEFAULT_SCALES``, ``BuildOptions``')."""
    return BuildOptions(
        scales=_scales(scales or DEFAULT_SCALES),
        kernel=kernel or BuildOptions.kernel,
        antialias=BuildOptions.antialias if antialias is None else antialias,
        short_side=short_side,
    )


def _scales(values: list[str]) -> tuple[float, ...]:
    """The parsed ``--scales``; a scale above 1 (up-sampling) is said once, as a note."""
    scales = tuple(parse_scale(v) for v in values)
    up = [v for v, s in zip(values, scales) if s > 1]
    if up:
        note = (
            f"--scales {' '.join(up)}: above 1, these levels up-sample every image (a scale "
            "of 2 stores 4x the pixels of the original); use fractions such as 1/2 to "
            "down-sample"
        )
        console.print(tagged("note", "yellow", note), highlight=False)
    return scales


@app.command()
def datasets():
    """List the built-in dataset manifests."""
    # the descriptions wrap at a readable width where the output is not a terminal, too
    table = Table("dataset", "version", "classes", Column("description", max_width=72))
    for m in manifests.available():
        table.add_row(
            m["dataset"],
            m.get("version", ""),
            str(len(m["classes"])),
            m.get("description", ""),
        )
    out.print(table)


@app.command()
def sample(
    dataset: str = DatasetArg,
    directory: Path = typer.Argument(..., help="Where to write the synthetic dataset."),
    version: str | None = VersionOpt,
    train: int = typer.Option(6, help="Training images."),
    val: int = typer.Option(2, help="Validation images."),
    test: int = typer.Option(0, help="Test images (datasets with a test split)."),
    size: str | None = typer.Option(
        None, help="HxW of every image, e.g. 1024x2048 (default: dataset-like, small)."
    ),
    seed: int = typer.Option(0, help="Random seed."),
):
    """Write a small synthetic dataset in the dataset's exact official layout and encoding.

    The folder must be new or empty, or hold an earlier sample, which is replaced whole.
    """
    with user_errors():
        m = load_manifest(dataset, version)
        if test and "test" not in m.splits:
            raise ValueError(f"--test {test}: {m.dataset} has no test split")
        hw = tuple(int(v) for v in size.lower().split("x")) if size else None
        counts = {"train": train, "val": val} | ({"test": test} if test else {})
        n = write_sample_folder(m, directory, counts, hw, seed)
    out.print(f"wrote {n} {m.dataset} {m.version} pairs under {directory}", markup=False)


@app.command()
def scan(
    dataset: str = DatasetArg,
    root: Path = typer.Option(..., help="Dataset root (the folder holding the official layout)."),
    version: str | None = VersionOpt,
    labels: str | None = LabelsOpt,
    split: list[str] = typer.Option(None, help="Splits to scan (default: all present)."),
    histogram: bool = typer.Option(True, help="Decode every label for a class histogram."),
    as_json: bool = typer.Option(
        False, "--json", help="Print JSON (splits, sizes, histogram, problems) instead of tables."
    ),
):
    """List splits and pairs with counts, sizes and a class histogram; report every problem.

    Exit code 1 if any problem was found.
    """
    with user_errors():
        m = _manifest(dataset, root, version, labels)
        with progress_bar("scanning") as bar:
            report = run_scan(m, root, split or None, histogram, progress=bar)
    if as_json:
        out.print_json(json.dumps(report.to_json(root)))
        if report.problems:
            raise typer.Exit(1)
        return
    out.print(f"{m.dataset} {m.version} at {root}", soft_wrap=True, highlight=False, markup=False)
    table = Table("split", "pairs", "sizes (HxW: images)")
    for s, n in report.counts.items():
        sizes = sorted(report.sizes[s].items(), key=lambda kv: -kv[1])
        shown = ", ".join(f"{h}x{w}: {c}" for (h, w), c in sizes[:4])
        table.add_row(s, str(n), shown + (f", ... ({len(sizes)} sizes)" if len(sizes) > 4 else ""))
    out.print(table)
    if histogram and report.class_pixels.sum():
        total = report.class_pixels.sum()
        hist = Table("id", "class", "pixels", "share", title="class histogram")
        for c, name in enumerate(m.class_names + ["(void)"]):
            n = int(report.class_pixels[c])
            hist.add_row(
                str(c) if c < m.num_classes else "255",
                name,
                f"{n:,}",
                f"{n / total:.4%}",
            )
        out.print(hist)
    for line in _grouped(report.problems, "--json lists them all"):
        console.print(tagged("problem", "red", line), highlight=False)
    if report.problems:
        console.print(f"[red]{len(report.problems)} problem(s)[/red]")
        raise typer.Exit(1)


def _grouped(problems: list, where_all: str, shown: int = 3) -> list[str]:
    """Problems as lines, at most ``shown`` files per message, then how many more have it
    and ``where_all`` (one label value missing from a manifest was one line per file)."""
    by_message: dict[str, list] = {}
    for p in problems:
        by_message.setdefault(p.message, []).append(p)
    lines = []
    for message, group in by_message.items():
        lines += [str(p) for p in group[:shown]]
        if len(group) > shown:
            lines.append(f"... and {len(group) - shown} more file(s): {message} ({where_all})")
    return lines


@app.command()
def build(
    dataset: str = DatasetArg,
    root: Path = typer.Option(..., help="Dataset root."),
    scales: list[str] = typer.Option(
        DEFAULT_SCALES,
        help="Levels as fractions of each image's size: 1/8 1/4 1/2 (above 1 up-samples).",
        rich_help_panel=LEVELS,
    ),
    kernel: str = typer.Option(
        BuildOptions.kernel,
        help=f"One of {', '.join(KERNELS)}; the colour image gets the same kernel.",
        rich_help_panel=LEVELS,
    ),
    colour_kernel: str = typer.Option(
        None,
        help="Resize the colour image with another kernel than the labels: --kernel nearest "
        "--colour-kernel bilinear is mmsegmentation's pipeline (the baseline users run).",
        rich_help_panel=LEVELS,
    ),
    antialias: bool = typer.Option(
        BuildOptions.antialias,
        help="--no-antialias: the paper's exact variant (fixed 2-tap bilinear / 4-tap bicubic).",
        rich_help_panel=LEVELS,
    ),
    k: int = typer.Option(6, "--k", help="Classes kept per pixel (top-K).", rich_help_panel=LEVELS),
    short_side: int | None = typer.Option(
        None,
        help="Scales are relative to this short side in px (varied-size datasets: ADE20K, Mapillary).",
        rich_help_panel=LEVELS,
    ),
    stats_for: list[str] = typer.Option(
        [],
        help="Extra strategies whose class priors are recorded for 'priors --compare': area, bilinear, bicubic (-noaa suffix for no antialias).",
        rich_help_panel=LEVELS,
    ),
    split: list[str] = typer.Option(
        None,
        help="Splits to build (default: every labelled split present). Image-only splits "
        "(cityscapes train_extra, mapillary test) are built only when named here.",
    ),
    unlabeled: Path | None = typer.Option(
        None,
        help="A folder of images without labels (jpg/png, searched recursively), stored as "
        "split 'unlabeled' for semi-supervised training (softtrain fit --labeled).",
    ),
    weak: str | None = typer.Option(
        None,
        help="Weak labels on training splits: blocks:S[:N] keeps a seeded share S of N px "
        "blocks (default 64); scribbles:S[:W] keeps strokes along the segments' skeletons, "
        "a share S of their length, W px wide (default 3); void elsewhere. E.g. blocks:0.1.",
    ),
    weak_seed: int = typer.Option(0, help="Seed of the --weak thinning."),
    out_url: str | None = typer.Option(
        None,
        "--out",
        help="Store path or fsspec URL (default: <dataset>.zarr).",
        rich_help_panel=RUNNING,
    ),
    jobs: str = typer.Option(
        "auto",
        help="Parallel jobs (one shard of images per task), or auto: the cores this process "
        "may use less the load already on them (1-minute load average), at least 1, so a "
        "busy machine gets no more processes than it has idle cores.",
        rich_help_panel=RUNNING,
    ),
    images_per_shard: int | None = typer.Option(
        None,
        help="Consecutive images stored in one shard (one file per array and level) and "
        "built by one task. Default: about 2 megapixels of images per shard, at most 16 "
        "(1 for Cityscapes, 5 for 683x512 images). Readers need not know it; 1 makes "
        "crop reads of small images ~10% faster, for more files.",
        rich_help_panel=RUNNING,
    ),
    on_error: str = typer.Option(
        "fail",
        help="fail: stop at a bad pair; skip: list it in the store and go on.",
        rich_help_panel=RUNNING,
    ),
    backend: str = typer.Option(
        "loky",
        help="loky (local processes: forked copies of this one where that is safe, else "
        "loky's workers) or dask (the cluster at --scheduler, else a local one).",
        rich_help_panel=RUNNING,
    ),
    scheduler: str | None = typer.Option(
        None,
        help="Dask scheduler address, e.g. tcp://host:8786.",
        rich_help_panel=RUNNING,
    ),
    repair: bool = typer.Option(
        False,
        "--repair",
        help="Check the existing store as 'softprep verify' does and rebuild the shards of "
        "every damaged image (give the options of the original build).",
        rich_help_panel=RUNNING,
    ),
    version: str | None = VersionOpt,
    labels: str | None = LabelsOpt,
):
    """Write the soft-label pyramid (and paired colour) of every split to one Zarr store.

    Interrupt at any time and run the same command again to resume; after 'softprep
    verify' reports damage, run it again with --repair.
    """
    with user_errors():
        if on_error not in ("fail", "skip"):
            raise ValueError(f"--on-error {on_error}: use fail or skip")
        m = _manifest(dataset, root, version, labels)
        options = BuildOptions(
            scales=_scales(scales),
            kernel=kernel,
            colour_kernel=colour_kernel,
            antialias=antialias,
            k=k,
            short_side=short_side,
            stats_for=tuple(stats_for),
            splits=tuple(split) if split else None,
            weak=weak,
            weak_seed=weak_seed,
            unlabeled=str(unlabeled) if unlabeled else None,
            images_per_shard=images_per_shard,
        )
        url = out_url or f"{m.dataset}.zarr"
        n_jobs = -1 if backend == "dask" and jobs == "auto" else parse_jobs(jobs)
        seen = {"done": 0, "total": None}  # the last progress: what an interrupt leaves saved
        try:
            with _backend(backend, scheduler), progress_bar("building") as bar:

                def progress(done: int, total: int) -> None:
                    seen.update(done=done, total=total)
                    bar(done, total, "building")

                summary = run_build(
                    m, root, url, options, jobs=n_jobs, on_error=on_error, progress=progress,
                    repair=repair, keep_workers=False, checking=lambda what, d, t: bar(d, t, what),
                )  # fmt: skip
        except (KeyboardInterrupt, SystemError) as e:
            if not _interrupted(e):
                raise
            after = (
                f"after {seen['done']} of {seen['total']} images"
                if seen["total"] is not None
                else "before the first image"
            )
            console.print(
                f"interrupted {after}; run the same command again to resume", highlight=False
            )
            raise typer.Exit(130) from None
    for note in summary.notes():
        console.print(tagged("note", "yellow", note), highlight=False)
    repaired = f"{summary.repaired} damaged image(s) found, " if repair else ""
    rate = f", {summary.images_per_second:.2f} img/s" if summary.built else ""
    out.print(
        tagged(
            summary.url,
            "green",
            f"{repaired}{summary.built} built, {summary.already_done} already done, "
            f"{len(summary.skipped)} skipped{rate} ({summary.seconds:.1f} s in all)",
        )
    )
    for line in _grouped(summary.skipped, f"'softprep info {summary.url}' lists them all"):
        console.print(tagged("skipped", "yellow", line), highlight=False)


@contextmanager
def _backend(backend: str, scheduler: str | None):
    """The joblib backend the build's tasks run on; ``dask`` connects a Client first."""
    if backend == "loky":
        yield
        return
    if backend != "dask":
        raise ValueError(f"unknown backend '{backend}'; use loky or dask")
    try:
        from dask.distributed import Client
    except ImportError as e:
        raise ValueError("the dask backend needs the extra: pip install 'softprep[dask]'") from e
    with Client(scheduler) if scheduler else Client() as client:
        console.print(
            f"dask scheduler {client.scheduler.address}, dashboard {client.dashboard_link}"
        )
        import joblib

        with joblib.parallel_config(backend="dask"):
            yield


@app.command()
def info(
    store: str = typer.Argument(..., help="Store path or URL."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of tables."),
):
    """What a store holds: dataset, options, images per split, levels, sizes, truncation."""
    with user_errors():
        d = SoftStore(store).describe()
    if as_json:
        out.print_json(json.dumps(d))
        return
    out.print(
        f"[bold]{escape(d['url'])}[/bold]: "
        + " ".join(filter(None, (d["dataset"], d["dataset_version"])))
        + f", {d['classes']} classes, "
        f"kernel {d['kernel']} ({'antialiased' if d['antialias'] else 'no antialias'})"
        + (f", colour {d['colour_kernel']}" if d["colour_kernel"] else "")
        + f", K={d['k']}, "
        f"{d['images_per_shard']} image(s) per shard"
    )
    out.print(
        "images: "
        + ", ".join(
            f"{s} {n}" + (" (no labels)" if s in d["image_only_splits"] else "")
            for s, n in d["images"].items()
        )
        + f"; done {d['done']}"
    )
    if d["weak"]:
        shares = ", ".join(f"{s} {v:.1%}" for s, v in d["labelled_share"].items())
        out.print(f"weak labels ({d['weak']}, training splits): labelled pixels {shares}")
    table = Table("level", "max HxW", "soft MB", "rgb MB", "truncated mass", "max truncated/pixel")
    mb = lambda b: "-" if b is None else f"{b / 1e6:.1f}"
    for lv in d["levels"]:
        table.add_row(
            lv["level"],
            "x".join(map(str, lv["max_hw"])),
            mb(lv["soft_bytes"]),
            mb(lv["rgb_bytes"]),
            f"{lv['truncated_mass_share']:.2e}",
            f"{lv['truncated_max_pixel']:.3f}",
        )
    out.print(table)
    out.print(f"total on disk: {mb(d['total_bytes'])} MB; statistics: {', '.join(d['strategies'])}")
    for s in d["skipped"]:
        console.print(tagged("skipped", "yellow", f"{s['path']}: {s['error']}"), highlight=False)


@app.command()
def verify(
    store: str = typer.Argument(..., help="Store path or URL."),
    jobs: str = typer.Option(
        "auto",
        help="Parallel jobs (one shard of images per task), or auto: the cores not already "
        "busy (see 'softprep build --help'); one with --quick.",
    ),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="Metadata, statistics sums, shard indexes and every chunk's checksum, without "
        "decoding: finds lost, cut or flipped bytes, not planes or statistics that are "
        "wrong but were written with valid checksums.",
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
):
    """Check every image is complete, every pixel sums to 255 and ids are valid (exit 1 if not)."""
    with user_errors():
        # --quick reads and checksums at disk speed: a second process saves nothing
        # (701 CamVid images: 0.65 s with one job, 0.70 s with two forked, measured)
        n_jobs = 1 if quick and jobs == "auto" else parse_jobs(jobs)
        with progress_bar("verifying") as bar:  # the path: workers start before it opens
            report = run_verify(store, progress=bar, jobs=n_jobs, quick=quick, keep_workers=False)
    if as_json:
        out.print_json(json.dumps(report.to_dict(store)))
        if not report.ok:
            raise typer.Exit(1)
        return
    for p in report.skipped:
        console.print(tagged("skipped", "yellow", p), highlight=False)
    for p in report.notes:
        console.print(tagged("note", "yellow", p), highlight=False)
    for p in report.problems[:100]:
        console.print(tagged("problem", "red", p), highlight=False)
    if not report.ok:
        console.print(f"[red]{len(report.problems)} problem(s)[/red] in {escape(store)}")
        console.print(  # one line: a command to copy whole
            tagged("next step", "bold", report.advice(store)), highlight=False, soft_wrap=True
        )
        raise typer.Exit(1)
    mode = "quick: checksums, no decoding" if quick else "full"
    out.print(
        f"[green]ok[/green]: {report.checked} images, {len(report.meta['scales'])} levels ({mode}, "
        f"{report.seconds:.1f} s)"
    )


@app.command()
def show(
    store: str = typer.Argument(..., help="Store path or URL."),
    index: int = typer.Option(0, help="Image index in the store."),
    name: str | None = typer.Option(
        None,
        help="Image name instead of --index: as 'softprep info' stores it "
        "(train/aachen/aachen_000000_000019) or its last part (aachen_000000_000019).",
    ),
    level: str = typer.Option("1/8", help="Level, e.g. 1/8."),
    output: Path = typer.Option(Path("show.png"), "--out", help="PNG to write."),
):
    """PNG of one image at one level: colour | soft label | argmax of the soft label |
    nearest-neighbour label (evaluation images, whose full label is stored), with the
    image's name and a colour key of its classes."""
    with user_errors():
        output_files({"--out": output}, (store,))
        s = SoftStore(store)
        if name is not None:
            index = find_image(s, name)
        if not 0 <= index < len(s):
            raise StoreError(f"{store}: index {index} out of range 0..{len(s) - 1}")
        render(s, index, level).save(output)
    out.print(f"wrote {output} ({s.names()[index]})", markup=False)


@app.command()
def priors(
    dataset: str | None = typer.Argument(
        None, help="Without a store: the dataset to compute from (needs --root)."
    ),
    store: str | None = typer.Option(
        None, help="Store built by 'softprep build' (reads its statistics)."
    ),
    root: Path | None = typer.Option(None, help="Dataset root, when computing without a store."),
    compare: list[str] = typer.Option(
        ["nn"],
        help="Strategies to compare with the soft labels: nn, nn-floor, and what the build recorded (--stats-for).",
    ),
    split: str = typer.Option("train", help="A split name, or 'all'."),
    scales: list[str] | None = ReportScalesOpt,
    kernel: str | None = ReportKernelOpt,
    antialias: bool | None = ReportAntialiasOpt,
    short_side: int | None = ReportShortSideOpt,
    csv_path: Path | None = typer.Option(None, "--csv", help="Write all rows as CSV."),
    json_path: Path | None = typer.Option(None, "--json", help="Write rows and summary as JSON."),
    plot: Path | None = typer.Option(
        None,
        help="Write a PNG: per-class |D| per strategy, log scale, a panel per level.",
    ),
    version: str | None = VersionOpt,
    labels: str | None = LabelsOpt,
):
    """Per-class prior discrepancy D = p_original - p_d (x1e4, paper Table V) per level."""
    with user_errors():
        _only_without_store(store, dataset=dataset, root=root, scales=scales, kernel=kernel,
                            antialias=antialias, short_side=short_side, version=version,
                            labels=labels)  # fmt: skip
        output_files({"--csv": csv_path, "--json": json_path, "--plot": plot}, (store,))
        if store:
            report = from_store(SoftStore(store), compare, split)
        elif dataset and root:
            m = _manifest(dataset, root, version, labels)
            options = _report_options(scales, kernel, antialias, short_side)
            with progress_bar("reading labels") as bar:
                report = from_dataset(m, root, options, compare, split, progress=bar)
        else:
            raise ValueError("give --store STORE, or a dataset and --root PATH")
    print_priors(report)
    if csv_path:
        report.write_csv(csv_path)
    if json_path:
        report.write_json(json_path)
    if plot:
        report.plot(plot)
    for p in (csv_path, json_path, plot):
        if p:
            out.print(f"wrote {p}", markup=False)


@app.command()
def fidelity(
    dataset: str | None = typer.Argument(
        None, help="Without a store: the dataset to compute from (needs --root)."
    ),
    store: str | None = typer.Option(None, help="Store built by 'softprep build'."),
    root: Path | None = typer.Option(None, help="Dataset root, when computing without a store."),
    compare: list[str] = typer.Option(
        ["nn", "nn-floor"], help="Nearest-neighbour labels to score beside the soft labels."
    ),
    split: str = typer.Option("val", help="An evaluation split (full-resolution labels)."),
    decode: list[str] = typer.Option(
        ["argmax"],
        help="How soft labels become labels: argmax, prior (logit adjustment), "
        "bias (per-class, for mIoU), or all; prior and bias are fitted on --fit-split.",
    ),
    fit_split: str = typer.Option("val", help="The split the decodes are fitted on."),
    scales: list[str] | None = ReportScalesOpt,
    kernel: str | None = ReportKernelOpt,
    antialias: bool | None = ReportAntialiasOpt,
    short_side: int | None = ReportShortSideOpt,
    csv_path: Path | None = typer.Option(None, "--csv", help="Write per-class IoU as CSV."),
    json_path: Path | None = typer.Option(None, "--json", help="Write mIoU and per-class IoU."),
    plot: Path | None = typer.Option(None, help="Write a PNG: per-class IoU per strategy."),
    version: str | None = VersionOpt,
    labels: str | None = LabelsOpt,
):
    """How much of the truth each level's labels keep: mIoU and per-class IoU at full
    resolution, as if a model reproduced its training labels perfectly.

    soft: probabilities up-sampled bilinearly, then argmax (what training exploits);
    soft-argmax: argmax, then nearest up-sampling; nn / nn-floor: nearest-neighbour labels;
    soft-prior / soft-bias: soft with a decode fitted per level on --fit-split.
    """
    kinds = list(DECODES) if "all" in decode else decode
    if set(kinds) & set(DECODES) - {"argmax"}:  # fitted decodes
        note_if_scored_where_fitted(fit_split, split)
    with user_errors():
        _only_without_store(store, dataset=dataset, root=root, scales=scales, kernel=kernel,
                            antialias=antialias, short_side=short_side, version=version,
                            labels=labels)  # fmt: skip
        output_files({"--csv": csv_path, "--json": json_path, "--plot": plot}, (store,))
        if store:
            with progress_bar("scoring labels") as bar:
                report = fidelity_from_store(
                    SoftStore(store), compare, split, bar, kinds, fit_split
                )
        elif dataset and root:
            m = _manifest(dataset, root, version, labels)
            options = _report_options(scales, kernel, antialias, short_side)
            with progress_bar("scoring labels") as bar:
                report = fidelity_from_dataset(
                    m, root, options, compare, split, bar, kinds, fit_split
                )
        else:
            raise ValueError("give --store STORE, or a dataset and --root PATH")
    for level in report.levels:
        table = Table(
            "class", *report.strategies, title=f"{level}: IoU (%) at full resolution ({split})"
        )
        for c, name in enumerate(report.classes):
            cells = [report.iou(level, s)[c] for s in report.strategies]
            table.add_row(name, *("-" if np.isnan(v) else f"{100 * v:.1f}" for v in cells))
        table.add_row("mIoU", *(f"{100 * report.miou(level, s):.1f}" for s in report.strategies))
        out.print(table)
        for s, d in report.decodes.get(level, {}).items():
            shown = (
                f"tau {d.tau}"
                if d.tau is not None
                else ", ".join(f"{n} {b:+.2f}" for n, b in zip(report.classes, d.bias) if b)
                or "all 0"
            )
            out.print(f"{level} {s} (fitted on {d.fitted_on}): {shown}")
    for path, write in (
        (csv_path, report.write_csv),
        (json_path, report.write_json),
        (plot, report.plot),
    ):
        if path:
            write(path)
            out.print(f"wrote {path}", markup=False)


def print_priors(report: PriorReport) -> None:
    """A line saying what the tables hold, a table per level (classes x strategies, D x 1e4,
    best per class in bold green, then sums and maxima of |D|), and the share of each class's
    pixels nearest neighbour drops, largest first."""
    out.print(
        f"D x 1e4 = (p_original - p_d) x 1e4 per class (paper Table V), split "
        f"{report.split}, {report.images} images; bold green: the smallest |D|"
    )
    for level in report.levels:
        table = Table(
            "class",
            *[Column(s, justify="right") for s in report.strategies],
            title=f"scale {level}: D x 1e4",
        )
        d = np.stack([report.discrepancy(level, s) for s in report.strategies], axis=1) * SHOWN_AS
        best = np.abs(d).argmin(axis=1)
        for c, name in enumerate(report.classes):
            cells = [
                f"[bold green]{v:.3f}[/bold green]" if j == best[c] else f"{v:.3f}"
                for j, v in enumerate(d[c])
            ]
            table.add_row(name, *cells)
        table.add_section()
        table.add_row("sum |D|", *[f"{v:.3f}" for v in np.abs(d).sum(axis=0)])
        table.add_row("max |D|", *[f"{v:.3f}" for v in np.abs(d).max(axis=0)])
        out.print(table)
        if "nn" in report.strategies:
            lost = report.lost_share(level, "nn")
            worst = [c for c in lost.argsort()[::-1][:5] if lost[c] > 5e-4]  # >= 0.1% shown
            if worst:
                shares = [f"{lost[c]:.1%} of {report.classes[c]}'s" for c in worst]
                out.print(
                    f"scale {level}: nearest neighbour drops {shares[0]} pixels"
                    + "".join(f", {s}" for s in shares[1:])
                )


def _interrupted(e: BaseException) -> bool:
    """Ctrl-C, or what a compiled (numba) kernel running when it came turned it into: a
    SystemError whose context is the KeyboardInterrupt."""
    while e is not None:
        if isinstance(e, KeyboardInterrupt):
            return True
        e = e.__context__
    return False


reflow_help(app)


def main() -> None:
    os.environ[OWN_PROCESS] = "1"  # this process and its build workers (softprep.kernels)
    try:
        run_app(app, sys.argv[1:], MULTI_VALUE, "softprep")
    finally:  # the command has ended and said so: a Ctrl-C while the interpreter exits
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # (~0.2 s) would kill it silently
        os.environ.pop(OWN_PROCESS, None)  # a caller running main() in-process stays as it was
