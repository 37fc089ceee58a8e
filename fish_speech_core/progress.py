"""The progress bar of every stage and command, so they all read the same.

One look everywhere: ``description  bar  done/total unit  rate  elapsed  ETA  note``. A task
names its ``unit`` (``files``, ``steps``, ``tokens``, ``s audio``) and may carry a ``note``
(the latest loss, a file count) as fields of ``add_task``/``update``::

    with progress_bar(show=show_progress) as bar:
        task = bar.add_task("validate", total=len(items), unit="files")
        bar.advance(task)

Drawn live on a terminal only (on stderr): elsewhere (a log file, a Prefect worker, a test's
captured output) a bar is printed once, in its final state, when it stops (a transient bar not
at all), and ``show=False`` prints nothing.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Column
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TextColumn, TimeElapsedColumn
from rich.text import Text


def _number(value: float) -> str:
    # Counts are whole (files, steps, tokens) except audio seconds, where a tenth helps short runs.
    return f"{value:.0f}" if value >= 100 or value == int(value) else f"{value:.1f}"


class _Count(ProgressColumn):
    """``12/100 files``; just ``12 files`` while the total is unknown."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "")
        if task.total is None:
            done = _number(task.completed) if task.completed else ""
        else:
            done = f"{_number(task.completed)}/{_number(task.total)}"
        return Text(f"{done} {unit}".strip() if done else "", style="progress.download")


class _Rate(ProgressColumn):
    """Units per second over rich's recent window (blank until it has two samples)."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if not speed:
            return Text("")
        shown = f"{speed:.2g}" if speed < 10 else f"{speed:.0f}"
        return Text(f"{shown} {task.fields.get('unit') or 'it'}/s", style="progress.data.speed")


class _Eta(ProgressColumn):
    """``ETA 0:01:02`` once the total and a rate are known."""

    def render(self, task: Task) -> Text:
        remaining = task.time_remaining
        if task.total is None or remaining is None or task.finished:
            return Text("")
        minutes, seconds = divmod(int(remaining), 60)
        hours, minutes = divmod(minutes, 60)
        return Text(f"ETA {hours}:{minutes:02d}:{seconds:02d}", style="progress.remaining")


class _Note(ProgressColumn):
    """The task's ``note`` field, cut to one line (a narrow terminal must not wrap the bar)."""

    def __init__(self) -> None:
        super().__init__(table_column=Column(no_wrap=True, overflow="ellipsis"))

    def render(self, task: Task) -> Text:
        return Text(str(task.fields.get("note", "")))


def progress_bar(show: bool = True, transient: bool = False, console: Console | None = None) -> Progress:
    """A rich :class:`Progress` with the columns above, on stderr unless ``console`` says otherwise.

    Args:
        show: ``False`` draws and prints nothing (``show_progress=False`` of the stages).
        transient: erase the bar when it stops (for steps whose summary follows at once).
    """
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), _Count(), _Rate(), TimeElapsedColumn(), _Eta(), _Note(),
        console=console or Console(stderr=True), transient=transient, disable=not show,
    )


__all__ = ["progress_bar"]
