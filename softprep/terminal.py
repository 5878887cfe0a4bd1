"""Command-line helpers shared by ``softprep`` and ``softtrain``: one-line errors with exit
code 2, progress bars, and options that take several values. Light (no numpy, zarr, torch),
so both CLIs answer ``--help`` at once."""

from __future__ import annotations

from contextlib import contextmanager

import typer
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

console = Console(stderr=True, soft_wrap=True)  # log files get whole lines


class RateColumn(ProgressColumn):
    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:.2f} img/s" if speed else "-- img/s", style="cyan")


@contextmanager
def progress_bar(description: str):
    """Yields a ``progress(done, total)`` callback drawing a rich bar with img/s and ETA."""
    with Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=console,
    ) as bar:
        task = bar.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        yield update


@contextmanager
def user_errors(errors: tuple):
    """Known bad-input errors become one red message and exit code 2, no traceback."""
    try:
        yield
    except errors as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(2) from None


def expand_multi_value(argv: list[str], options) -> list[str]:
    """``--scales 1/8 1/4`` -> ``--scales 1/8 --scales 1/4`` (Typer options take one value).

    Values run until the next argument that starts with ``-``; put positional arguments
    before such options."""
    result, current = [], None
    for arg in argv:
        if arg in options:
            current = arg
            continue
        if current and not arg.startswith("-"):
            result += [current, arg]
            continue
        current = None
        result.append(arg)
    return result
