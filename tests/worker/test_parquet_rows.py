"""Reading a Parquet training split a row group at a time: the split, the order, the reader."""

import pickle
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from worker.parquet_rows import (
    ROW_GROUP_LANES,
    ROW_GROUPS_HELD,
    ParquetRows,
    ParquetSource,
    held_out,
    lane_groups,
    lane_order,
    lane_parts,
)

ROWS, GROUP = 1000, 50


@pytest.fixture(scope="module")
def parquet_file(tmp_path_factory):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((ROWS, 3))
    y = rng.integers(0, 4, ROWS)
    path = tmp_path_factory.mktemp("rows") / "rows.parquet"
    pq.write_table(pa.table({"a": x[:, 0], "b": x[:, 1], "c": x[:, 2], "label": y}), path,
                   row_group_size=GROUP)
    return str(path), x, y


def source_of(path, fraction=0.2, seed=3, mean=None, std=None):
    groups = (GROUP,) * (ROWS // GROUP)
    training = tuple(GROUP - int(held_out(g * GROUP, GROUP, seed, fraction).sum())
                     for g in range(len(groups)))
    return ParquetSource(path, ("a", "b", "c"), "label", False, "float64", mean, std, seed,
                         fraction, groups, training)


def test_a_rows_split_depends_on_its_position_alone_not_on_how_the_rows_are_cut():
    whole = held_out(0, 1000, 7, 0.25)
    parts = np.concatenate([held_out(0, 300, 7, 0.25), held_out(300, 700, 7, 0.25)])
    assert np.array_equal(whole, parts)
    assert 0.2 < whole.mean() < 0.3
    assert not np.array_equal(whole, held_out(0, 1000, 8, 0.25))  # the seed chooses
    assert not held_out(0, 1000, 7, 0.0).any()


def batches_of(samples, batch_size, micro_batches):
    """Each batch's micro-batch sizes, cut as the sampler cuts them (array_split)."""
    return [[len(part) for part in np.array_split(np.arange(min(batch_size, samples - lo)),
                                                  micro_batches)]
            for lo in range(0, samples, batch_size)]


def test_a_batch_is_cut_into_one_part_per_lane_along_its_micro_batches():
    assert ROW_GROUP_LANES == 4
    assert lane_parts([64, 64, 64, 64]) == [64, 64, 64, 64]
    assert lane_parts([32] * 8) == [64, 64, 64, 64]  # two micro-batches a lane
    assert lane_parts([128, 128]) == [64, 64, 64, 64]  # two lanes a micro-batch
    assert lane_parts([86, 85, 85]) == [86, 85, 43, 42]  # whole micro-batches or parts of one
    assert lane_parts([3]) == [1, 1, 1, 0]
    assert lane_parts([0, 0, 0, 0]) == [0, 0, 0, 0]


def test_the_lane_order_uses_every_training_index_once_each_batch_part_from_its_lanes_groups():
    counts = [10, 0, 7, 12, 9, 11, 3, 10, 8, 12, 9, 10]
    starts = np.concatenate([[0], np.cumsum(counts)])
    batches = batches_of(sum(counts), 8, 4)
    order = lane_order(counts, seed=1, epoch=2, batches=batches)
    assert sorted(order) == list(range(sum(counts)))
    lanes = lane_groups(counts, 1, 2)
    assert sorted(g for lane in lanes for g in lane) == [g for g in range(12) if counts[g]]
    lane_rows = [sum(counts[g] for g in lane) for lane in lanes]
    assert max(lane_rows) - min(lane_rows) <= max(counts)  # dealt to the emptiest lane
    # Every lane gives 2 rows a batch: until the first runs dry, each part is its lane's.
    at = 0
    for sizes in batches[:min(lane_rows) // 2]:
        for lane, part in enumerate(lane_parts(sizes)):
            owners = np.searchsorted(starts, order[at:at + part], side="right") - 1
            assert set(owners) <= set(lanes[lane])
            at += part
    assert not np.array_equal(order, lane_order(counts, seed=1, epoch=3, batches=batches))
    with pytest.raises(ValueError, match="batches of 90 samples, but 101 training rows"):
        lane_order(counts, 1, 2, batches_of(90, 8, 4))


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_each_worker_reads_about_its_share_of_the_row_groups_holding_a_few_at_a_time(
        parquet_file, workers):
    """A worker computes a contiguous run of every batch's micro-batches (block w of N), so it
    reads its lanes' row groups: about 1/N of them an epoch, not all (plus, near the epoch's
    end, a few whose lane ran dry, and its lanes' first of the next epoch, read ahead)."""
    path, _, _ = parquet_file
    source = source_of(path)
    samples, groups = sum(source.training_per_group), len(source.group_rows)
    batches = batches_of(samples, 32, 4)
    order = lane_order(source.training_per_group, source.seed, 0, batches)
    readers = [ParquetRows(source) for _ in range(workers)]
    at = 0
    for sizes in batches:
        bounds = np.concatenate([[0], np.cumsum(sizes)]) + at
        for micro_batch in range(4):
            reader = readers[micro_batch * workers // 4]
            reader.take(order[bounds[micro_batch]:bounds[micro_batch + 1]], epoch=0)
            assert reader.groups_held <= ROW_GROUPS_HELD
        at += sum(sizes)
    # Its share, its lanes' first row groups of the next epoch, and at most 3 whose lanes
    # ran dry (every worker read all 20 when a batch drew from a shuffled window of groups).
    share = groups // workers
    assert all(reader.groups_read <= share + 2 * ROW_GROUP_LANES // workers + 3
               for reader in readers), [reader.groups_read for reader in readers]


def test_taken_rows_are_the_files_training_rows_standardised_reading_only_their_row_groups(
        parquet_file):
    path, x, y = parquet_file
    mean, std = np.array([0.5, -1.0, 2.0]), np.array([2.0, 4.0, 0.5])
    source = source_of(path, mean=mean, std=std)
    training = ~held_out(0, ROWS, source.seed, source.validation_fraction)
    x_train, y_train = (x[training] - mean) / std, y[training]
    rows = ParquetRows(source)
    starts = np.concatenate([[0], np.cumsum(source.training_per_group)])
    indices = np.array([starts[3] + 1, starts[2], starts[3] + 4])  # row groups 2 and 3 only
    features, labels = rows.take(indices, epoch=0)
    np.testing.assert_allclose(features, x_train[indices], rtol=1e-15)
    assert np.array_equal(labels, y_train[indices]) and labels.dtype == np.int64
    # Row groups 2 and 3, then the next of each in its lane, read ahead.
    assert rows.groups_read <= 4
    every = rows.take(np.arange(len(x_train)), epoch=0)
    np.testing.assert_allclose(every[0], x_train, rtol=1e-15)


def test_the_reader_travels_as_its_source_without_rows_or_open_files(parquet_file):
    path, _, _ = parquet_file
    rows = ParquetRows(source_of(path))
    rows.take(np.arange(500), epoch=0)
    copy = pickle.loads(pickle.dumps(rows))
    assert len(pickle.dumps(rows)) < 4096
    assert copy.groups_read == 0 and copy.source == rows.source


@dataclass(frozen=True)
class FlakySource(ParquetSource):
    """Its first read of each row group fails, as a read from S3 can for a moment."""

    failed: set = field(default_factory=set)

    def read_group(self, parquet_file, group):
        if group not in self.failed:
            self.failed.add(group)
            raise OSError(f"row group {group}: connection reset")
        return super().read_group(parquet_file, group)


def test_a_failed_row_group_read_is_not_kept_and_the_retry_reads_it_again(parquet_file):
    path, _, _ = parquet_file
    plain = source_of(path)
    rows = ParquetRows(FlakySource(**{f.name: getattr(plain, f.name) for f in fields(plain)}))
    with pytest.raises(OSError, match="connection reset"):
        rows.take(np.arange(5), epoch=0)
    features, _ = rows.take(np.arange(5), epoch=0)  # the step retried: row group 0 read anew
    expected, _ = ParquetRows(plain).take(np.arange(5), epoch=0)
    np.testing.assert_array_equal(features, expected)
