"""Training on a Parquet file, on real embedded Ray: every replica reads only the row groups
of its own micro-batches, the weights do not depend on the worker count, and a worker's memory
is bounded by the batch, a few row groups and the file's footer, not by the file (measured in a
real Ray worker process computing real gradients, on a generated file many times larger). And
the data cursor each checkpoint keeps, for Parquet and in-memory data alike: across a crash, a
stop and a change of worker count, every sample is trained on once an epoch."""

import hashlib
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from sklearn.datasets import load_digits

from chainrule.spec_file import load_job_spec
from scheduler.checkpoint import Checkpoint, DataCursor
from scheduler.job_runner import JobRunner
from scheduler.parquet_dataset import load_parquet, parquet_shape
from scheduler.sampler import EpochSampler
from scheduler.storage import load_checkpoint, save_checkpoint
from scheduler.training import prepare_dataset, resolve_builtin_job
from worker.parquet_rows import ROW_GROUP_LANES, ROW_GROUPS_HELD
from worker.replica import ModelReplica, ReplicaSetup
from worker.resolved_job import resolve
from worker.training_rows import TrainingRows

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
    # What the reader holds once it has started: each lane's current and next row group
    # (float32), a row group being read (Arrow's float64 columns) and the batch. Before that,
    # opening the file costs its footer as Arrow holds it (every column chunk's metadata:
    # O(row groups x columns)) and the reading thread.
    group_bytes = GROUP_ROWS * FEATURES * 4
    held_bound = ROW_GROUPS_HELD * group_bytes + 2 * group_bytes + BATCH * FEATURES * 8
    mib = 2 ** 20
    print(f"\nParquet file {file_bytes / mib:.1f} MiB ({FILE_ROWS} rows, "
          f"{FILE_ROWS // GROUP_ROWS} row groups); worker peak RSS {peak / mib:.1f} MiB: "
          f"{(peak - before) / mib:.1f} MiB above its {before / mib:.1f} MiB before the first "
          f"step, {(peak - after_first) / mib:.1f} MiB above the first step's; the row groups' "
          f"bound {held_bound / mib:.1f} MiB")
    # Every lane moves on to a third row group: reading on does not grow, data is not kept.
    assert STEPS * BATCH // ROW_GROUP_LANES > 2 * GROUP_ROWS
    assert file_bytes >= 5 * (peak - before)
    assert peak - after_first <= held_bound


# --- the data cursor: every sample once an epoch across a crash, a stop and a resize ----------

CURSOR_SPEC = """
model: {{layers: [{{linear: {{out_features: 16}}}}, {{tanh: {{}}}},
                  {{linear: {{out_features: 10}}}}]}}
loss: cross_entropy
optimizer: {{adam: {{lr: 0.01}}}}
data: {{dataset: "{dataset}", {columns} batch_size: 128, epochs: 2,
       validation_fraction: 0.2, micro_batches: 4}}
checkpoint: {{interval_steps: 4}}
seed: 5
"""
CRASH_AT, STOP_AFTER = 10, 17  # of 2 epochs of 12 steps: a crash mid-interval, a stop mid-epoch


def sample_hash(x: np.ndarray, y) -> str:
    return hashlib.blake2b(x.tobytes() + np.asarray(y).tobytes(), digest_size=8).hexdigest()


@dataclass(frozen=True)
class RecordedRows:
    """A replica's training rows that append each sample they hand out, hashed, to a log file:
    what the replicas actually trained on, from whichever worker process."""

    rows: TrainingRows
    log: str

    @property
    def feature_dtype(self) -> np.dtype:
        return self.rows.feature_dtype

    def take(self, indices: np.ndarray, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        x, y = self.rows.take(indices, epoch)
        lines = "".join(f"{epoch} {sample_hash(xi, yi)}\n" for xi, yi in zip(x, y))
        append(self.log, lines)
        return x, y


def append(log: str, text: str) -> None:
    """One write in append mode: lines from several processes never interleave."""
    descriptor = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(descriptor, text.encode())
    finally:
        os.close(descriptor)


class RecordedDataset:
    """The data set as the runner sees it, its training rows recorded into `log`."""

    def __init__(self, dataset, log: str):
        self.dataset, self.log = dataset, log

    def __getattr__(self, name):
        return getattr(self.dataset, name)

    def training_rows(self) -> RecordedRows:
        return RecordedRows(self.dataset.training_rows(), self.log)


class Crash(Exception):
    """The process running the job dies (after the step it was in)."""


def recorded_run(job, dataset, log: Path, resume_from=None, crash_at=None,
                 stop_after=None) -> tuple[dict[int, list[str]], list[Checkpoint]]:
    """Train `job`, each step's samples recorded: ({step: the hashes of the samples it trained
    on}, the checkpoints written, read back from their files)."""
    checkpoints: list[Checkpoint] = []
    steps_done = [resume_from.step if resume_from is not None else 0]

    def on_step(record) -> None:
        steps_done[0] = record.step
        append(str(log), f"step {record.step}\n")  # after the step's samples: they are logged
        if record.step == crash_at:
            raise Crash

    def on_checkpoint(checkpoint: Checkpoint) -> None:
        path = save_checkpoint(log.parent / f"{log.stem}-{checkpoint.step}.npz", checkpoint)
        checkpoints.append(load_checkpoint(path))

    runner = JobRunner(job, RecordedDataset(dataset, str(log)), resume_from=resume_from,
                       on_step=on_step, on_checkpoint=on_checkpoint,
                       should_stop=lambda: stop_after is not None and steps_done[0] >= stop_after)
    try:
        runner.run()
    except Crash:
        pass
    per_step: dict[int, list[str]] = {}
    pending: list[str] = []
    for line in log.read_text().splitlines():
        if line.startswith("step "):
            per_step[int(line.split()[1])], pending = pending, []
        else:
            pending.append(line)
    return per_step, checkpoints


def cursor_jobs(source: str, digits_parquet):
    """({1: the job on 1 worker, 2: on 2}, its data set) of CURSOR_SPEC on `source`."""
    if source == "parquet":
        spec = load_job_spec(CURSOR_SPEC.format(dataset=f"parquet:{digits_parquet}",
                                                columns="label_column: digit,"))
        shape = parquet_shape(spec.data, spec.seed)
        jobs = {workers: resolve(spec, shape, workers=workers) for workers in (1, 2)}
        return jobs, load_parquet(jobs[1])
    spec = load_job_spec(CURSOR_SPEC.format(dataset="sklearn:digits", columns=""))
    jobs = {workers: resolve_builtin_job(spec, workers=workers) for workers in (1, 2)}
    return jobs, prepare_dataset(jobs[1])


def hashes_of_epoch(kept: dict[int, list[str]], epoch: int) -> Counter:
    return Counter(h for lines in kept.values() for line in lines
                   for e, h in [line.split()] if int(e) == epoch)


@pytest.mark.parametrize("source, interruption, workers", [
    ("in_memory", "crash", (2, 1)), ("parquet", "stop", (1, 2))])
def test_every_sample_is_trained_on_once_an_epoch_across_an_interruption_and_a_resize(
        local_ray, digits_parquet, tmp_path, source, interruption, workers):
    """A first run on one worker count is interrupted: a crash after step 10 (its checkpoint
    of step 8 on disk, steps 9 and 10 lost), or a stop after step 17 (mid-epoch, checkpointed
    there). A second run on the other worker count resumes from the checkpoint file to the end.
    The steps kept (the first run's up to the checkpoint, then the second's) trained on every
    training sample exactly once in each epoch, by the hashes of what the replicas read."""
    jobs, dataset = cursor_jobs(source, digits_parquet)
    job = jobs[1]
    assert job.steps_per_epoch == 12 and job.checkpoint_interval == 4
    if interruption == "crash":
        first, saved = recorded_run(jobs[workers[0]], dataset, tmp_path / "first.log",
                                    crash_at=CRASH_AT)
        assert max(first) == CRASH_AT
    else:
        first, saved = recorded_run(jobs[workers[0]], dataset, tmp_path / "first.log",
                                    stop_after=STOP_AFTER)
    resumed = saved[-1]
    at = resumed.step
    assert at == (8 if interruption == "crash" else STOP_AFTER)
    order = "permutation" if source == "in_memory" else "row_group_lanes(4)"
    assert resumed.data_cursor == DataCursor(at // 12, at % 12 * 128, job.training_samples, 5,
                                             order)
    second, _ = recorded_run(jobs[workers[1]], dataset, tmp_path / "second.log",
                             resume_from=resumed)
    kept = ({step: first[step] for step in range(1, at + 1)}
            | {step: second[step] for step in range(at + 1, 25)})
    assert sorted(kept) == list(range(1, 25)) and max(second) == 24
    x, y = dataset.training_rows().take(np.arange(job.training_samples), 0)
    every_sample = Counter(sample_hash(xi, yi) for xi, yi in zip(x, y))
    assert len(every_sample) == job.training_samples  # digits has no duplicate row
    assert hashes_of_epoch(kept, 0) == every_sample
    assert hashes_of_epoch(kept, 1) == every_sample
    assert all(int(line.split()[0]) == (step - 1) // 12 for step, lines in kept.items()
               for line in lines)


def test_a_checkpoint_whose_cursor_counts_in_other_data_is_refused_before_any_actor(
        digits_parquet):
    jobs, dataset = cursor_jobs("parquet", digits_parquet)
    job = jobs[1]
    cursor = DataCursor(0, 4 * 128, job.training_samples + 1, 5, "row_group_lanes(4)")
    stale = Checkpoint(4, np.zeros(1), 4, data_cursor=cursor)
    with pytest.raises(ValueError, match="the data set changed since"):
        JobRunner(job, dataset, resume_from=stale).run()
