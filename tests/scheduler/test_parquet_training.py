"""Training on a Parquet file, on real embedded Ray: every replica reads only the row groups
of its own micro-batches, the weights do not depend on the worker count, and a worker's memory
is bounded by the batch, a few row groups and the file's footer, not by the file (measured in a
real Ray worker process computing real gradients, on a generated file many times larger)."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from sklearn.datasets import load_digits

from chainrule.spec_file import load_job_spec
from scheduler.job_runner import JobRunner
from scheduler.parquet_dataset import load_parquet, parquet_shape
from scheduler.sampler import EpochSampler
from worker.parquet_rows import SHUFFLE_WINDOW_GROUPS
from worker.replica import ModelReplica, ReplicaSetup
from worker.resolved_job import resolve

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SPEC = """
name: parquet
model: {{layers: [{{linear: {{out_features: 32}}}}, {{tanh: {{}}}},
                  {{linear: {{out_features: 10}}}}]}}
loss: cross_entropy
optimizer: {{adamw: {{lr: 0.01}}}}
data: {{dataset: "parquet:{path}", label_column: digit, batch_size: 192, epochs: 2,
       validation_fraction: 0.2, micro_batches: 4}}
seed: 5
"""


@pytest.fixture(scope="module")
def digits_parquet(tmp_path_factory):
    """scikit-learn's digits as a Parquet file of 18 row groups of 100 rows."""
    x, y = load_digits(return_X_y=True)
    path = tmp_path_factory.mktemp("parquet") / "digits.parquet"
    pq.write_table(pa.table({**{f"pixel{i}": x[:, i] for i in range(64)}, "digit": y}), path,
                   row_group_size=100)
    return path


def prepared(path):
    spec = load_job_spec(SPEC.format(path=path))
    job = resolve(spec, parquet_shape(spec.data, spec.seed))
    return spec, load_parquet(job)


def train(path, workers, **options):
    spec, dataset = prepared(path)
    return JobRunner.for_spec(spec, dataset, workers=workers, **options).run()


@pytest.fixture(scope="module")
def one_worker(local_ray, digits_parquet):
    return train(digits_parquet, 1)


@pytest.mark.parametrize("workers, transport", [(2, "auto"), (4, "object_store")])
def test_two_and_four_workers_read_their_own_rows_and_give_bitwise_one_workers_weights(
        one_worker, digits_parquet, workers, transport):
    result = train(digits_parquet, workers, transport=transport)
    for key, value in one_worker.state_dict.items():
        assert np.array_equal(result.state_dict[key], value), key


def test_a_parquet_job_learns_and_uses_every_training_row_once_an_epoch(one_worker,
                                                                       digits_parquet):
    _, dataset = prepared(digits_parquet)
    per_epoch: dict[int, int] = {}
    for record in one_worker.history.steps:
        per_epoch[record.epoch] = per_epoch.get(record.epoch, 0) + record.samples
    assert per_epoch == {0: dataset.shape.samples, 1: dataset.shape.samples}
    assert one_worker.final_evaluation.accuracy > 0.85
    assert one_worker.validation_split.rule == "hashed_rows"


# --- memory: bounded by the batch, a few row groups and the file's footer, not the file ---

FEATURES, GROUP_ROWS, FILE_ROWS, BATCH, STEPS = 64, 2000, 300_000, 512, 32


def resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _warm_up_arrow(source) -> None:
    """Write and read back 2 rows of the data set's columns in memory: Arrow's code (its
    shared libraries' pages count as resident once run) is touched before the baseline, and
    no byte of the data set is read."""
    buffer = pa.BufferOutputStream()
    columns = [*source.feature_columns, source.label_column]
    pq.write_table(pa.table({name: np.zeros(2) for name in columns}), buffer)
    pq.ParquetFile(pa.BufferReader(buffer.getvalue())).read_row_group(0, use_threads=False)


@ray.remote(max_calls=1)  # a fresh worker process: its peak is this replica's alone
def replica_memory(job, rows, row_groups, steps):
    """(resident bytes before the first step, after it, peak after `steps` steps) of a replica
    computing the gradients of every micro-batch of the epoch's first steps."""
    import resource

    _warm_up_arrow(rows.source)
    replica = ModelReplica(ReplicaSetup(job, None), rows)
    destination = {slot.name: np.zeros(slot.shape, dtype=job.dtype)
                   for slot in replica.layout.slots}
    sampler = EpochSampler(job.training_samples, job.batch_size, job.micro_batches, job.seed,
                           row_groups=row_groups)
    before = resident_bytes()
    for step, samples in enumerate(sampler.epoch(0)[:steps], start=1):
        replica.compute(destination, list(enumerate(samples.micro_batches)), step,
                        job.batch_size)
        if step == 1:
            after_first = resident_bytes()
    return before, after_first, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def test_a_workers_memory_is_bounded_by_the_batch_and_a_few_row_groups_not_the_file(
        local_ray, tmp_path):
    rng = np.random.default_rng(0)
    path = tmp_path / "large.parquet"
    schema = pa.schema([*(pa.field(f"f{i}", pa.float64()) for i in range(FEATURES)),
                        pa.field("label", pa.int64())])
    with pq.ParquetWriter(path, schema) as writer:
        for _ in range(FILE_ROWS // (10 * GROUP_ROWS)):
            x = rng.standard_normal((10 * GROUP_ROWS, FEATURES))
            writer.write_table(pa.table({**{f"f{i}": x[:, i] for i in range(FEATURES)},
                                         "label": rng.integers(0, 10, len(x))}),
                               row_group_size=GROUP_ROWS)
    spec = load_job_spec(f"""
model: {{layers: [{{linear: {{out_features: 10}}}}]}}
loss: cross_entropy
optimizer: {{sgd: {{lr: 0.1}}}}
data: {{dataset: "parquet:{path}", label_column: label, batch_size: {BATCH}, epochs: 1,
       micro_batches: 4}}
""")
    job = resolve(spec, parquet_shape(spec.data, spec.seed))
    dataset = load_parquet(job)
    before, after_first, peak = ray.get(replica_memory.remote(
        job, dataset.training_rows(), dataset.training_row_groups, STEPS))
    file_bytes = os.path.getsize(path)
    # What the reader holds once it has started: the current and the next window of row
    # groups (float32), a row group being read (Arrow's float64 columns and their float64
    # copy) and the batch. Before that, opening the file costs its footer as Arrow holds it
    # (every column chunk's metadata: O(row groups x columns)) and the reading thread.
    group_bytes = GROUP_ROWS * FEATURES * 4
    window_bound = (2 * SHUFFLE_WINDOW_GROUPS * group_bytes + 2 * 2 * group_bytes
                    + BATCH * FEATURES * 8)
    mib = 2 ** 20
    print(f"\nParquet file {file_bytes / mib:.1f} MiB ({FILE_ROWS} rows, "
          f"{FILE_ROWS // GROUP_ROWS} row groups); worker peak RSS {peak / mib:.1f} MiB: "
          f"{(peak - before) / mib:.1f} MiB above its {before / mib:.1f} MiB before the first "
          f"step, {(peak - after_first) / mib:.1f} MiB above the first step's; the windows' "
          f"bound {window_bound / mib:.1f} MiB")
    assert STEPS * BATCH > 2 * SHUFFLE_WINDOW_GROUPS * GROUP_ROWS  # the steps cross windows
    assert file_bytes >= 5 * (peak - before)
    assert peak - after_first <= window_bound  # reading on does not grow: data is not kept
