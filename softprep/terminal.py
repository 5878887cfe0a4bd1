"""Command-line helpers shared by ``softprep`` and ``softtrain``: one-line errors with exit
code 2, progress bars, and options that take several values. Light (no numpy, zarr, torch),
so both CLIs answer ``--help`` at once."""

from __future__ import annotations

import inspect
import logging
import os
import re
import time
from contextlib import contextmanager
from pathlib import Path
from typing import get_args

import typer
import typer.core
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

WIDE = 400  # columns of a console that is not a terminal: tables are never squeezed


def make_console(stderr: bool = False) -> Console:
    """A console for messages, summaries and tables. At a terminal it wraps at the terminal's
    width; piped or redirected (log files, ``| tee``) every message is one whole line and
    tables keep their natural width (but for columns of prose given a ``max_width``), instead
    of both being cut at 80 columns. ``COLUMNS``, when set, is the width either way (errors
    excepted: ``user_errors`` never wraps them)."""
    console = Console(stderr=stderr)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(stderr=stderr, soft_wrap=True, width=WIDE)
    return console


console = make_console(stderr=True)


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        rate = task.fields.get("rate")
        return Text(f"{rate:.2f} img/s" if rate else "-- img/s", style="cyan")


@contextmanager
def progress_bar(description: str):
    """Yields a ``progress(done, total, description=None)`` callback drawing a rich bar with
    ETA and the rate since the first call, (done - first done) / elapsed: what a summary
    line computes. The bar appears at the first call, so an error found before any work (a
    bad argument, a missing split or file) is printed alone, without an empty bar above it.
    A new ``description`` starts the bar and its rate afresh (a stage before the work)."""
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    )
    task = bar.add_task(description, total=None, rate=None)
    first: list = []

    def update(done: int, total: int, description: str | None = None) -> None:
        now = time.monotonic()
        if description and description != bar.tasks[0].description:
            bar.reset(task, description=description, total=total, rate=None)
            if first:
                first[:] = [now, done]
        if not first:
            first[:] = [now, done]
            bar.start()
        rate = (done - first[1]) / (now - first[0]) if now > first[0] else None
        bar.update(task, completed=done, total=total, rate=rate)

    try:
        yield update
    finally:
        if first:
            bar.stop()


VALUE_NAMES = {  # what an option's value is, where its type says too little
    "scales": "FRACTION",
    "levels": "FRACTION",
    "tta_levels": "FRACTION",
    "level": "FRACTION",
    "eval_level": "FRACTION",
    "level_weights": "WEIGHT",
    "crop": "HxW",
    "size": "HxW",
    "window": "HxW",
    "stride": "HxW",
}
_TYPE_NAMES = {int: "INTEGER", float: "FLOAT", Path: "PATH", str: "TEXT"}


def value_name(param) -> str:
    """The value name ``--help`` shows for an option or argument: nothing for a flag,
    ``TEXT``, ``INTEGER``, ``FLOAT``, ``PATH`` or a ``VALUE_NAMES`` entry, with ``...`` for
    several values (``--scales FRACTION ...``), instead of Typer's Python types
    (``<bool>``, ``<list[str]>``)."""
    if getattr(param, "is_flag", False):
        return ""
    desc = param.type_descriptor
    annotation = get_args(desc.annotation)[0] if desc.is_list else desc.annotation
    name = VALUE_NAMES.get(param.name or "") or _TYPE_NAMES.get(annotation, "TEXT")
    return f"{name} ..." if desc.is_list or getattr(param, "multiple", False) else name


def _install_value_names() -> None:
    """Typer renders the type column of ``--help`` from ``display_type_rich`` (an option's
    ``metavar`` replaces it; an argument's replaces its name): both CLIs show
    ``value_name`` there, set once here, where both CLIs' shared terminal code lives."""
    typer.core.TyperOption.display_type_rich = lambda self, ctx: (
        self.metavar if self.metavar is not None else value_name(self)
    )
    typer.core.TyperArgument.display_type_rich = lambda self, ctx: value_name(self)


_install_value_names()


def reflow_help(app: typer.Typer) -> None:
    """Each command's help text as paragraphs of one line, which ``--help`` wraps at the
    terminal's width: Typer's rich mode keeps a docstring's own line breaks, which broke its
    lines early. Called by each CLI once its commands are registered."""
    for command in app.registered_commands:
        text = inspect.cleandoc(command.help or command.callback.__doc__ or "")
        shown, hidden = text.partition("\f")[::2]  # Click hides what follows a form feed
        paragraphs = (
            p if p.startswith("\b") else " ".join(line.strip() for line in p.splitlines())
            for p in shown.split("\n\n")  # a \b paragraph keeps its lines, as in Click
        )
        command.help = "\n\n".join(paragraphs) + ("\f" + hidden if hidden else "")


def tagged(tag: str, style: str, text) -> Text:
    """``tag: text`` with only the tag styled: paths and messages are never read as rich
    markup (``pip install 'softprep[dask]'`` keeps its brackets)."""
    return Text.assemble((f"{tag}:", style), " ", str(text))


def note_if_scored_where_fitted(fit_split: str, split: str) -> None:
    """A note (stderr) when a decode is fitted on the split it is then scored on."""
    if fit_split == split:
        text = f"the decode is fitted on the split it is scored on ({split}): an optimistic figure"
        console.print(tagged("note", "yellow", text), highlight=False)


class _Notes(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        console.print(tagged("note", "yellow", record.getMessage()), highlight=False)


def version_option(prog: str):
    """A ``--version`` option for a Typer callback: prints ``<prog> <version>`` and exits."""
    from softprep import __version__

    def show(value: bool) -> None:
        if value:
            print(f"{prog} {__version__}")
            raise typer.Exit()

    return typer.Option(False, "--version", callback=show, is_eager=True,
                        help="Print the version and exit.")  # fmt: skip


def show_notes(logger: str) -> None:
    """Print the library's warnings (logger ``softprep`` / ``softtrain``) as ``note:`` lines
    on stderr; installed once per process by each CLI."""
    target = logging.getLogger(logger)
    if not any(isinstance(h, _Notes) for h in target.handlers):
        target.addHandler(_Notes())
        target.propagate = False


@contextmanager
def user_errors(errors: tuple):
    """Known bad-input errors become one red message and exit code 2, no traceback; never
    wrapped by rich (a log keeps it on one line, a terminal wraps it itself)."""
    try:
        yield
    except errors as e:
        console.print(tagged("error", "red", e), highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


def output_files(paths: dict[str, Path | None], inputs: tuple = ()) -> None:
    """Before any work: each output file's folder exists, created as ``build``, ``fit``
    and ``predict`` create their ``--out`` (a missing folder once ended a long report with a
    traceback); a folder or a URL given as the file, or a file that is one of ``inputs`` or
    lies inside one (a store is a folder), is refused (``ValueError`` naming the option).
    ``paths``: {option: path or None (not given)}; ``inputs``: paths or URLs (None: none)."""
    local = [Path(i).resolve() for i in inputs if i is not None and "://" not in str(i)]
    for option, path in paths.items():
        if path is None:
            continue
        path = Path(path)
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]*:/", str(path)):  # s3://b/x reads as s3:/b/x
            raise ValueError(f"{option} {path}: give a local file (URLs are not written)")
        target = path.resolve()
        for given in local:
            if target == given:
                raise ValueError(
                    f"{option} {path} is an input (it is the input {given}); give another file name"
                )
            if given in target.parents:
                raise ValueError(
                    f"{option} {path} lies inside the input {given}; give another file name"
                )
        if path.is_dir():
            raise ValueError(f"{option} {path} is a folder; give a file's name")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ValueError(f"{option} {path}: its folder cannot be made ({e})") from None


def run_app(app: typer.Typer, argv: list[str], options, prog_name: str) -> None:
    """A CLI's entry point: multi-value options expanded (``expand_multi_value``), a refused
    expansion as one error line and exit code 2, then the Typer app."""
    try:
        args = expand_multi_value(argv, options, app)
    except ValueError as e:
        console.print(tagged("error", "red", e), highlight=False, soft_wrap=True)
        raise SystemExit(2) from None
    app(args=args, prog_name=prog_name)


def expand_multi_value(argv: list[str], options, app: typer.Typer | None = None) -> list[str]:
    """``--scales 1/8 1/4`` -> ``--scales 1/8 --scales 1/4`` (Typer options take one value),
    like argparse's ``nargs='+'``: values run until the next argument that starts with ``-``,
    but the command's required positional arguments are left to it (``build --scales 1/8
    1/4 cityscapes`` keeps ``cityscapes`` as the dataset). A repeated list option extends
    it; an option that takes one value given twice raises ``ValueError``.

    ``app``: the Typer app, to know each command's positionals and options; without it
    values run to the next ``-`` argument."""
    command = _command(app, argv)
    value_options, single, required = set(), set(), 0
    if command is not None:
        for param in command.params:
            if param.param_type_name == "argument":
                required += bool(param.required)
            elif not param.is_flag:
                value_options.update(param.opts)
                if not param.multiple:
                    single.update(param.opts)
    result, runs, positionals, i = [], [], [], 0
    while i < len(argv):
        arg = argv[i]
        if arg in options:
            values = []
            while i + 1 < len(argv) and not argv[i + 1].startswith("-"):
                values.append(argv[i + 1])
                i += 1
            runs.append((arg, values))
            result.append(runs[-1])
        elif arg in value_options and i + 1 < len(argv):
            result += [arg, argv[i + 1]]
            i += 1
        elif arg.startswith("-") or (command is not None and i == 0):
            result.append(arg)
        else:
            positionals.append(arg)
            result.append(arg)
        i += 1
    missing = required - len(positionals)
    stolen = []
    for _, values in reversed(runs):  # argparse leaves each option at least one value
        while missing > 0 and len(values) > 1:
            stolen.insert(0, values.pop())
            missing -= 1
    flat = []
    for item in result:
        flat += [x for v in item[1] for x in (item[0], v)] if isinstance(item, tuple) else [item]
    given = [a for a in flat if a in single]
    repeated = sorted({a for a in given if given.count(a) > 1})
    if repeated:
        raise ValueError(f"{', '.join(repeated)} takes one value; it was given more than once")
    return flat + stolen


def _command(app, argv: list[str]):
    """The (click) command ``argv`` names (``argv[0]``), or None."""
    if app is None or not argv:
        return None
    return getattr(typer.main.get_command(app), "commands", {}).get(argv[0])
