"""Reading a Parquet training split a row group at a time: the split, the order, the reader."""

import pickle
import threading
from dataclasses import dataclass, field, fields

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from chainrule.spec_file import load_job_spec
from scheduler.parquet_dataset import load_parquet, parquet_shape
from scheduler.sampler import EpochSampler
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
from worker.replica import ModelReplica, ReplicaSetup
from worker.resolved_job import resolve

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


# --- when the next row group of a lane is read ------------------------------------------------


@dataclass(frozen=True)
class HeldSource(ParquetSource):
    """Its reads wait while `release` is clear: a read stays under way as long as a test
    needs it to."""

    release: threading.Event = field(default_factory=threading.Event)

    def read_group(self, parquet_file, group):
        assert self.release.wait(timeout=60), "the test never released the read"
        return super().read_group(parquet_file, group)


def lane_starts(source, epoch=0):
    """Each lane's row groups of `epoch`, and where each row group's training indices
    start."""
    lanes = lane_groups(source.training_per_group, source.seed, epoch)
    starts = np.concatenate([[0], np.cumsum(source.training_per_group)])
    return lanes, starts


def test_lane_l_asks_for_its_next_row_group_once_it_has_taken_2l_plus_1_sixteenths_of_it(
        parquet_file):
    """Lanes of equal row groups move on at the same step: asking for their next row groups
    at different points of the first half of the current ones spreads the decoding over the
    steps, and leaves every read half a row group's steps."""
    path, _, _ = parquet_file
    source = source_of(path)
    rows = ParquetRows(source)
    lanes, starts = lane_starts(source)
    for lane, (current, following, *_) in enumerate(lanes):
        size = source.training_per_group[current]
        wanted = size * (2 * lane + 1) // (4 * ROW_GROUP_LANES)  # before the next is asked
        assert wanted >= 2  # else this source's row groups are too small to tell
        rows.take(np.arange(starts[current], starts[current] + wanted - 1), epoch=0)
        assert following not in rows.reads_due, (lane, wanted)
        rows.take(np.arange(starts[current] + wanted - 1, starts[current] + wanted + 1),
                  epoch=0)
        assert rows.reads_due[-1] == following, lane
    assert rows.reads_due == tuple(lane[1] for lane in lanes)
    assert rows.groups_read == ROW_GROUP_LANES  # the current ones: nothing read ahead yet


def test_a_read_ahead_starts_after_a_steps_compute_one_at_a_time_and_serves_the_lane(
        parquet_file):
    path, _, _ = parquet_file
    plain = source_of(path)
    source = HeldSource(**{f.name: getattr(plain, f.name) for f in fields(plain)})
    rows = ParquetRows(source)
    lanes, starts = lane_starts(source)
    (first, first_next, first_third, *_), (second, second_next, *_) = lanes[:2]
    source.release.set()
    rows.take(np.arange(starts[first], starts[first] + 2), epoch=0)
    rows.take(np.arange(starts[second], starts[second + 1]), epoch=0)  # all of it
    assert rows.reads_due == (first_next, second_next) and rows.groups_read == 2
    source.release.clear()
    rows.read_ahead()  # a step's block is computed: the oldest due starts
    rows.read_ahead()  # ... and the other waits while that read is under way
    assert rows.reads_due == (second_next,) and rows.groups_held == 3  # 2 read, 1 under way
    source.release.set()
    # Lane 0 moves on to its read-ahead row group, and takes a sixteenth of it.
    taken = np.arange(starts[first_next], starts[first_next] + 3)
    features, _ = rows.take(taken, epoch=0)  # waits for the read
    assert rows.groups_read == 3  # read ahead, not again
    assert rows.reads_due == (second_next, first_third)
    expected, _ = ParquetRows(plain).take(taken, epoch=0)
    np.testing.assert_array_equal(features, expected)
    rows.read_ahead()
    # Lane 0's first row group was dropped when it moved on.
    assert rows.reads_due == (first_third,) and rows.groups_held == 3
    rows.take(np.array([starts[second_next]]), epoch=0)
    assert rows.groups_read == 4


def test_a_replica_starts_the_read_ahead_once_its_block_is_computed(parquet_file):
    path, _, _ = parquet_file
    spec = load_job_spec(f"""
model: {{layers: [{{linear: {{out_features: 4}}}}]}}
loss: cross_entropy
optimizer: {{sgd: {{lr: 0.1}}}}
data: {{dataset: "parquet:{path}", label_column: label, batch_size: 32, epochs: 1,
       validation_fraction: 0.2, micro_batches: 4}}
seed: 3
""")
    job = resolve(spec, parquet_shape(spec.data, spec.seed))
    dataset = load_parquet(job)
    rows = dataset.training_rows()
    replica = ModelReplica(ReplicaSetup(job, None), rows, owns_process=False)
    destination = {slot.name: np.zeros(slot.shape, dtype=job.dtype)
                   for slot in replica.layout.slots}
    sampler = EpochSampler(job.training_samples, job.batch_size, job.micro_batches, job.seed,
                           row_groups=dataset.training_row_groups)
    first_step = sampler.epoch(0)[0]
    lanes = lane_groups(dataset.training_row_groups, job.seed, 0)
    # Lane 0's micro-batch: its row group's next is due as soon as it is taken from.
    replica.compute(destination, [(0, first_step.micro_batches[0])], 1, job.batch_size)
    assert rows.reads_due == () and rows.groups_held == 2  # lane 0's first, and its next
    rows.take(np.array([sum(dataset.training_row_groups[:lanes[0][1]])]), epoch=0)
    assert rows.groups_read == 2  # the next was read ahead
