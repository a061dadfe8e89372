"""Training throughput on a Parquet file against the same rows in memory (issue 10).

    python bench/parquet.py [--rows 60000] [--workers 2] [--epochs 2] [--rounds 5]

The same synthetic rows (64 float features, 10 classes) train the reference MLP 64-256-10 at
batch 256 twice on embedded Ray: once as arrays in the object store (the in-memory path), once
from a Parquet file of 2,000-row row groups that each worker reads a row group at a time
(worker/parquet_rows.py). Samples per second over every step after the first epoch's first
5 (start-up excluded), timed as the runner reports each step, the two paths alternated in the
same run. A busy machine slows whichever path runs while it is busy, so the ratio reported is
the median over rounds of each Parquet run against the in-memory run right after it (and the
best of each path against the other's best beside it). Where the Parquet path loses: the mean
of its steps at and just after a lane's row-group change (when the next row group's decode
begins) against the median of its other steps, and that excess as a share of its time.

Per worker: a fresh Ray worker process computes one epoch's gradients as worker 0 of
`--workers` would (the first contiguous block of every batch's micro-batches, as the runner
hands them out), from each source, and reports its peak RSS (ru_maxrss) beside the data's
size (the file, and the arrays the in-memory path puts in the object store, which a worker
maps whole), its CPU seconds after the first step (the reading thread's included: unlike
samples/s, hardly moved by a busy machine) and, for Parquet, the row groups it decoded.

Target: the Parquet path at >= 0.9x the in-memory path's samples/s on data that fits.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import ray

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from chainrule.spec_file import load_job_spec  # noqa: E402
from scheduler import ray_cluster  # noqa: E402
from scheduler.datasets import from_arrays, split_and_standardize  # noqa: E402
from scheduler.job_runner import JobRunner  # noqa: E402
from scheduler.parquet_dataset import load_parquet, parquet_shape  # noqa: E402
from scheduler.sampler import EpochSampler  # noqa: E402
from worker.replica import ModelReplica, ReplicaSetup  # noqa: E402
from worker.resolved_job import resolve  # noqa: E402

SPEC = """
model: {{layers: [{{linear: {{out_features: 256}}}}, {{relu: {{}}}},
                  {{linear: {{out_features: 10}}}}]}}
loss: cross_entropy
optimizer: {{adam: {{lr: 0.001}}}}
data: {{dataset: "{dataset}", label_column: label, batch_size: 256, epochs: {epochs},
       micro_batches: 4}}
seed: 1
"""
SKIPPED_STEPS = 5
GROUP_ROWS = 2000


def samples_per_second(runner: JobRunner) -> tuple[float, dict[int, float]]:
    """Samples over wall time between the step records after the first SKIPPED_STEPS, and
    those steps' durations (seconds, by step number: record to record)."""
    times: list[tuple[float, int, int]] = []
    runner.on_step = lambda record: times.append((time.perf_counter(), record.samples,
                                                  record.step))
    runner.run()
    measured = times[SKIPPED_STEPS:]
    durations = {step: now - before
                 for (before, _, _), (now, _, step) in zip(measured, measured[1:])}
    rate = sum(samples for _, samples, _ in measured[1:]) / (measured[-1][0] - measured[0][0])
    return rate, durations


def group_change_steps(sampler: EpochSampler, epochs: int) -> list[int]:
    """The steps (1-based, counted over the epochs) whose micro-batches draw from a row group
    that the step before did not: where a lane moves on, and its next row group's decode
    begins (worker/parquet_rows.py)."""
    starts = np.concatenate([[0], np.cumsum(sampler.row_groups)])
    changes, before = [], None
    for epoch in range(epochs):
        for samples in sampler.epoch(epoch):
            groups = set(np.searchsorted(starts, np.concatenate(samples.micro_batches),
                                         side="right") - 1)
            if before is not None and groups - before:
                changes.append(epoch * sampler.steps_per_epoch + samples.step_in_epoch + 1)
            before = groups
    return changes


def steps_after_changes(durations: list[dict[int, float]], changes: list[int],
                        following: int = 4) -> tuple[float, float, float]:
    """Over the Parquet runs: the mean duration of the steps within `following` steps of a
    row-group change, the median of the others, and the share of the runs' time that the
    first ones spent above that median."""
    near = {step + lag for step in changes for lag in range(following)}
    close = [d for run in durations for step, d in run.items() if step in near]
    others = [d for run in durations for step, d in run.items() if step not in near]
    typical = statistics.median(others)
    excess = sum(d - typical for d in close) / sum(close + others)
    return statistics.mean(close), typical, excess


@ray.remote(max_calls=1)  # a fresh worker process: its peak is this replica's alone
def first_worker_epoch(job, rows, row_groups, workers: int) -> tuple[int, float, int]:
    """(peak resident bytes, CPU seconds after the first step, row groups read) of a process
    computing worker 0's micro-batches of every step of epoch 0 from `rows`: the first
    round(M / workers) of each batch, the block the runner gives worker 0 of `workers`."""
    import resource

    replica = ModelReplica(ReplicaSetup(job, None), rows)
    destination = {slot.name: np.zeros(slot.shape, dtype=job.dtype)
                   for slot in replica.layout.slots}
    sampler = EpochSampler(job.training_samples, job.batch_size, job.micro_batches, job.seed,
                           row_groups=row_groups)
    block = round(job.micro_batches / workers)
    start = 0.0
    for step, samples in enumerate(sampler.epoch(0), start=1):
        if step == 2:  # after the first, which imports pyarrow and opens the file
            start = time.process_time()
        replica.compute(destination, list(enumerate(samples.micro_batches))[:block], step,
                        job.batch_size)
    seconds = time.process_time() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return peak, seconds, getattr(rows, "groups_read", 0)


def measure(rows: int, workers: int, epochs: int, rounds: int,
            parameter_servers: int | None = None, node: str | None = None) -> dict:
    """On the Ray instance connected to: samples/s of each path, round by round (`rounds`
    runs of `epochs` epochs of `rows` rows each); then worker 0's epoch from each source in a
    fresh process (on the node of id `node` when given): peak RSS, CPU seconds and row groups
    decoded. Also the data's sizes: the file and the in-memory arrays."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    rng = np.random.default_rng(0)
    x = rng.standard_normal((rows, 64))
    y = (x[:, :10].argmax(axis=1)).astype(np.int64)
    worker_epoch = first_worker_epoch
    if node is not None:
        worker_epoch = first_worker_epoch.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=False))
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "rows.parquet"
        pq.write_table(pa.table({**{f"f{i}": x[:, i] for i in range(64)}, "label": y}), path,
                       row_group_size=GROUP_ROWS)
        spec = load_job_spec(SPEC.format(dataset=f"parquet:{path}", epochs=epochs))
        job = resolve(spec, parquet_shape(spec.data, spec.seed), workers=workers,
                      parameter_servers=parameter_servers)
        memory_spec = load_job_spec(SPEC.format(dataset="memory", epochs=epochs)
                                    .replace("label_column: label, ", ""))
        dataset = split_and_standardize(from_arrays(x, y), 0.0, True, 1)
        memory_job = resolve(memory_spec, dataset.shape, workers=workers,
                             parameter_servers=parameter_servers)
        parquet_runs, memory_runs, parquet_steps = [], [], []
        for _ in range(rounds):
            rate, durations = samples_per_second(JobRunner(job, load_parquet(job)))
            parquet_runs.append(rate)
            parquet_steps.append(durations)
            memory_runs.append(samples_per_second(JobRunner(memory_job, dataset))[0])
        parquet_data = load_parquet(job)
        sampler = EpochSampler(job.training_samples, job.batch_size, job.micro_batches,
                               job.seed, row_groups=parquet_data.training_row_groups)
        after_changes = steps_after_changes(parquet_steps, group_change_steps(sampler, epochs))
        parquet_rss, parquet_cpu, groups_read = ray.get(worker_epoch.remote(
            job, parquet_data.training_rows(), parquet_data.training_row_groups, workers))
        memory_rss, memory_cpu, _ = ray.get(worker_epoch.remote(
            memory_job, dataset.training_rows(), (), workers))
        file_bytes = path.stat().st_size
    return {"parquet_runs": parquet_runs, "memory_runs": memory_runs,
            "parquet_rss": parquet_rss, "memory_rss": memory_rss,
            "parquet_cpu": parquet_cpu, "memory_cpu": memory_cpu, "groups_read": groups_read,
            "groups": -(-rows // GROUP_ROWS), "file_bytes": file_bytes,
            "after_changes": after_changes,
            "array_bytes": dataset.x.nbytes}


def report(figures: dict, workers: int) -> list[str]:
    """`measure`'s figures in words."""
    mib = 2 ** 20
    parquet, memory = figures["parquet_runs"], figures["memory_runs"]
    ratios = [p / m for p, m in zip(parquet, memory)]
    return [
        f"best runs: in memory {max(memory):,.0f} samples/s, Parquet {max(parquet):,.0f} "
        f"samples/s ({max(parquet) / max(memory):.2f})",
        f"Parquet / in memory, round by round: {', '.join(f'{r:.2f}' for r in ratios)}; "
        f"median {statistics.median(ratios):.2f} (target >= 0.9)",
        "Parquet steps within 4 of a lane's row-group change: {:.2f} ms on average, the others' "
        "median {:.2f} ms; the excess is {:.0%} of the Parquet runs' time".format(
            figures["after_changes"][0] * 1e3, figures["after_changes"][1] * 1e3,
            figures["after_changes"][2]),
        f"worker 0 of {workers} over an epoch: peak RSS Parquet "
        f"{figures['parquet_rss'] / mib:.0f} MiB (file {figures['file_bytes'] / mib:.1f} MiB, "
        f"{figures['groups']} row groups of {GROUP_ROWS:,} rows, {figures['groups_read']} "
        f"decoded), in memory {figures['memory_rss'] / mib:.0f} MiB (arrays "
        f"{figures['array_bytes'] / mib:.1f} MiB); CPU Parquet {figures['parquet_cpu']:.2f} s, "
        f"in memory {figures['memory_cpu']:.2f} s "
        f"({figures['parquet_cpu'] / figures['memory_cpu']:.2f}x)",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    load_at_start = os.getloadavg()[0]
    ray_cluster.connect(num_cpus=2)
    figures = measure(args.rows, args.workers, args.epochs, args.rounds)
    print(f"{args.rows} rows x 64 features, {args.workers} workers, batch 256; load average "
          f"{load_at_start:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print("\n".join(report(figures, args.workers)))


if __name__ == "__main__":
    main()
