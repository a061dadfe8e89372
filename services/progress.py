"""The live progress bar: step/total, epoch, loss, samples/s, ETA and the last validation, and
above it a line for each recovery.

Fed plain numbers, so the same display serves `chainrule train` (records from the runner) and
`chainrule watch` (events from the gRPC stream).
"""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainingProgress:
    def __init__(self, title: str, total_steps: int, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("epoch {task.fields[epoch]}"),
            TextColumn("loss {task.fields[loss]}"),
            TextColumn("{task.fields[speed]} samples/s"),
            TextColumn("{task.fields[validation]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.task = self.progress.add_task(title, total=total_steps, epoch="-", loss="-",
                                           speed="-", validation="")

    def __enter__(self) -> TrainingProgress:
        self.progress.start()
        return self

    def __exit__(self, kind: type | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.progress.stop()

    def step(self, step: int, total: int, epoch: int, loss: float,
             samples_per_second: float) -> None:
        self.progress.update(self.task, completed=step, total=total, epoch=epoch + 1,
                             loss=f"{loss:.4f}", speed=f"{samples_per_second:,.0f}")

    def evaluation(self, loss: float, accuracy: float | None) -> None:
        text = f"val loss {loss:.4f}"
        if accuracy is not None:
            text += f" acc {accuracy:.3f}"
        self.progress.update(self.task, validation=text)

    def note(self, text: str) -> None:
        """A line above the bar, kept when the bar moves on (a recovery, say)."""
        self.progress.console.print(text, markup=False, highlight=False)
