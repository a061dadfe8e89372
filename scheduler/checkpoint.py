"""A job's resumable state at an optimizer-step boundary (how it is stored on disk is
scheduler/storage.py's question).

Resuming is deterministic replay: the sampler is a function of (seed, epoch), so where the data
stands is said by the epoch and how many samples of that epoch's order were used. A checkpoint
holds that data cursor beside the step count, the flat parameter vector, the buffers (BatchNorm
statistics) and the optimizer state, assembled over all shards so that any shard count can
resume it, and with gradient compression the workers' error feedback. The cursor names the
order it counts in (the training split's size, the seed, how the order is drawn): a resume on
data whose order differs is refused rather than replayed into samples used twice or never.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class DataCursor:
    """Where the training data stands between two steps, in no unit of the worker count."""

    epoch: int  # 0-based
    samples_used: int  # of that epoch's order, from its start
    training_samples: int  # the size of the split the order permutes
    seed: int
    order: str  # how an epoch's order is drawn (scheduler/sampler.py's EpochSampler.order_name)


@dataclass
class Checkpoint:
    step: int  # optimizer steps completed
    parameters: np.ndarray  # the flat parameter vector
    optimizer_steps: int  # the optimizer's own step count (t in its update formulas)
    # Elementwise optimizers: each state array over the whole flat vector ("exp_avg", ...).
    # Others (Adafactor): "parameter name/state key" for each whole parameter.
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict)
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
    # None in a checkpoint written before the cursor was kept: its step says where the data is.
    data_cursor: DataCursor | None = None
    # Gradient compression (worker/compression.py): "error_feedback/BLOCK" per gradient block,
    # and PowerSGD's warm start "powersgd_q/MATRIX". Empty without compression.
    compression_state: dict[str, np.ndarray] = field(default_factory=dict)
