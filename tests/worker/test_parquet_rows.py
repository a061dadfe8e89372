"""Reading a Parquet training split a row group at a time: the split, the order, the reader."""

import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from worker.parquet_rows import (
    SHUFFLE_WINDOW_GROUPS,
    ParquetRows,
    ParquetSource,
    group_order,
    held_out,
    windowed_order,
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


def test_the_windowed_order_visits_every_training_index_once_a_window_of_row_groups_at_a_time():
    counts = [10, 0, 7, 12, 9, 11, 3, 10, 8]
    starts = np.concatenate([[0], np.cumsum(counts)])
    order = windowed_order(counts, seed=1, epoch=2)
    assert sorted(order) == list(range(sum(counts)))
    groups = group_order(len(counts), 1, 2, True)
    at = 0
    for first in range(0, len(groups), SHUFFLE_WINDOW_GROUPS):
        window = groups[first:first + SHUFFLE_WINDOW_GROUPS]
        size = sum(counts[g] for g in window)
        owners = np.searchsorted(starts, order[at:at + size], side="right") - 1
        assert set(owners) <= set(window)
        at += size
    assert not np.array_equal(order, windowed_order(counts, seed=1, epoch=3))
    assert np.array_equal(windowed_order(counts, 1, 2, shuffle=False), np.arange(sum(counts)))


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
    # Row groups 2 and 3, then the next window of the epoch's order, read ahead.
    assert rows.groups_read <= 2 + SHUFFLE_WINDOW_GROUPS
    every = rows.take(np.arange(len(x_train)), epoch=0)
    np.testing.assert_allclose(every[0], x_train, rtol=1e-15)


def test_the_reader_travels_as_its_source_without_rows_or_open_files(parquet_file):
    path, _, _ = parquet_file
    rows = ParquetRows(source_of(path))
    rows.take(np.arange(500), epoch=0)
    copy = pickle.loads(pickle.dumps(rows))
    assert len(pickle.dumps(rows)) < 4096
    assert copy.groups_read == 0 and copy.source == rows.source
