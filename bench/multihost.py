"""Two hosts on a capped network, chainrule against Ray Train with PyTorch DDP (gloo), in one run.

    sudo python bench/multihost.py [--steps 40] [--rates 10gbit,1gbit] [--models mlp,lenet]
                                   [--accuracy-epochs 20] [--only CASE,...]

`--only` runs some of the cases (default: all of them): direct, object_store, powersgd,
powersgd_object_store, peer, latency, accuracy, data; e.g. `--rates 1gbit --models mlp
--only powersgd,peer` measures the compressed step against DDP in about a minute.

Needs root (the hosts are network namespaces: deploy/netns_hosts.py) and Ray Train with torch
(`make bench` installs them). For each link rate: two hosts with one CPU each, a Ray node on
each; each model trained with one worker per host, by chainrule (2 workers, 2 shards, gradients
and updated parameters over direct TCP connections between the workers and the shards: the
default across hosts), by chainrule through Ray's object store instead
(transport="object_store"), by chainrule with PowerSGD at rank 4 (communication.compression; its
rounds over the same direct connections, and, as the case powersgd_object_store, through the
object store) and by Ray Train's TorchTrainer (2 workers, DDP over gloo between the hosts). The
models: the reference MLP 784-1024-1024-10 at global batch 256 (4 micro-batches), and the CNN of
the models issue, LeNet-5 on 1x28x28 images at global batch 64 (bench/models.py; its peer is
bench/peer_ray_train_cnn.py). Prints each one's step time and samples/s, where chainrule's step
goes (compute, reduce-scatter, optimizer, and the rest: waiting on calls), the bytes a worker
sends (gradients, or PowerSGD's factors) and receives (updated parameters, or the summed factors
from which every worker applies the step itself) per step against the parameter bytes, the share
of its gradient communication hidden behind backward (the time chunks spend between a worker and
a shard while the worker still computes, over all their time in flight), and the ratios against
the peer (and the direct connections' against the object store's); then the round trip of one
actor call from the runner to each host, the unit the waits are made of. Then, on the last
rate's cluster, the MLP's hidden layers trained on digits (64 inputs) for --accuracy-epochs
epochs with and without PowerSGD: validation accuracy after the same steps; and
bench/parquet.py's comparison on the two hosts: samples/s of 2 workers reading a Parquet file
(at one path both hosts see) against the same rows in memory, and the peak RSS of a worker on
the other host from each source.

Targets (issue 10): >= 1.5x Ray Train's samples/s at 10 Gbit/s; >= 3x at 1 Gbit/s with
gradient compression on; compression moves >= 8x fewer bytes (sent and received), and its
validation accuracy on digits is within 0.5 points of the uncompressed run's.
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
POWERSGD = {"powersgd": {"rank": 4}}
DATA_ROWS = 60_000  # bench/parquet.py's: 30 row groups of 2,000 rows
# What --only chooses from: chainrule's training runs by the driver role that runs them (the
# printed label), then the measures made once per rate.
TRAINING_CASES = {"direct": ("ours", "chainrule"), "object_store": ("object_store",
                                                                     "  object store"),
                  "powersgd": ("powersgd", "  with PowerSGD"),
                  "powersgd_object_store": ("powersgd_object_store", "  PowerSGD, store"),
                  "peer": ("peer", "")}
CASES = (*TRAINING_CASES, "latency", "accuracy", "data")


def job_and_data(model: str, steps: int, compression: dict | None = None):
    """(job spec, training data) of `model` for `steps` steps of synthetic samples, with the
    spec's communication.compression when given."""
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
    if compression is not None:
        spec["communication"] = {"compression": compression}
    return job_spec_from_dict(spec), from_arrays(x, rng.integers(0, 10, samples))


def drive_ours(address: str, steps: int, model: str, compression: dict | None = None,
               transport: str = "auto") -> dict:
    """On host 0: chainrule's 2-worker job on the cluster at `address` (`transport`: the
    JobRunner's); medians of the steady steps (after the first 5), and the hidden share over
    all of them. The step time is the median period from one step's end to the next's, as the
    peer's is a period: the step's own wall plus the runner's work between steps."""
    import statistics

    from scheduler import ray_cluster
    from scheduler.job_runner import JobRunner

    ray_cluster.connect(address)
    spec, data = job_and_data(model, steps, compression)
    records: list = []
    ended: list[float] = []

    def on_step(record) -> None:
        ended.append(time.perf_counter())
        records.append(record)

    JobRunner.for_spec(spec, data, on_step=on_step, transport=transport).run()
    first = min(5, len(records) // 2)
    steady = records[first:]
    periods = [b - a for a, b in zip(ended[first - 1:], ended[first:])]

    def median_ms(field) -> float:
        return statistics.median(field(r.timings) for r in steady) * 1e3

    communication = sum(r.timings.communication for r in steady)
    return {
        "step_ms": statistics.median(periods) * 1e3, "wall_ms": median_ms(lambda t: t.wall),
        "compute_ms": median_ms(lambda t: t.compute),
        "reduce_ms": median_ms(lambda t: t.reduce), "apply_ms": median_ms(lambda t: t.apply),
        "wait_ms": median_ms(lambda t: t.wait),
        "hidden_share": (sum(r.timings.hidden_communication for r in steady) / communication
                         if communication > 0 else 0.0),
        "parameter_bytes": records[0].parameter_bytes,
        "sent_bytes": records[-1].bytes_sent_per_worker,
        "received_bytes": records[-1].bytes_received_per_worker,
    }


def drive_call_latency(address: str, calls: int = 60) -> dict:
    """On host 0: the median round trip of one actor call carrying a 32 KB array each way
    (PowerSGD's messages on the reference MLP are 16-60 KB), from this driver to an actor on
    each host: the unit a compressed step's wait is made of (each of its four rounds is a
    call out and a reply back through the runner)."""
    import statistics

    import numpy as np
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from scheduler import ray_cluster

    ray_cluster.connect(address)

    @ray.remote(num_cpus=0)
    class Echo:
        def echo(self, values):
            return values

    here = ray.get_runtime_context().get_node_id()
    nodes = sorted((node["NodeID"] != here, node["NodeID"]) for node in ray.nodes()
                   if node["Alive"])
    message = np.zeros(8192, np.float32)
    figures = {}
    for remote, node in nodes:
        actor = Echo.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            node, soft=False)).remote()
        ray.get(actor.echo.remote(message))
        seconds = []
        for _ in range(calls):
            start = time.perf_counter()
            ray.get(actor.echo.remote(message))
            seconds.append(time.perf_counter() - start)
        figures["other_host_ms" if remote else "same_host_ms"] = statistics.median(seconds) * 1e3
        ray.kill(actor)
    return figures


def drive_accuracy(address: str, epochs: int) -> dict:
    """On host 0: digits on the reference MLP's hidden layers, 2 workers and 2 shards on the
    two hosts, without and with PowerSGD: validation accuracy after the same steps."""
    from chainrule.spec_file import job_spec_from_dict
    from scheduler import ray_cluster
    from scheduler.datasets import load_builtin, split_and_standardize
    from scheduler.job_runner import JobRunner

    ray_cluster.connect(address)
    layers: list[dict] = []
    for width in DIMS[1:-1]:
        layers += [{"linear": {"out_features": width}}, {"relu": {}}]
    layers.append({"linear": {"out_features": 10}})
    figures = {}
    for name, compression in (("whole", None), ("powersgd", POWERSGD)):
        spec: dict = {"name": "digits", "loss": "cross_entropy", "seed": 0,
                      "model": {"layers": layers},
                      "optimizer": {"adamw": {"lr": 0.001, "weight_decay": 0.01}},
                      "data": {"dataset": "sklearn:digits", "batch_size": BATCHES["mlp"],
                               "epochs": epochs, "validation_fraction": 0.2,
                               "micro_batches": 4},
                      "resources": {"workers": 2, "parameter_servers": 2}}
        if compression is not None:
            spec["communication"] = {"compression": compression}
        data = split_and_standardize(load_builtin("sklearn:digits", 0), 0.2, True, 0)
        result = JobRunner.for_spec(job_spec_from_dict(spec), data).run()
        assert result.final_evaluation is not None  # digits has a validation split
        figures[name] = {"accuracy": result.final_evaluation.accuracy, "steps": result.steps}
    return figures


def drive_data(address: str) -> dict:
    """On host 0: bench/parquet.py's measure on the two hosts: 2 workers and 2 shards train
    the MLP 64-256-10 at batch 256 for 2 epochs of DATA_ROWS synthetic rows, from a Parquet
    file both hosts read at the same path (the namespaces share this machine's file system)
    and from the same rows in memory (through the object store); then a fresh worker process
    on the other host computes worker 0's micro-batches of an epoch from each source."""
    import ray
    from parquet import measure

    from scheduler import ray_cluster

    ray_cluster.connect(address)
    here = ray.get_runtime_context().get_node_id()
    other = next(node["NodeID"] for node in ray.nodes()
                 if node["Alive"] and node["NodeID"] != here)
    return measure(rows=DATA_ROWS, workers=2, epochs=2, rounds=2, parameter_servers=2,
                   node=other)


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


def run_on_host0(ray_cluster, role: str, steps: int, model: str, epochs: int = 0) -> dict:
    command = ray_cluster.hosts.command(0, [sys.executable, __file__, "--driver", role,
                                            "--address", ray_cluster.address,
                                            "--steps", str(steps), "--models", model,
                                            "--accuracy-epochs", str(epochs)])
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
    parser.add_argument("--accuracy-epochs", type=int, default=20,
                        help="epochs of digits for the accuracy comparison (0: none)")
    parser.add_argument("--only", default=",".join(CASES),
                        help=f"the cases to run, of: {', '.join(CASES)} (default: all)")
    parser.add_argument("--driver", choices=["ours", "object_store", "powersgd",
                                             "powersgd_object_store", "peer", "accuracy",
                                             "latency", "data"],
                        help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    models = args.models.split(",")
    if unknown := set(models) - set(BATCHES):
        parser.error(f"--models: unknown {sorted(unknown)}; known: {sorted(BATCHES)}")
    only = args.only.split(",")
    if unknown := set(only) - set(CASES):
        parser.error(f"--only: unknown {sorted(unknown)}; known: {', '.join(CASES)}")
    if args.driver:
        sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
        if args.driver == "accuracy":
            figures = drive_accuracy(args.address, args.accuracy_epochs)
        elif args.driver == "latency":
            figures = drive_call_latency(args.address)
        elif args.driver == "data":
            figures = drive_data(args.address)
        elif args.driver == "object_store":
            figures = drive_ours(args.address, args.steps, models[0], transport="object_store")
        elif args.driver == "powersgd_object_store":
            figures = drive_ours(args.address, args.steps, models[0], POWERSGD,
                                 transport="object_store")
        elif args.driver == "peer":
            figures = drive_peer(args.address, args.steps, models[0])
        else:
            figures = drive_ours(args.address, args.steps, models[0],
                                 POWERSGD if args.driver == "powersgd" else None)
        print(json.dumps(figures), flush=True)
        return 0

    spec = importlib.util.spec_from_file_location("netns_hosts",
                                                  ROOT / "deploy" / "netns_hosts.py")
    assert spec is not None and spec.loader is not None
    netns_hosts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(netns_hosts)
    print(f"load average before the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print("2 hosts x 1 CPU, one worker per host; " + "; ".join(
        f"{NAMES[m]} at global batch {BATCHES[m]}" for m in models))
    results: dict[tuple[str, str], dict[str, dict]] = {}  # (rate, model) -> case -> figures
    accuracy = data = None
    rates = args.rates.split(",")
    for rate in rates:
        hosts = netns_hosts.Hosts(2, rate=rate)
        try:
            hosts.up()
            cluster = netns_hosts.RayOnHosts(hosts, cpus_per_host=1)
            try:
                cluster.up()
                for model in models:
                    began = time.perf_counter()
                    runs = results[rate, model] = {
                        case: run_on_host0(cluster, role, args.steps, model)
                        for case, (role, _) in TRAINING_CASES.items() if case in only}
                    peer = runs.get("peer")
                    print(f"{rate:>7} {model:>5} ({time.perf_counter() - began:.0f} s)" + (
                        f": Ray Train DDP {peer['step_ms']:7.2f} ms "
                        f"({BATCHES[model] / peer['step_ms'] * 1e3:,.0f} samples/s)"
                        if peer else ""))
                    for case, (_, label) in TRAINING_CASES.items():
                        if case == "peer" or case not in runs:
                            continue
                        figures = runs[case]
                        print(f"    {label:<16} {figures['step_ms']:7.2f} ms "
                              f"({BATCHES[model] / figures['step_ms'] * 1e3:,.0f} samples/s; "
                              f"compute {figures['compute_ms']:.1f}, reduce-scatter "
                              f"{figures['reduce_ms']:.1f}, optimizer "
                              f"{figures['apply_ms']:.1f}, wait {figures['wait_ms']:.1f} ms, "
                              f"between steps "
                              f"{figures['step_ms'] - figures['wall_ms']:.1f} ms; "
                              f"per worker and step sent {figures['sent_bytes']:,} B, received "
                              f"{figures['received_bytes']:,} B, parameters "
                              f"{figures['parameter_bytes']:,} B; "
                              f"{figures['hidden_share']:.0%} of gradient communication "
                              f"hidden behind backward)" + (
                                  f"  ->  {peer['step_ms'] / figures['step_ms']:.2f}x"
                                  if peer else ""), flush=True)
                if "latency" in only:
                    latency = run_on_host0(cluster, "latency", 0, models[0])
                    print(f"    one actor call and its reply, 32 KB each way, from the runner: "
                          f"{latency['other_host_ms']:.2f} ms to the other host, "
                          f"{latency['same_host_ms']:.2f} ms on the runner's", flush=True)
                if (rate == rates[-1] and args.accuracy_epochs and "mlp" in models
                        and "accuracy" in only):
                    accuracy = run_on_host0(cluster, "accuracy", 0, "mlp", args.accuracy_epochs)
                if rate == rates[-1] and "data" in only:
                    data = run_on_host0(cluster, "data", args.steps, "mlp")
            finally:
                cluster.down()
        finally:
            hosts.down()
    print(f"load average after the run: {os.getloadavg()[0]:.2f}")
    print()
    print(f"{'':<60}{'ratio':>8}{'target':>10}")

    def row(label: str, ratio: float, target: str) -> None:
        print(f"{label:<60}{ratio:>8.2f}{target:>10}")

    for model in models:
        for rate, target in (("10gbit", 1.5), ("1gbit", 3.0)):
            runs = results.get((rate, model), {})
            peer, ours, compressed = runs.get("peer"), runs.get("direct"), runs.get("powersgd")
            stored = runs.get("object_store")
            if peer and ours:
                row(f"{model} samples/s vs Ray Train DDP at {rate}",
                    peer["step_ms"] / ours["step_ms"], f">= {target}" if rate == "10gbit" else "")
            if stored and ours:
                row(f"{model} samples/s, direct connections vs object store at {rate}",
                    stored["step_ms"] / ours["step_ms"], "")
            if peer and compressed:
                row(f"{model} samples/s vs Ray Train DDP at {rate}, PowerSGD",
                    peer["step_ms"] / compressed["step_ms"],
                    f">= {target}" if rate == "1gbit" else "")
            if compressed and (compressed_stored := runs.get("powersgd_object_store")):
                row(f"{model} PowerSGD samples/s, direct vs object store at {rate}",
                    compressed_stored["step_ms"] / compressed["step_ms"], "")
        runs = results.get((rates[-1], model), {})
        ours, compressed = runs.get("direct"), runs.get("powersgd")
        if ours and compressed:
            row(f"{model} gradient bytes sent, whole / PowerSGD", ours["sent_bytes"]
                / compressed["sent_bytes"], ">= 8")
            row(f"{model} bytes sent + received, whole / PowerSGD",
                (ours["sent_bytes"] + ours["received_bytes"])
                / (compressed["sent_bytes"] + compressed["received_bytes"]), ">= 8")
    if data is not None:
        sys.path.insert(0, str(ROOT / "bench"))
        from parquet import report

        print(f"Parquet vs in memory on the two hosts at {rates[-1]} (the worker process on the "
              f"other host), "
              f"{DATA_ROWS:,} rows x 64 features, 2 workers:")
        print("\n".join(f"    {line}" for line in report(data, 2)))
    if accuracy is not None:
        whole, powersgd = accuracy["whole"], accuracy["powersgd"]
        print(f"digits after {whole['steps']} steps: validation accuracy {whole['accuracy']:.4f} "
              f"whole, {powersgd['accuracy']:.4f} with PowerSGD "
              f"({(powersgd['accuracy'] - whole['accuracy']) * 100:+.2f} points; target: "
              f"within 0.5)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
