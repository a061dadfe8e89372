"""A Parquet data set read in row groups, never whole: the split, the order and the reader.

The three rules every process must agree on, functions of the spec alone (never of the worker
count):

- Validation split (`held_out`): row r (0-based, in file order) is held out when
  splitmix64(r + seed * 2**32 + 0x5B17) < validation_fraction * 2**64. A hash per row, so the
  split needs no pass over the data and no permutation of every row, and a row group's split
  is known from its first row and length alone.
- Training order (`windowed_order`): each epoch the row groups in a seeded order, then the
  training rows of each window of SHUFFLE_WINDOW_GROUPS consecutive row groups of that order
  in a seeded order. A batch then reads from a few row groups instead of all of them.
- Training index i: the i-th training row of the file, counting row groups in file order.

`ParquetRows` is what a replica holds: where the file is and how to turn a row group into
standardised features. It reads a row group when a step first needs it, keeps at most
`2 * SHUFFLE_WINDOW_GROUPS` row groups (the current window and the next, read ahead by one
thread) and one copy of the row groups its micro-batches are gathered from (a micro-batch is
then one gather, not one per row group), so a worker's memory is bounded by the batch and a
few row groups, not the file.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

SHUFFLE_WINDOW_GROUPS = 4
_SPLIT_STREAM = 0x5B17  # the same stream as the in-memory split's (scheduler/datasets.py)
_ORDER_STREAM = 0x0DE5  # keeps the row-group order apart from every other use of the seed
_MASK64 = (1 << 64) - 1


def _splitmix64(values: np.ndarray) -> np.ndarray:
    """Sebastiano Vigna's splitmix64 finaliser, elementwise on uint64 (wrapping arithmetic)."""
    z = values + np.uint64(0x9E3779B97F4A7C15)
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def held_out(first_row: int, rows: int, seed: int, fraction: float) -> np.ndarray:
    """Which of the rows [first_row, first_row + rows) are validation rows (a bool mask)."""
    if fraction <= 0:
        return np.zeros(rows, dtype=bool)
    key = (seed * (1 << 32) + _SPLIT_STREAM + first_row) & _MASK64
    with np.errstate(over="ignore"):
        hashes = _splitmix64(np.arange(rows, dtype=np.uint64) + np.uint64(key))
    return hashes < np.uint64(int(fraction * 2.0**64))


def group_order(groups: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The row groups in the order epoch `epoch` visits them."""
    if not shuffle:
        return np.arange(groups)
    return np.random.default_rng([seed, epoch, _ORDER_STREAM]).permutation(groups)


def windowed_order(training_per_group: Sequence[int], seed: int, epoch: int,
                   shuffle: bool = True) -> np.ndarray:
    """Epoch `epoch`'s order of the training indices: row groups in `group_order`, the rows of
    each window of SHUFFLE_WINDOW_GROUPS of them shuffled together."""
    counts = np.asarray(training_per_group, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    if not shuffle:
        return np.arange(starts[-1])
    rng = np.random.default_rng([seed, epoch, _ORDER_STREAM])
    groups = rng.permutation(len(counts))  # the first draw: group_order's
    parts = []
    for first in range(0, len(groups), SHUFFLE_WINDOW_GROUPS):
        window = groups[first:first + SHUFFLE_WINDOW_GROUPS]
        indices = np.concatenate([np.arange(starts[g], starts[g + 1]) for g in window])
        parts.append(rng.permutation(indices))
    return np.concatenate(parts)


@dataclass(frozen=True)
class ParquetSource:
    """Everything a process needs to read a job's Parquet rows: plain data, cheap to send."""

    path: str  # a local path or a URI (s3://bucket/key)
    feature_columns: tuple[str, ...]
    label_column: str
    regression: bool  # float targets of shape (n, 1); else int64 class labels
    dtype: str  # the job's float type, of the features (and regression targets)
    feature_mean: np.ndarray | None  # None: not standardised
    feature_std: np.ndarray | None
    seed: int
    validation_fraction: float
    group_rows: tuple[int, ...]  # every row group's rows, in file order
    training_per_group: tuple[int, ...]  # its training rows (the rest are held out)
    shuffle: bool = True

    def read_group(self, parquet_file, group: int) -> tuple[np.ndarray, np.ndarray]:
        """Row group `group`'s training rows as (features, targets), standardised (in float64,
        as in-memory data sets are) and in the job's dtype. The features are column-major, as
        Parquet stores them: stacking the columns is one contiguous copy each, where a
        row-major matrix would be a strided write of every value (a third of the read's time);
        a batch's gather of a few rows from it costs the same either way."""
        table = self._read_table(parquet_file, group)
        # Checked for missing values only: load_parquet's pass, which reads every value of
        # the file before any worker starts, refused NaN and infinities.
        features = np.stack([_column(table, name, group, finite=False).astype(np.float64,
                                                                             copy=False)
                             for name in self.feature_columns])
        labels = _column(table, self.label_column, group, finite=False)
        validation = held_out(int(sum(self.group_rows[:group])), table.num_rows, self.seed,
                              self.validation_fraction)
        if validation.any():
            features, labels = features[:, ~validation], labels[~validation]
        if self.feature_mean is not None and self.feature_std is not None:
            features -= self.feature_mean[:, None]
            features /= self.feature_std[:, None]
        return features.astype(self.dtype, copy=False).T, self.targets(labels)

    def read_raw(self, parquet_file, group: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every row of row group `group`: (float64 features as stored, labels as stored,
        which rows are held out for validation)."""
        table = self._read_table(parquet_file, group)
        features = np.column_stack([_column(table, name, group).astype(np.float64, copy=False)
                                    for name in self.feature_columns])
        labels = _column(table, self.label_column, group)
        first_row = int(sum(self.group_rows[:group]))
        return features, labels, held_out(first_row, table.num_rows, self.seed,
                                          self.validation_fraction)

    def _read_table(self, parquet_file, group: int):
        # One thread decodes: Arrow's pool threads would each keep an arena of freed memory.
        return parquet_file.read_row_group(group, columns=[*self.feature_columns,
                                                           self.label_column],
                                           use_threads=False)

    def targets(self, labels: np.ndarray) -> np.ndarray:
        """Labels as the loss takes them: int64 classes, or (n, 1) floats in the job's dtype."""
        if self.regression:
            return labels.astype(self.dtype).reshape(-1, 1)
        return labels.astype(np.int64)


def _column(table, name: str, group: int, finite: bool = True) -> np.ndarray:
    """A column as NumPy; ValueError for a missing value, or (`finite`) a NaN or infinity."""
    column = table.column(name)
    if column.null_count:
        raise ValueError(f"column {name!r} has missing values in row group {group}")
    values = column.to_numpy()
    if finite and values.dtype.kind == "f" and not np.isfinite(values).all():
        raise ValueError(f"column {name!r} has NaN or infinite values in row group {group}")
    return values


def open_parquet(location: str):
    """A pyarrow ParquetFile of a local path, or of a URI such as s3://bucket/key through
    pyarrow.fs, which takes the endpoint and credentials from the environment as every S3
    client does (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION...)."""
    import pyarrow.fs
    import pyarrow.parquet as pq  # imported where rows are read, not by every replica

    if "://" not in location:
        return pq.ParquetFile(location)
    filesystem, path = pyarrow.fs.FileSystem.from_uri(location)
    return pq.ParquetFile(filesystem.open_input_file(path))


class ParquetRows:
    """A replica's reader of a Parquet training split (worker.training_rows.TrainingRows)."""

    def __init__(self, source: ParquetSource):
        self.source = source
        starts = np.concatenate([[0], np.cumsum(source.training_per_group)])
        self._training_starts = starts.astype(np.int64)
        self._capacity = 2 * SHUFFLE_WINDOW_GROUPS
        # Opened on first use, in the process that reads (a replica's actor).
        self._file = None
        self._reads: ThreadPoolExecutor | None = None
        self._cache: OrderedDict[int, Future] = OrderedDict()
        self._lock = threading.Lock()
        self.groups_read = 0  # row groups read from the file (a test counts them)
        # The last epoch's row-group order and each group's place in it.
        self._order_of: tuple[int, np.ndarray, dict[int, int]] = (-1, np.empty(0), {})
        self._read_ahead_of = (-1, -1)  # (epoch, window) whose next window was asked for
        self._block: _Block | None = None

    def __reduce__(self):  # travels as its source; threads and the open file stay home
        return ParquetRows, (self.source,)

    @property
    def feature_dtype(self) -> np.dtype:
        return np.dtype(self.source.dtype)

    def take(self, indices: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        groups = np.searchsorted(self._training_starts, indices, side="right") - 1
        if self._block is None or (self._block.first_row[groups] < 0).any():
            self._gather(groups, epoch)  # no reference to the old block is held meanwhile
        block = self._block
        assert block is not None
        rows = indices - self._training_starts[groups] + block.first_row[groups]
        return block.x[rows], block.y[rows]

    def _gather(self, groups: np.ndarray, epoch: int) -> None:
        """A new block: the row groups `groups` fall in (read now if need be) and those of the
        latest window among them that are already read, which the next micro-batches will
        want. The next window is then asked to be read ahead."""
        needed = [int(g) for g in np.unique(groups)]
        arrays = {g: self._group(g).result() for g in needed}
        order, position = self._epoch_order(epoch)
        latest = max(position[g] for g in needed) // SHUFFLE_WINDOW_GROUPS
        with self._lock:
            for group in order[latest * SHUFFLE_WINDOW_GROUPS:
                               (latest + 1) * SHUFFLE_WINDOW_GROUPS]:
                future = self._cache.get(int(group))
                if future is not None and future.done() and int(group) not in arrays:
                    arrays[int(group)] = future.result()
        self._read_ahead(latest, epoch)
        self._block = None  # the old block's memory goes before the new one's is taken
        first_row = np.full(len(self.source.group_rows), -1, dtype=np.int64)
        count = 0
        for group, (gx, _) in arrays.items():
            first_row[group], count = count, count + len(gx)
        # Column-major like each row group's features: a contiguous copy per column.
        x = np.concatenate([gx.T for gx, _ in arrays.values()], axis=1).T
        y = np.concatenate([gy for _, gy in arrays.values()])
        self._block = _Block(first_row, x, y)

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, dict[int, int]]:
        """The epoch's row-group order and each group's place in it (computed once an
        epoch)."""
        if self._order_of[0] != epoch:
            order = group_order(len(self.source.group_rows), self.source.seed, epoch,
                                self.source.shuffle)
            self._order_of = (epoch, order, {int(g): i for i, g in enumerate(order)})
        return self._order_of[1], self._order_of[2]

    def _group(self, group: int) -> Future:
        with self._lock:
            if group in self._cache:
                self._cache.move_to_end(group)
                return self._cache[group]
            if self._reads is None:
                self._reads = ThreadPoolExecutor(max_workers=1,
                                                 thread_name_prefix="parquet-read")
            future = self._reads.submit(self._read, group)
            self._cache[group] = future
            while len(self._cache) > self._capacity:
                self._cache.popitem(last=False)
            return future

    def _read(self, group: int) -> tuple[np.ndarray, np.ndarray]:
        if self._file is None:
            self._file = open_parquet(self.source.path)
        self.groups_read += 1
        return self.source.read_group(self._file, group)

    def _read_ahead(self, latest: int, epoch: int) -> None:
        """Start reading the window after window `latest` (in the epoch's row-group order; the
        next epoch's first window after the last)."""
        if self._read_ahead_of == (epoch, latest):  # asked for already
            return
        self._read_ahead_of = (epoch, latest)
        order, _ = self._epoch_order(epoch)
        with self._lock:  # the current window's groups outlive the older windows' in the cache
            for group in order[latest * SHUFFLE_WINDOW_GROUPS:
                               (latest + 1) * SHUFFLE_WINDOW_GROUPS]:
                if int(group) in self._cache:
                    self._cache.move_to_end(int(group))
        first = (latest + 1) * SHUFFLE_WINDOW_GROUPS
        if first >= len(order):
            order, first = group_order(len(order), self.source.seed, epoch + 1,
                                       self.source.shuffle), 0
        for group in order[first:first + SHUFFLE_WINDOW_GROUPS]:
            if self.source.training_per_group[int(group)]:
                self._group(int(group))


@dataclass(frozen=True)
class _Block:
    """The row groups a replica's micro-batches are gathered from, concatenated: taking a
    micro-batch is one gather, not one per row group (a micro-batch of a shuffled window
    draws from all of its row groups)."""

    first_row: np.ndarray  # of each row group of the file: its first row here, or -1
    x: np.ndarray
    y: np.ndarray
