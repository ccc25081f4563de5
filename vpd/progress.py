"""Rich progress bars with rate and ETA, shared by every long loop."""

from __future__ import annotations

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


def console() -> Console:
    """Progress and summaries go to stderr so stdout stays clean for piping."""
    return Console(stderr=True)


@contextmanager
def progress_bar(
    description: str, total: int | None, unit: str = "it", enabled: bool = True
) -> Iterator[Progress]:
    """Yield ``advance(n=1)``-able bar; ``bar.advance(task, n)`` via the returned helper."""
    prog = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        _Rate(unit),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console(),
        disable=not enabled,
        transient=False,
    )
    with prog:
        task = prog.add_task(description, total=total)
        yield _Bar(prog, task)


class _Bar:
    def __init__(self, prog: Progress, task: int) -> None:
        self.prog, self.task = prog, task

    def advance(self, n: float = 1) -> None:
        self.prog.advance(self.task, n)

    def set_total(self, total: int) -> None:
        self.prog.update(self.task, total=total)

    def describe(self, text: str) -> None:
        self.prog.update(self.task, description=text)
