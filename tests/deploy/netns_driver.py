"""A job's driver for the namespace-hosts tests (tests/deploy/test_netns_hosts.py), run on a
host of that cluster (or, without --address, on embedded Ray as the one-host reference). Trains
a small iris job and prints JSON lines: where the actors are (after the first step), one per
step and per recovery (with the wall clock), and at the end a digest of the weights."""

from __future__ import annotations

import argparse
import hashlib
import json
import time

SPEC = """
name: netns-hosts
model: {layers: [{linear: {out_features: 16}}, {relu: {}}, {linear: {out_features: 3}}]}
loss: cross_entropy
optimizer: {sgd: {lr: 0.1, momentum: 0.9}}
data: {dataset: "sklearn:iris", batch_size: 32, epochs: 4, validation_fraction: 0.2,
       micro_batches: 4}
seed: 3
"""


def emit(**fields) -> None:
    print(json.dumps(fields), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--address", default="")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args()

    import numpy as np
    import ray

    from chainrule.spec_file import load_job_spec
    from scheduler import ray_cluster
    from scheduler.datasets import load_builtin, split_and_standardize
    from scheduler.job_runner import JobRunner

    ray_cluster.connect(args.address or None, num_cpus=4 if not args.address else None)
    spec = load_job_spec(SPEC)
    spec.data.epochs = args.epochs
    dataset = split_and_standardize(load_builtin(spec.data.dataset, spec.seed),
                                    spec.data.validation_fraction, True, spec.seed)
    runner = JobRunner.for_spec(
        spec, dataset, workers=args.workers, parameter_servers=1,
        on_recovery=lambda record: emit(recovery=record.kind, message=record.message,
                                        t=time.time()))

    def on_step(record) -> None:
        if record.step == 1:
            address = {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes()}
            emit(workers=[address[n] for n in runner.actor_nodes["workers"]],
                 shards=[address[n] for n in runner.actor_nodes["shards"]],
                 transport=type(runner.transport).__name__)
        emit(step=record.step, t=time.time())

    runner.on_step = on_step
    result = runner.run()
    digest = hashlib.sha256()
    for key, value in sorted(result.state_dict.items()):
        digest.update(key.encode() + np.ascontiguousarray(value).tobytes())
    emit(digest=digest.hexdigest(), steps=result.steps)


if __name__ == "__main__":
    main()
