"""The live progress bar: step/total, epoch, loss, elapsed time and ETA on one line, samples/s
and the last validation on the line below it, and above them a line for each recovery.

Fed plain numbers, so the same display serves `chainrule train` (records from the runner) and
`chainrule watch` and `chainrule demo` (events from the gRPC stream: `watch_with_progress`).

Each line fits 80 columns (a pipe's width, where rich prints only the final state), so that no
figure is cut to an ellipsis: the bar takes only the room left, and a long title is shortened.
A job that has ended is shown as such: `finish` sets the bar to its final step count and the
ETA to 0s.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING

from rich.console import Console, RenderableType
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Column
from rich.text import Text

from chainrule.v1 import training_service_pb2 as pb

if TYPE_CHECKING:
    from chainrule.client import Client


MAX_TITLE = 20  # characters of the job's name on the bar's line


def format_eta(seconds: float | None) -> str:
    """A short duration: "0s", "42s", "3m05s", "2h07m"; "-" when not known."""
    if seconds is None or seconds != seconds or seconds < 0:  # None or nan: not known yet
        return "-"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class EtaColumn(ProgressColumn):
    """"eta 3m05s": the server's estimate when it sent one (task field `eta`), else rich's from
    the bar's own speed; "eta 0s" once the task is finished."""

    def render(self, task: Task) -> Text:
        if task.finished:
            return Text("eta 0s")
        eta = task.fields.get("eta")
        return Text(f"eta {format_eta(task.time_remaining if eta is None else eta)}")


class _ProgressWithDetails(Progress):
    """rich's Progress with a line of details (samples/s, the last validation) under each
    bar."""

    validation: str = ""

    def get_renderables(self) -> Iterable[RenderableType]:
        yield self.make_tasks_table(self.tasks)
        for task in self.tasks:
            details = [f"{task.fields['speed']} samples/s"]
            if self.validation:
                details.append(self.validation)
            yield Text("  ".join(details), no_wrap=True, overflow="ellipsis")


def _kept() -> Column:
    """A column that keeps its width: rich shrinks only the columns that may wrap."""
    return Column(no_wrap=True)


class TrainingProgress:
    def __init__(self, title: str, total_steps: int, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = _ProgressWithDetails(
            TextColumn("[bold]{task.description}", table_column=_kept()),
            # The one column that gives way: it takes what the others leave (at most 40), so a
            # narrow terminal shortens the bar, never the numbers.
            BarColumn(bar_width=None, table_column=Column(ratio=1, max_width=40)),
            MofNCompleteColumn(table_column=_kept()),
            TextColumn("epoch {task.fields[epoch]}", table_column=_kept()),
            TextColumn("loss {task.fields[loss]}", table_column=_kept()),
            TimeElapsedColumn(table_column=_kept()),
            EtaColumn(table_column=_kept()),
            console=self.console,
            transient=False,
        )
        if len(title) > MAX_TITLE:
            title = title[:MAX_TITLE - 1] + "…"
        self.task = self.progress.add_task(title, total=total_steps, epoch="-", loss="-",
                                           speed="-", eta=None)

    def __enter__(self) -> TrainingProgress:
        self.progress.start()
        return self

    def __exit__(self, kind: type | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        self.progress.stop()

    def step(self, step: int, total: int, epoch: int, loss: float,
             samples_per_second: float, eta_seconds: float | None = None) -> None:
        """Step `step` of `total` done; `eta_seconds` is the server's estimate (None: the
        bar's own)."""
        self.progress.update(self.task, completed=step, total=total, epoch=epoch + 1,
                             loss=f"{loss:.4f}", speed=f"{samples_per_second:,.0f}",
                             eta=eta_seconds)

    def evaluation(self, loss: float, accuracy: float | None) -> None:
        text = f"validation: loss {loss:.4f}"
        if accuracy is not None:
            text += f", accuracy {accuracy:.4f}"
        self.progress.validation = text
        self.progress.refresh()

    def finish(self, steps: int) -> None:
        """The job ended after `steps` steps (fewer than planned when early stopping ended it):
        the bar shows steps/steps and ETA 0s."""
        self.progress.update(self.task, completed=steps, total=steps, eta=0.0)

    def note(self, text: str) -> None:
        """A line above the bar, kept when the bar moves on (a recovery, say)."""
        self.progress.console.print(text, markup=False, highlight=False)


def watch_with_progress(client: Client, job_id: str, title: str) -> pb.Job:
    """Follow a job's WatchJob stream on a progress bar until it ends, and return its record.
    A job that SUCCEEDED ends the bar at its recorded final step count (the server records
    step = total then), whatever progress events the stream had time to carry."""
    with TrainingProgress(title, total_steps=0) as progress:
        for event in client.watch(job_id):
            kind = event.WhichOneof("kind")
            if kind == "progress":
                p = event.progress
                progress.step(p.step, p.total_steps, p.epoch, p.loss, p.samples_per_second,
                              p.eta_seconds)
            elif kind == "validation":
                v = event.validation
                progress.evaluation(v.loss, v.accuracy if v.HasField("accuracy") else None)
            elif kind == "recovery":
                progress.note(f"recovered: {event.recovery.message}")
        job = client.get(job_id)
        if job.state == pb.JOB_STATE_SUCCEEDED and job.progress.total_steps:
            progress.finish(job.progress.step)
    return job
