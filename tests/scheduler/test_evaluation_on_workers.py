"""The runner's validation runs on the job's workers, in batches (issue 11): not one forward
pass over the whole split in the runner's process (the service's). Real Ray; the figures equal
that one pass on the same weights. Its wait has heartbeats, as a step's does: a worker lost
before an evaluation is found there, in seconds, and dropped once."""

from __future__ import annotations

import math
import os
import signal
import time

import numpy as np
import pytest
import ray

from chainrule.spec_file import load_job_spec
from scheduler.datasets import load_builtin, split_and_standardize
from scheduler.job_runner import JobRunner
from worker.backprop.tensor import Tensor, no_grad
from worker.model_builder import Loss, build_planned_model
from worker.replica import ModelReplica

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

SPEC = """
name: validated
model: {layers: [{linear: {out_features: 32}}, {batch_norm: {}}, {relu: {}},
                 {linear: {out_features: 10}}]}
loss: cross_entropy
optimizer: {adam: {lr: 0.01}}
data: {dataset: "sklearn:digits", batch_size: 128, epochs: 1, validation_fraction: 0.2,
       micro_batches: 4}
dtype: float64
seed: 3
"""


@pytest.mark.parametrize("transport", ["object_store", "shared_memory"])
def test_validation_runs_on_the_workers_in_batches_with_the_one_pass_figures(
        local_ray, monkeypatch, transport):
    in_runner = []
    one_pass = ModelReplica.evaluate
    monkeypatch.setattr(ModelReplica, "evaluate",  # the runner's process only, not the actors'
                        lambda self, x, y: in_runner.append(len(y)) or one_pass(self, x, y))
    spec = load_job_spec(SPEC)
    dataset = split_and_standardize(load_builtin("sklearn:digits", 3), 0.2, True, 3,
                                    dtype="float64")
    runner = JobRunner.for_spec(spec, dataset, workers=2, parameter_servers=1,
                                transport=transport)
    result = runner.run()
    assert in_runner == []
    assert [e.step for e in result.history.evaluations] == [12]
    # The old way: one forward pass of the whole split through the final model.
    job = runner.job
    model = build_planned_model(job.model, np.dtype("float64"), seed=job.seed)
    model.load_state_dict(result.state_dict)
    model.eval()
    with no_grad():
        output = model(Tensor(dataset.x_val))
        loss = Loss(job.loss, "sum", job.label_smoothing)
        loss_sum = float(loss(output, dataset.y_val).data)
    final = result.final_evaluation
    assert final is not None and final.samples == len(dataset.y_val) == 359
    assert math.isclose(final.loss, loss_sum / 359, rel_tol=1e-12, abs_tol=0)
    assert final.accuracy == loss.correct(output.data, dataset.y_val) / 359


def test_a_worker_stopped_before_an_evaluation_is_found_by_its_heartbeat_and_dropped_once(
        local_ray):
    # Before, the evaluation waited for its own timeout (the step timeout, 120 s here) and
    # the next step found the worker again.
    spec = load_job_spec(SPEC)
    spec.data.epochs = 2  # an evaluation at step 12 with steps after it
    dataset = split_and_standardize(load_builtin("sklearn:digits", 3), 0.2, True, 3,
                                    dtype="float64")
    recoveries: list[tuple[float, object]] = []
    runner = JobRunner.for_spec(spec, dataset, workers=2, parameter_servers=1,
                                transport="shared_memory",
                                on_recovery=lambda r: recoveries.append((time.monotonic(), r)))
    stopped: dict[str, float] = {}

    def stop_worker_one_before_the_evaluation(record) -> None:
        if record.step == 12:  # on_step comes before the step's evaluation
            replica = runner.worker_group.replicas[1]
            pid = ray.get(replica.__ray_call__.remote(lambda _: os.getpid()), timeout=60)
            os.kill(pid, signal.SIGSTOP)
            stopped.update(pid=pid, at=time.monotonic())

    runner.on_step = stop_worker_one_before_the_evaluation
    try:
        result = runner.run()
    finally:
        if stopped:
            try:
                os.kill(int(stopped["pid"]), signal.SIGCONT)  # so that Ray can reap it
            except ProcessLookupError:
                pass
    [(found_at, lost)] = [(at, r) for at, r in recoveries if r.kind == "worker_lost"]
    assert lost.message == ("worker 1 lost at step 12 (no answer to its heartbeat: its node or "
                            "process is gone or stopped): found between steps, no block of it "
                            "to recompute")
    assert found_at - stopped["at"] < 30.0  # 2.5 s measured: a heartbeat's timeout
    assert result.steps == 24 and result.history.worker_failures == 1
    assert [e.step for e in result.history.evaluations] == [12, 24]
