"""A job's resumable state at an optimizer-step boundary (how it is stored on disk is
scheduler/storage.py's question).

Resuming is deterministic replay: the sampler is a function of (seed, epoch), so knowing how
many optimizer steps were done says exactly which batch comes next. A checkpoint therefore
holds only the step count, the flat parameter vector, the buffers (BatchNorm statistics) and
the optimizer state, assembled over all shards so that any shard count can resume it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class Checkpoint:
    step: int  # optimizer steps completed
    parameters: np.ndarray  # the flat parameter vector
    optimizer_steps: int  # the optimizer's own step count (t in its update formulas)
    # Elementwise optimizers: each state array over the whole flat vector ("exp_avg", ...).
    # Others (Adafactor): "parameter name/state key" for each whole parameter.
    optimizer_state: dict[str, np.ndarray] = field(default_factory=dict)
    buffers: dict[str, np.ndarray] = field(default_factory=dict)
