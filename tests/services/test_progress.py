"""The progress bar of `chainrule train`, `watch` and `demo`, rendered as a pipe sees it: rich
prints the final state once, 80 columns wide."""

import io

import pytest
from rich.console import Console

from services.progress import TrainingProgress, format_eta


def final_lines(title: str, steps: int, total: int, *, finish: int | None = None,
                validation: tuple[float, float | None] | None = None,
                eta_seconds: float | None = None) -> list[str]:
    out = io.StringIO()
    with TrainingProgress(title, 0, console=Console(file=out, width=80)) as progress:
        for step in range(1, steps + 1):
            progress.step(step, total, 19, 0.0123, 12345.0, eta_seconds)
        if validation is not None:
            progress.evaluation(*validation)
        if finish is not None:
            progress.finish(finish)
    return out.getvalue().splitlines()


def test_the_demos_last_line_shows_every_figure_and_eta_0s_within_80_columns():
    bar, details = final_lines("digits-mlp", 225, 225, finish=225, validation=(0.1234, 0.9666))
    assert "225/225" in bar and "epoch 20" in bar and "loss 0.0123" in bar
    assert bar.endswith("eta 0s")
    assert details == "12,345 samples/s  validation: loss 0.1234, accuracy 0.9666"
    assert "…" not in bar + details and max(len(bar), len(details)) <= 80


def test_a_job_that_ended_early_is_shown_at_its_final_step_count():
    bar, _ = final_lines("digits-mlp", 150, 225, finish=150)
    assert "150/150" in bar and bar.endswith("eta 0s")


def test_a_running_job_shows_the_servers_eta_and_a_long_title_leaves_the_numbers_whole():
    bar, _ = final_lines("python-help-transformer-long-name", 3, 11250, eta_seconds=65.2)
    assert "3/11250" in bar and bar.endswith("eta 1m05s") and len(bar) <= 80
    assert bar.startswith("python-help-transfo…")


@pytest.mark.parametrize("seconds, text", [(None, "-"), (float("nan"), "-"), (0.0, "0s"),
                                           (42.4, "42s"), (185, "3m05s"), (7620, "2h07m")])
def test_eta_is_short_and_says_when_it_is_not_known(seconds, text):
    assert format_eta(seconds) == text
