"""A Parquet data set read in row groups, never whole: the split, the order and the reader.

The three rules every process must agree on, functions of the spec alone (never of the worker
count):

- Validation split (`held_out`): row r (0-based, in file order) is held out when
  splitmix64(r + seed * 2**32 + 0x5B17) < validation_fraction * 2**64. A hash per row, so the
  split needs no pass over the data and no permutation of every row, and a row group's split
  is known from its first row and length alone.
- Training order (`lane_order`): each epoch the row groups in a seeded order are dealt into
  ROW_GROUP_LANES lanes (`lane_groups`: each to the lane with the fewest rows so far), the rows
  of each row group in a seeded order. Every batch is cut into one contiguous part per lane
  along its micro-batches (`lane_parts`), and each part takes the next rows of its lane. A
  batch then draws from ROW_GROUP_LANES row groups, a quarter from each; and since a worker
  computes a contiguous run of every batch's micro-batches, it reads only the row groups of
  the lanes its run overlaps. A row group is decoded by one worker when the workers' runs end
  where lanes end (1, 2 or 4 workers on a multiple of 4 micro-batches, say); a lane that two
  workers' runs share (3 workers, or more than 4) has its row groups decoded by each. A lane
  that runs dry near the end of an epoch takes the rows of the lane with the most left.
- Training index i: the i-th training row of the file, counting row groups in file order.

`ParquetRows` is what a replica holds: where the file is and how to turn a row group into
standardised features. It reads a row group when a step first needs it and, by one thread,
the next row group of that lane ahead of time: after a step's compute (so the decode overlaps
the worker's wait for the shards, not its compute), one at a time, and lane l's once it has
taken (2l + 1) / (4 ROW_GROUP_LANES) of its current row group (so lanes that move on
together do not decode together). It drops a row group when its lane moves on. It keeps at
most ROW_GROUPS_HELD row groups (each lane's current and next), so a worker's memory is
bounded by the batch and a few row groups, not the file.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

ROW_GROUP_LANES = 4  # the row groups a batch draws from at a time
ROW_GROUPS_HELD = 2 * ROW_GROUP_LANES  # by one reader: each lane's current and next
_SPLIT_STREAM = 0x5B17  # the same stream as the in-memory split's (scheduler/datasets.py)
_ORDER_STREAM = 0x0DE5  # keeps the row-group order apart from every other use of the seed
_MASK64 = (1 << 64) - 1
CONVERTED_COLUMNS_BYTES = 256 * 1024  # float64 columns standardised at a time (read_group)


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


def lane_groups(training_per_group: Sequence[int], seed: int,
                epoch: int) -> tuple[tuple[int, ...], ...]:
    """Epoch `epoch`'s row groups dealt into ROW_GROUP_LANES lanes, in `group_order`: each to
    the lane with the fewest training rows so far (the first of them on a tie), so the lanes
    run dry at about the same time. Row groups without training rows are left out."""
    lanes: list[list[int]] = [[] for _ in range(ROW_GROUP_LANES)]
    rows = [0] * ROW_GROUP_LANES
    for group in group_order(len(training_per_group), seed, epoch, True):
        count = int(training_per_group[group])
        if count:
            lane = rows.index(min(rows))
            lanes[lane].append(int(group))
            rows[lane] += count
    return tuple(tuple(lane) for lane in lanes)


def lane_parts(micro_batch_sizes: Sequence[int]) -> list[int]:
    """How many rows of a batch each lane gives, in lane order: lane l fills a contiguous part
    of the batch. With M >= ROW_GROUP_LANES micro-batches, micro-batch j is lane
    j * LANES // M's; with fewer, micro-batch j is shared by lanes [j * LANES // M,
    (j + 1) * LANES // M). A part is thus whole micro-batches (or a micro-batch is whole
    parts): a worker's contiguous run of micro-batches is a run of lanes."""
    sizes, lanes = list(micro_batch_sizes), ROW_GROUP_LANES
    parts = [0] * lanes
    if len(sizes) >= lanes:
        for j, size in enumerate(sizes):
            parts[j * lanes // len(sizes)] += size
        return parts
    for j, size in enumerate(sizes):
        shared = range(j * lanes // len(sizes), (j + 1) * lanes // len(sizes))
        for k, lane in enumerate(shared):
            parts[lane] = size // len(shared) + (1 if k < size % len(shared) else 0)
    return parts


def lane_order(training_per_group: Sequence[int], seed: int, epoch: int,
               batches: Sequence[Sequence[int]]) -> np.ndarray:
    """Epoch `epoch`'s order of the training indices, for batches cut into micro-batches of
    these sizes (`batches`: each batch's micro-batch sizes, summing to the training rows):
    each batch's `lane_parts` taken in turn from the lanes of `lane_groups`, each row group's
    rows in a seeded order."""
    counts = np.asarray(training_per_group, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(counts)])
    rng = np.random.default_rng([seed, epoch, _ORDER_STREAM])
    rows_of = {int(g): starts[g] + rng.permutation(counts[g])  # group_order's draw comes first
               for g in rng.permutation(len(counts))}
    lanes = [np.concatenate([rows_of[g] for g in lane]) if lane else starts[:0]
             for lane in lane_groups(training_per_group, seed, epoch)]
    taken = [0] * len(lanes)
    parts: list[np.ndarray] = []
    for sizes in batches:
        for lane, wanted in enumerate(lane_parts(sizes)):
            while wanted:
                source = lane
                if taken[lane] == len(lanes[lane]):  # dry: the lane with the most rows left
                    left = [len(rows) - used for rows, used in zip(lanes, taken)]
                    source = left.index(max(left))
                    if not left[source]:
                        raise ValueError(f"batches of {sum(map(sum, batches))} samples, but "
                                         f"{int(starts[-1])} training rows")
                count = min(wanted, len(lanes[source]) - taken[source])
                parts.append(lanes[source][taken[source]:taken[source] + count])
                taken[source] += count
                wanted -= count
    order = np.concatenate(parts) if parts else starts[:0]
    if len(order) != starts[-1]:
        raise ValueError(f"batches of {len(order)} samples, but {int(starts[-1])} training rows")
    return order


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
        as in-memory data sets are) and in the job's dtype. The features are row-major, as in
        memory, so a micro-batch's gather copies whole rows (a third of the time of gathering
        them from Parquet's columns, at every micro-batch, for one transposed write here).
        The columns are converted CONVERTED_COLUMNS_BYTES of float64 at a time, so there is no
        float64 matrix-sized temporary (those cost more than Arrow's decoding, in page
        faults); the validation rows are dropped last, from the job's dtype."""
        table = self._read_table(parquet_file, group)
        validation = held_out(int(sum(self.group_rows[:group])), table.num_rows, self.seed,
                              self.validation_fraction)
        kept = np.flatnonzero(~validation) if validation.any() else None
        rows, columns = table.num_rows, len(self.feature_columns)
        features = np.empty((rows, columns), dtype=self.dtype)
        per_block = max(1, min(columns, CONVERTED_COLUMNS_BYTES // (8 * max(1, rows))))
        block = np.empty((per_block, rows))
        mean, std = self.feature_mean, self.feature_std
        for lo in range(0, columns, per_block):
            hi = min(columns, lo + per_block)
            for j in range(lo, hi):
                # Checked for missing values only: load_parquet's pass, which reads every
                # value of the file before any worker starts, refused NaN and infinities.
                values = _column(table, self.feature_columns[j], group, finite=False)
                if mean is None:
                    np.copyto(block[j - lo], values)
                else:  # (x - mean) / std in float64, as in memory: the copy subtracts
                    np.subtract(values, mean[j], out=block[j - lo], dtype=np.float64)
            if std is None:
                features[:, lo:hi] = block[:hi - lo].T
            else:  # the write into the job's dtype divides
                np.divide(block[:hi - lo].T, std[lo:hi], out=features[:, lo:hi],
                          dtype=np.float64)
        if kept is not None:  # whole rows at once: a tenth of the time of column by column
            features = features[kept]
        labels = _column(table, self.label_column, group, finite=False)
        return features, self.targets(labels if kept is None else labels[kept])

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
        # Opened on first use, in the process that reads (a replica's actor).
        self._file = None
        self._reads: ThreadPoolExecutor | None = None
        self._cache: OrderedDict[int, Future] = OrderedDict()  # least recently used first
        self._lock = threading.Lock()
        self.groups_read = 0  # row groups read from the file (a test counts them)
        self._lanes: dict[int, _Lanes] = {}  # of the last few epochs
        self._due: list[int] = []  # row groups to read ahead, oldest first (read_ahead)

    def __reduce__(self):  # travels as its source; threads and the open file stay home
        return ParquetRows, (self.source,)

    @property
    def feature_dtype(self) -> np.dtype:
        return np.dtype(self.source.dtype)

    @property
    def groups_held(self) -> int:
        """Row groups held now, read or being read (at most ROW_GROUPS_HELD)."""
        return len(self._cache)

    @property
    def reads_due(self) -> tuple[int, ...]:
        """The row groups that `read_ahead` will read, oldest first."""
        return tuple(self._due)

    def take(self, indices: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        indices = np.asarray(indices, dtype=np.int64)
        groups = np.searchsorted(self._training_starts, indices, side="right") - 1
        first = int(groups.min())
        needed = [first] if first == groups.max() else [int(g) for g in np.unique(groups)]
        reads = {g: self._group(g) for g in needed}
        rows = indices - self._training_starts[groups]
        if len(needed) == 1:  # a micro-batch within one row group: one gather
            x, y = reads[needed[0]].result()
            x, y = x[rows], y[rows]
            taken = {needed[0]: len(indices)}
        else:
            x = y = None
            taken = {}
            for group, future in reads.items():
                gx, gy = future.result()
                if x is None or y is None:
                    x = np.empty((len(indices), gx.shape[1]), dtype=gx.dtype)
                    y = np.empty((len(indices), *gy.shape[1:]), dtype=gy.dtype)
                mine = groups == group
                x[mine], y[mine] = gx[rows[mine]], gy[rows[mine]]
                taken[group] = int(np.count_nonzero(mine))
            assert x is not None and y is not None  # a micro-batch has rows
        self._follow_lanes(taken, epoch)
        return x, y

    def read_ahead(self) -> None:
        """Start the oldest read ahead that is due, unless a read is under way: called once a
        step's block is computed (worker/replica.py), so that a row group decodes while the
        worker waits for the shards and the next command, not beside its compute on a machine
        whose cores the step keeps busy. One at a time: the lanes that move on at the same
        step have their next row groups read over the steps after, not all at once."""
        with self._lock:
            if not self._due or any(not read.done() for read in self._cache.values()):
                return
            group = self._due.pop(0)
        self._group(group)

    def _follow_lanes(self, taken: dict[int, int], epoch: int) -> None:
        """`taken`: the rows just taken from each row group. When a lane first takes from a
        row group this epoch, it has moved on: the row group before it in its lane is dropped
        (a lane reads its rows in order, so they are all used: only a recomputed micro-batch
        would read it again). Once lane l has taken (2l + 1) / (4 ROW_GROUP_LANES) of a row
        group's rows (1/16, 3/16, 5/16, 7/16), the row group after it is due to be read ahead
        (`read_ahead`): lanes that move on at the same step, as lanes of equal row groups do,
        have their next row groups read at different steps, on every worker (each computes a
        run of the lanes), none at the step that moves on (which already takes from two row
        groups and drops one), and every read has at least half of a row group's steps to
        finish in, on a busy machine too."""
        lanes = self._lanes_of(epoch)
        for group, count in taken.items():
            entering = group not in lanes.taken
            lanes.taken[group] = lanes.taken.get(group, 0) + count
            if group in lanes.followed:  # the lane's next row group is due or read already
                continue
            lane, _ = lanes.place[group]
            previous, following = self._neighbours(group, epoch)
            if entering and previous is not None:
                with self._lock:
                    self._cache.pop(previous, None)
            stagger = (self.source.training_per_group[group] * (2 * lane + 1)
                       // (4 * len(lanes.groups)))
            if lanes.taken[group] < stagger:
                continue
            lanes.followed.add(group)
            with self._lock:
                if (following is not None and following not in self._cache
                        and following not in self._due):
                    self._due.append(following)
                    del self._due[:-ROW_GROUP_LANES]  # a bound, whatever the caller does

    def _neighbours(self, group: int, epoch: int) -> tuple[int | None, int | None]:
        """The row groups before and after `group` in its lane of epoch `epoch`; across an
        epoch's end, the same lane's last of the epoch before and first of the next."""
        lanes = self._lanes_of(epoch)
        lane, at = lanes.place[group]
        previous = following = None
        if at > 0:
            previous = lanes.groups[lane][at - 1]
        elif epoch > 0 and self._lanes_of(epoch - 1).groups[lane]:
            previous = self._lanes_of(epoch - 1).groups[lane][-1]
        if at + 1 < len(lanes.groups[lane]):
            following = lanes.groups[lane][at + 1]
        elif self._lanes_of(epoch + 1).groups[lane]:
            following = self._lanes_of(epoch + 1).groups[lane][0]
        return previous, following

    def _lanes_of(self, epoch: int) -> _Lanes:
        if epoch not in self._lanes:
            source = self.source
            if source.shuffle:
                groups = lane_groups(source.training_per_group, source.seed, epoch)
            else:  # file order: one lane
                groups = (tuple(g for g, count in enumerate(source.training_per_group)
                                if count),)
            place = {g: (lane, at) for lane, members in enumerate(groups)
                     for at, g in enumerate(members)}
            self._lanes[epoch] = _Lanes(groups, place, {}, set())
            for old in [e for e in self._lanes if e < epoch - 1]:
                del self._lanes[old]
        return self._lanes[epoch]

    def _group(self, group: int) -> Future:
        with self._lock:
            if group in self._due:  # wanted now: read on demand
                self._due.remove(group)
            held = self._cache.get(group)
            # A failed read (S3 unreachable for a moment, say) is not served again: the step
            # that retries, or recomputes a lost worker's micro-batches, reads it anew.
            if held is not None and not (held.done() and held.exception() is not None):
                self._cache.move_to_end(group)
                return held
            if self._reads is None:
                self._reads = ThreadPoolExecutor(max_workers=1,
                                                 thread_name_prefix="parquet-read")
            future = self._reads.submit(self._read, group)
            self._cache[group] = future
            self._cache.move_to_end(group)  # in place of a failed read, if there was one
            while len(self._cache) > ROW_GROUPS_HELD:  # a bound, whatever the lanes do
                self._cache.popitem(last=False)
            return future

    def _read(self, group: int) -> tuple[np.ndarray, np.ndarray]:
        if self._file is None:
            self._file = open_parquet(self.source.path)
        self.groups_read += 1
        try:
            return self.source.read_group(self._file, group)
        except Exception:
            self._file = None  # its connection may be what failed: the next read opens anew
            raise


@dataclass(frozen=True)
class _Lanes:
    """One epoch's lanes (lane_groups), each row group's (lane, place in it), the rows a
    replica has taken from each row group, and the row groups whose next one it has asked
    to read ahead."""

    groups: tuple[tuple[int, ...], ...]
    place: dict[int, tuple[int, int]]
    taken: dict[int, int]  # rows taken from each row group so far (_follow_lanes)
    followed: set[int]  # the row groups whose next in their lane is due or read
