"""Progress bars: one rich bar per stage, with throughput and live metrics; silent when disabled.

Bars go to stderr so that `--json` output on stdout stays a single JSON document.
"""

from __future__ import annotations

import contextlib
import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.text import Text


class _RateColumn(ProgressColumn):
    """Completed units per second, e.g. `412.3 img/s`."""

    def __init__(self, unit: str):
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(f"{speed:,.1f} {self.unit}/s" if speed else f"-- {self.unit}/s", style="progress.data.speed")


class _NullProgress:
    """Same interface as rich's Progress, does nothing."""

    def add_task(self, *args, **kwargs) -> int:
        return 0

    def update(self, *args, **kwargs) -> None:
        pass

    def advance(self, *args, **kwargs) -> None:
        pass


@contextlib.contextmanager
def make_progress(enabled: bool, unit: str = "it", metrics: bool = False):
    """A rich Progress (or a no-op) with description, bar, count, rate, elapsed and ETA.

    With `metrics=True` a `{task.fields[metrics]}` column shows what the caller passes as
    `progress.update(task, metrics="loss 0.41 acc 88.0")`.
    """
    if not enabled:
        yield _NullProgress()
        return
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), _RateColumn(unit),
               TimeElapsedColumn(), TimeRemainingColumn()]
    if metrics:
        columns.append(TextColumn("{task.fields[metrics]}"))
    with Progress(*columns, console=Console(file=sys.stderr), transient=False) as progress:
        yield progress
