"""What experiment tracking costs a job's thread: the tracking observers against writing
inline, and whether their writer threads keep up with a fast job.

    python bench/tracking.py [--steps 5000]

Each observer method runs on the job's thread between steps (scheduler/job_queue.py), so its
cost adds to every step. Timed per step, on real-shaped records (services/tracking/):
  1. TensorBoardFiles.job_step (queues the record) against its peer, tensorboardX's
     SummaryWriter writing the same four scalars on the calling thread;
  2. MlflowRuns.job_step (throttles, queues at most one step a second) against its peer,
     MlflowClient.log_batch of the same four metrics on the calling thread, into a real
     local sqlite store.
Then the TensorBoard writer thread's throughput: records written and flushed per second, which
must exceed the steps per second of a millisecond-step job (1000/s) for nothing to be dropped.

Target: each observer adds <= 1% to the demo job's 1.5 ms step (<= 15 us per step).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scheduler.records import StepRecord, StepTimings  # noqa: E402
from scheduler.storage import JobStorage  # noqa: E402
from services.tracking.tensorboard import TensorBoardFiles  # noqa: E402

DEMO_STEP_SECONDS = 0.0015
TARGET_SECONDS = 0.01 * DEMO_STEP_SECONDS


def record(step: int, total: int) -> StepRecord:
    return StepRecord(
        step=step, total_steps=total, epoch=1, samples=128, loss=1.0 / step, train_correct=64,
        learning_rate=1e-3, gradient_norm=0.5,
        parameter_gradient_norms={f"{layer}.{kind}": 0.1 for layer in (0, 3)
                                  for kind in ("weight", "bias")},
        timings=StepTimings(0.001, 0.0002, 0.0001, 0.0, 0.0002, DEMO_STEP_SECONDS, 0.0),
        bytes_sent_per_worker=40_000, bytes_received_per_worker=40_000, parameter_bytes=80_000,
        workers=2, worker_failures=0)


def per_call(call, records: list[StepRecord], rounds: int = 5) -> float:
    """Median over rounds of the mean seconds per call."""
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        for item in records:
            call(item)
        times.append((time.perf_counter() - started) / len(records))
    return statistics.median(times)


def bench_tensorboard(steps: int, folder: Path) -> tuple[float, float, float]:
    from tensorboardX import SummaryWriter

    records = [record(step, steps) for step in range(1, steps + 1)]
    files = TensorBoardFiles(JobStorage(folder / "ours"), queue_limit=10 * steps)
    files.job_state_changed("job-bench", "RUNNING")
    ours = per_call(lambda r: files.job_step("job-bench", r), records)
    assert files.dropped == 0, files.dropped

    # Throughput of the writer thread: queue a burst, time until it is on disk.
    burst = [record(step, steps) for step in range(steps + 1, 3 * steps + 1)]
    started = time.perf_counter()
    for item in burst:
        files.job_step("job-bench", item)
    assert files.flush(timeout=600)
    throughput = len(burst) / (time.perf_counter() - started)
    files.close()

    writer = SummaryWriter(str(folder / "peer"), flush_secs=120)

    def inline(r: StepRecord) -> None:
        writer.add_scalar("train/loss", r.loss, r.step)
        writer.add_scalar("train/samples_per_second", r.samples_per_second, r.step)
        writer.add_scalar("train/gradient_norm", r.gradient_norm, r.step)
        writer.add_scalar("train/learning_rate", r.learning_rate, r.step)

    peer = per_call(inline, records, rounds=3)
    writer.close()
    return ours, peer, throughput


def bench_mlflow(steps: int, folder: Path) -> tuple[float, float] | None:
    try:
        from mlflow.entities import Metric
    except ImportError:
        print("MLflow: not installed (pip install 'chainrule[tracking]'); skipped")
        return None
    from services.store import JobRecord
    from services.tracking.mlflow_runs import MlflowRuns, mlflow_client

    client = mlflow_client(f"sqlite:///{folder / 'mlflow.db'}")
    job = JobRecord(id="job-bench", tenant="bench", spec=_spec(), state="RUNNING",
                    created_at=time.time())
    runs = MlflowRuns(client, lambda job_id: job, artifact_location=str(folder / "artifacts"))
    runs.job_state_changed(job.id, "RUNNING")
    records = [record(step, 10 * steps) for step in range(1, steps + 1)]
    ours = per_call(lambda r: runs.job_step(job.id, r), records)
    runs.close(timeout=60)

    experiment = client.create_experiment("peer", artifact_location=str(folder / "peer"))
    run_id = client.create_run(experiment).info.run_id

    def inline(r: StepRecord) -> None:
        now = int(time.time() * 1000)
        client.log_batch(run_id, metrics=[
            Metric("train_loss", r.loss, now, r.step),
            Metric("samples_per_second", r.samples_per_second, now, r.step),
            Metric("gradient_norm", r.gradient_norm, now, r.step),
            Metric("learning_rate", r.learning_rate, now, r.step)])

    peer = per_call(inline, records[:200], rounds=1)  # milliseconds each: fewer calls
    return ours, peer


def _spec():
    from chainrule.spec_file import load_job_spec

    return load_job_spec(ROOT / "services" / "specs" / "digits-mlp.yaml")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=5000)
    args = parser.parse_args()
    ok = True
    with tempfile.TemporaryDirectory() as folder:
        ours, peer, throughput = bench_tensorboard(args.steps, Path(folder))
        print(f"TensorBoard: TensorBoardFiles.job_step {ours * 1e6:.2f} us per step; "
              f"SummaryWriter inline {peer * 1e6:.1f} us per step; ratio peer/ours "
              f"{peer / ours:.0f}x")
        print(f"TensorBoard: the writer thread writes {throughput:,.0f} steps/s "
              f"(a {DEMO_STEP_SECONDS * 1e3:g} ms-step job makes {1 / DEMO_STEP_SECONDS:,.0f})")
        ok &= ours <= TARGET_SECONDS and throughput >= 1 / DEMO_STEP_SECONDS
        mlflow = bench_mlflow(args.steps, Path(folder))
        if mlflow is not None:
            ours, peer = mlflow
            print(f"MLflow: MlflowRuns.job_step {ours * 1e6:.2f} us per step; log_batch "
                  f"inline (sqlite) {peer * 1e6:.0f} us per step; ratio peer/ours "
                  f"{peer / ours:.0f}x")
            ok &= ours <= TARGET_SECONDS
    print(f"target {'met' if ok else 'MISSED'}: each observer <= {TARGET_SECONDS * 1e6:.0f} us "
          f"per step (1% of a {DEMO_STEP_SECONDS * 1e3:g} ms step), and the TensorBoard writer "
          f"faster than the job")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
