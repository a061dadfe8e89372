"""Two hosts on a capped network, chainrule against Ray Train with PyTorch DDP (gloo), in one run.

    sudo python bench/multihost.py [--steps 40] [--rates 10gbit,1gbit] [--models mlp,lenet]

Needs root (the hosts are network namespaces: deploy/netns_hosts.py) and Ray Train with torch
(`make bench` installs them). For each link rate: two hosts with one CPU each, a Ray node on
each; each model trained with one worker per host, by chainrule (2 workers, 2 shards,
gradients through Ray's object store between the hosts) and by Ray Train's TorchTrainer (2
workers, DDP over gloo between the hosts). The models: the reference MLP 784-1024-1024-10 at
global batch 256 (4 micro-batches), and the CNN of the models issue, LeNet-5 on 1x28x28
images at global batch 64 (bench/models.py; its peer is bench/peer_ray_train_cnn.py). Prints
each one's step time and samples/s, where chainrule's step goes, the bytes it moves per worker
and step against the parameter bytes, the share of its gradient communication hidden behind
backward (the time chunks spend between a worker and a shard while the worker still
computes, over all their time in flight), and the ratio against the peer.

Targets (issue 10): >= 1.5x Ray Train's samples/s at 10 Gbit/s; >= 3x at 1 Gbit/s with
gradient compression on. Compression (PowerSGD) is not built yet: its row says so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PEERS = Path(os.environ.get("CHAINRULE_PEERS_DIR", ROOT.parent / "shared" / "bench"))
DIMS = [784, 1024, 1024, 10]
BATCHES = {"mlp": 256, "lenet": 64}
NAMES = {"mlp": f"MLP {'-'.join(map(str, DIMS))}", "lenet": "LeNet-5 (CNN)"}


def job_and_data(model: str, steps: int):
    """(job spec, training data) of `model` for `steps` steps of synthetic samples."""
    import numpy as np
    from distributed import mlp_spec
    from models import lenet_job_spec

    from chainrule.spec_file import job_spec_from_dict
    from scheduler.datasets import from_arrays

    rng = np.random.default_rng(0)
    samples = BATCHES[model] * steps
    if model == "mlp":
        spec, x = mlp_spec(DIMS[1:-1], micro_batches=4), rng.standard_normal(
            (samples, DIMS[0]), dtype=np.float32)
    else:
        spec, x = lenet_job_spec(BATCHES[model]), rng.standard_normal(
            (samples, 1, 28, 28), dtype=np.float32)
    return job_spec_from_dict(spec), from_arrays(x, rng.integers(0, 10, samples))


def drive_ours(address: str, steps: int, model: str) -> dict:
    """On host 0: chainrule's 2-worker job on the cluster at `address`; medians of the steady
    steps (after the first 5), and the hidden share over all of them."""
    import statistics

    from scheduler import ray_cluster
    from scheduler.job_runner import JobRunner

    ray_cluster.connect(address)
    spec, data = job_and_data(model, steps)
    records: list = []
    JobRunner.for_spec(spec, data, on_step=records.append).run()
    steady = records[min(5, len(records) // 2):]

    def median_ms(field) -> float:
        return statistics.median(field(r.timings) for r in steady) * 1e3

    communication = sum(r.timings.communication for r in steady)
    return {
        "step_ms": median_ms(lambda t: t.wall), "compute_ms": median_ms(lambda t: t.compute),
        "reduce_ms": median_ms(lambda t: t.reduce), "wait_ms": median_ms(lambda t: t.wait),
        "hidden_share": (sum(r.timings.hidden_communication for r in steady) / communication
                         if communication > 0 else 0.0),
        "parameter_bytes": records[0].parameter_bytes,
        "moved_bytes": records[-1].bytes_sent_per_worker + records[-1].bytes_received_per_worker,
    }


def drive_peer(address: str, steps: int, model: str) -> dict:
    """On host 0: Ray Train's TorchTrainer, one DDP worker per host (the peers' own train
    loops: ../shared/bench/peer_ray_train.py for the MLP, bench/peer_ray_train_cnn.py)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    script = (PEERS / "peer_ray_train.py" if model == "mlp"
              else ROOT / "bench" / "peer_ray_train_cnn.py")
    spec = importlib.util.spec_from_file_location(f"peer_{model}", script)
    assert spec is not None and spec.loader is not None
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    ray.init(address=address, log_to_driver=False)
    out = tempfile.NamedTemporaryFile(delete=False, suffix=".step").name
    config = {"dims": DIMS, "batch": BATCHES[model], "steps": steps, "warmup": 5, "threads": 1,
              "out": out}
    trainer = TorchTrainer(
        peer.train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False,
                                     resources_per_worker={"CPU": 1},
                                     placement_strategy="STRICT_SPREAD"),
        run_config=RunConfig(storage_path=tempfile.mkdtemp(prefix="chainrule-peer-")))
    trainer.fit()
    step_s = float(Path(out).read_text())
    os.unlink(out)
    return {"step_ms": step_s * 1e3}


def run_on_host0(ray_cluster, role: str, steps: int, model: str) -> dict:
    command = ray_cluster.hosts.command(0, [sys.executable, __file__, "--driver", role,
                                            "--address", ray_cluster.address,
                                            "--steps", str(steps), "--models", model])
    import subprocess

    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, **ray_cluster.env}, timeout=900)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"{role} failed: {done.stderr[-2000:]}")
    return json.loads(lines[-1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--rates", default="10gbit,1gbit")
    parser.add_argument("--models", default="mlp,lenet", help="of: mlp, lenet")
    parser.add_argument("--driver", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = args.models.split(",")
    if unknown := set(models) - set(BATCHES):
        parser.error(f"--models: unknown {sorted(unknown)}; known: {sorted(BATCHES)}")
    if args.driver:
        sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
        drive = drive_ours if args.driver == "ours" else drive_peer
        print(json.dumps(drive(args.address, args.steps, models[0])), flush=True)
        return 0

    spec = importlib.util.spec_from_file_location("netns_hosts",
                                                  ROOT / "deploy" / "netns_hosts.py")
    assert spec is not None and spec.loader is not None
    netns_hosts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(netns_hosts)
    print(f"load average before the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print("2 hosts x 1 CPU, one worker per host; " + "; ".join(
        f"{NAMES[m]} at global batch {BATCHES[m]}" for m in models))
    results = {}
    for rate in args.rates.split(","):
        hosts = netns_hosts.Hosts(2, rate=rate)
        try:
            hosts.up()
            cluster = netns_hosts.RayOnHosts(hosts, cpus_per_host=1)
            try:
                cluster.up()
                for model in models:
                    began = time.perf_counter()
                    ours = run_on_host0(cluster, "ours", args.steps, model)
                    peer = run_on_host0(cluster, "peer", args.steps, model)
                    results[rate, model] = (ours, peer)
                    print(f"{rate:>7} {model:>5}: chainrule {ours['step_ms']:7.2f} ms "
                          f"({BATCHES[model] / ours['step_ms'] * 1e3:,.0f} samples/s; compute "
                          f"{ours['compute_ms']:.1f}, reduce-scatter {ours['reduce_ms']:.1f}, "
                          f"wait {ours['wait_ms']:.1f} ms; "
                          f"{ours['moved_bytes'] / ours['parameter_bytes']:.2f}x the parameter "
                          f"bytes moved per worker; {ours['hidden_share']:.0%} of gradient "
                          f"communication hidden behind backward)  Ray Train DDP "
                          f"{peer['step_ms']:7.2f} ms  ->  {peer['step_ms'] / ours['step_ms']:.2f}x"
                          f" ({time.perf_counter() - began:.0f} s)", flush=True)
            finally:
                cluster.down()
        finally:
            hosts.down()
    print(f"load average after the run: {os.getloadavg()[0]:.2f}")
    print()
    print(f"{'':<52}{'ratio':>8}{'target':>10}")
    for model in models:
        for rate, target in (("10gbit", 1.5), ("1gbit", 3.0)):
            if (rate, model) in results:
                ours, peer = results[rate, model]
                note = "" if rate == "10gbit" else "  (target with compression: not built)"
                print(f"{model + ' samples/s vs Ray Train DDP at ' + rate:<52}"
                      f"{peer['step_ms'] / ours['step_ms']:>8.2f}{'>= ' + str(target):>10}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
