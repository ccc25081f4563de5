"""Rich progress bars with rate and ETA, shared by every long loop."""

from __future__ import annotations

import threading
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    Task,
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

        if task.finished and task.finished_time:
            # Done: the average over the bar's life, the rate the stage's summary reports
            # (rich's windowed speed would show the last burst of a batched loop).
            speed = task.completed / task.finished_time
        else:
            speed = task.speed
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
    """Progress and summaries go to stderr so stdout stays clean for piping. Soft wrap: a
    summary stays one line in a log (rich would break it at 80 columns without a TTY)."""
    return Console(stderr=True, soft_wrap=True)


def _status_line(task: Task, unit: str) -> str:
    """A bar as one plain line, for logs (no TTY)."""
    done, total, elapsed = task.completed, task.total, task.elapsed or 0.0
    pct = f" ({100 * done / total:.0f}%)" if total else ""
    rate = f", {done / elapsed:.1f} {unit}/s" if elapsed > 0 and done else ""
    return (
        f"{task.description}: {done:g}/{total if total is not None else '?'}{pct}{rate}, "
        f"{elapsed:.0f} s"
    )


@contextmanager
def _heartbeat(prog: Progress, task: int, unit: str, every_s: float) -> Iterator[None]:
    """Without a TTY rich draws nothing until the end: print the bar as a line every
    ``every_s`` seconds, so a log shows the stage is alive and how far it is."""
    con = prog.console
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            (t,) = [x for x in prog.tasks if x.id == task]
            con.print(_status_line(t, unit), highlight=False)

    thread = threading.Thread(target=beat, name="vpd-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


@contextmanager
def progress_bar(
    description: str,
    total: int | None,
    unit: str = "it",
    enabled: bool = True,
    counters: tuple[str, ...] = (),
    heartbeat_s: float = 30.0,
) -> Iterator[_Bar]:
    """Yield a bar with ``advance(n=1)``; each of ``counters`` (e.g. ``"tok"``) gets its own
    rate column, fed by ``bar.count(name, n)``. Without a TTY a plain status line is
    printed at once and every ``heartbeat_s`` seconds."""
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
        beat = (
            _heartbeat(prog, task, unit, heartbeat_s)
            if enabled and not prog.console.is_terminal
            else nullcontext()
        )
        try:
            with beat:
                yield _Bar(prog, task)
        except BaseException:
            # The error's one line says what happened; a bar stopped short would only
            # add a second line (a TTY keeps it, plain stderr prints it at exit).
            prog.update(task, visible=False)
            raise


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

    def complete(self) -> None:
        """Mark every item handled: a loop that rejected some inputs (counted in the total,
        never advanced) still ends at 100%."""
        self.prog.update(self.task, completed=self._task().total)

    @property
    def elapsed(self) -> float:
        """Seconds since the bar started: the interval a stage's summary rates use, so
        they equal the bar's final rate."""
        return self._task().elapsed or 0.0

    def _task(self) -> Task:
        return next(t for t in self.prog.tasks if t.id == self.task)

    def describe(self, text: str, announce: bool = True) -> None:
        """Name the current phase ("loading the model"...); with ``announce`` a log
        without a TTY gets it as a line at once."""
        self.prog.update(self.task, description=text)
        if announce and not self.prog.disable and not self.prog.console.is_terminal:
            self.prog.console.print(text + "...", highlight=False)


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
