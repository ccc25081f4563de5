"""Rich progress bars with rate and ETA, shared by every long loop."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class _Rate(TextColumn):
    """Items per second, which rich has no built-in column for."""

    def __init__(self, unit: str) -> None:
        super().__init__("")
        self.unit = unit

    def render(self, task):  # type: ignore[override]
        from rich.text import Text

        speed = task.finished_speed or task.speed
        return Text(f"{speed:.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="cyan")


class _FieldRate(TextColumn):
    """A second rate from a counter the loop keeps in the task's fields (e.g. tokens/s)."""

    def __init__(self, unit: str) -> None:
        super().__init__("")
        self.unit = unit

    def render(self, task):  # type: ignore[override]
        from rich.text import Text

        elapsed = task.finished_time or task.elapsed
        count = task.fields.get(self.unit, 0)
        if not elapsed or not count:
            return Text(f"- {self.unit}/s", style="cyan")
        return Text(f"{count / elapsed:.0f} {self.unit}/s", style="cyan")


def console() -> Console:
    """Progress and summaries go to stderr so stdout stays clean for piping."""
    return Console(stderr=True)


@contextmanager
def progress_bar(
    description: str,
    total: int | None,
    unit: str = "it",
    enabled: bool = True,
    counters: tuple[str, ...] = (),
) -> Iterator[_Bar]:
    """Yield a bar with ``advance(n=1)``; each of ``counters`` (e.g. ``"tok"``) gets its own
    rate column, fed by ``bar.count(name, n)``."""
    prog = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _Rate(unit),
        *(_FieldRate(c) for c in counters),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console(),
        disable=not enabled,
        transient=False,
    )
    with prog:
        task = prog.add_task(description, total=total, **dict.fromkeys(counters, 0))
        yield _Bar(prog, task)


class _Bar:
    def __init__(self, prog: Progress, task: int) -> None:
        self.prog, self.task = prog, task
        self.counts: dict[str, float] = {}

    def advance(self, n: float = 1) -> None:
        self.prog.advance(self.task, n)

    def count(self, name: str, n: float) -> None:
        """Add ``n`` to the counter ``name`` (shown as a rate)."""
        self.counts[name] = self.counts.get(name, 0) + n
        self.prog.update(self.task, **{name: self.counts[name]})

    def set_total(self, total: int) -> None:
        self.prog.update(self.task, total=total)

    def describe(self, text: str) -> None:
        self.prog.update(self.task, description=text)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """No third-party progress bars or warnings while loading/running: vpd shows its own."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", UserWarning)
            yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
