"""Where a replica gets the samples of its micro-batches: the training split's rows by index.

Two sources. `InMemoryRows` holds the prepared arrays (built-in and uploaded data sets, put in
the object store once by the worker group). `worker.parquet_rows.ParquetRows` holds only where
a Parquet file is and how to read it, and reads the row groups that a step's indices fall in
when a replica first needs them: the data set is never whole on a worker.

Both give the same rows for the same indices whichever replica asks, so the gradients do not
depend on the worker count.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np


class TrainingRows(Protocol):
    """The training split's samples by index (0..samples-1, the sampler's indices)."""

    @property
    def feature_dtype(self) -> np.dtype: ...

    def take(self, indices: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(features, targets) of these samples, in this order; `epoch` lets a source read
        ahead in that epoch's order."""
        ...


@dataclass(frozen=True, eq=False)
class InMemoryRows:
    """The training split as arrays, already in the job's dtype."""

    x: np.ndarray
    y: np.ndarray

    @property
    def feature_dtype(self) -> np.dtype:
        return self.x.dtype

    def take(self, indices: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        return self.x[indices], self.y[indices]
