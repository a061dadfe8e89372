"""Reading a job's TensorBoard files back as TensorBoard itself does: its EventAccumulator
(which also applies a resumed run's purge of the steps it replays)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator


def float32(value: float) -> float:
    """A value as a scalar summary stores it."""
    return float(np.float32(value))


@dataclass(frozen=True)
class Logged:
    scalars: dict[str, list[tuple[int, float]]]  # tag -> (step, value), by step
    texts: dict[str, list[tuple[int, str]]]
    histograms: dict[str, list[tuple[int, float, float]]]  # tag -> (step, count, sum)


def read_folder(folder: Path) -> Logged:
    """What TensorBoard shows of the event files in `folder` (one run), every event kept."""
    accumulator = EventAccumulator(str(folder), size_guidance={"scalars": 0, "tensors": 0,
                                                               "histograms": 0})
    accumulator.Reload()
    tags = accumulator.Tags()
    return Logged(
        scalars={tag: [(e.step, e.value) for e in accumulator.Scalars(tag)]
                 for tag in tags["scalars"]},
        texts={tag: [(e.step, e.tensor_proto.string_val[0].decode())
                     for e in accumulator.Tensors(tag)] for tag in tags["tensors"]},
        histograms={tag: [(e.step, e.histogram_value.num, e.histogram_value.sum)
                          for e in accumulator.Histograms(tag)] for tag in tags["histograms"]},
    )
