"""Two hosts on a capped network, chainrule against Ray Train with PyTorch DDP (gloo), in one run.

    sudo python bench/multihost.py [--steps 40] [--rates 10gbit,1gbit]

Needs root (the hosts are network namespaces: deploy/netns_hosts.py) and Ray Train with torch
(`make bench` installs them). For each link rate: two hosts with one CPU each, a Ray node on
each; the reference MLP 784-1024-1024-10 at global batch 256 trained with one worker per host,
by chainrule (2 workers, 2 shards, gradients through Ray's object store between the hosts) and
by Ray Train's TorchTrainer (2 workers, DDP over gloo between the hosts). Prints each one's
step time and samples/s, the bytes chainrule moves per worker and step against the parameter
bytes, and the ratio against the peer.

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
BATCH = 256
DIMS = [784, 1024, 1024, 10]


def drive_ours(address: str, steps: int) -> dict:
    """On host 0: chainrule's 2-worker job on the cluster at `address` (bench/distributed.py's
    harness, the same figures)."""
    sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
    from distributed import run_ours

    from scheduler import ray_cluster

    ray_cluster.connect(address)
    return run_ours(DIMS[1:-1], micro_batches=4, steps=steps)


def drive_peer(address: str, steps: int) -> dict:
    """On host 0: Ray Train's TorchTrainer, one DDP worker per host (the peer's own train loop,
    ../shared/bench/peer_ray_train.py)."""
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    spec = importlib.util.spec_from_file_location("peer_ray_train", PEERS / "peer_ray_train.py")
    assert spec is not None and spec.loader is not None
    peer = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(peer)
    ray.init(address=address, log_to_driver=False)
    out = tempfile.NamedTemporaryFile(delete=False, suffix=".step").name
    config = {"dims": DIMS, "batch": BATCH, "steps": steps, "warmup": 5, "threads": 1,
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


def run_on_host0(ray_cluster, role: str, steps: int) -> dict:
    command = ray_cluster.hosts.command(0, [sys.executable, __file__, "--driver", role,
                                            "--address", ray_cluster.address,
                                            "--steps", str(steps)])
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
    parser.add_argument("--driver", choices=["ours", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.driver:
        drive = drive_ours if args.driver == "ours" else drive_peer
        print(json.dumps(drive(args.address, args.steps)), flush=True)
        return 0

    spec = importlib.util.spec_from_file_location("netns_hosts",
                                                  ROOT / "deploy" / "netns_hosts.py")
    assert spec is not None and spec.loader is not None
    netns_hosts = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(netns_hosts)
    print(f"load average before the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"MLP {'-'.join(map(str, DIMS))}, global batch {BATCH}, 2 hosts x 1 CPU, one worker "
          f"per host")
    results = {}
    for rate in args.rates.split(","):
        hosts = netns_hosts.Hosts(2, rate=rate)
        try:
            hosts.up()
            cluster = netns_hosts.RayOnHosts(hosts, cpus_per_host=1)
            try:
                cluster.up()
                began = time.perf_counter()
                ours = run_on_host0(cluster, "ours", args.steps)
                peer = run_on_host0(cluster, "peer", args.steps)
            finally:
                cluster.down()
        finally:
            hosts.down()
        results[rate] = (ours, peer)
        ratio = peer["step_ms"] / ours["step_ms"]
        samples = BATCH / ours["step_ms"] * 1e3
        print(f"{rate:>7}: chainrule {ours['step_ms']:7.2f} ms ({samples:,.0f} samples/s; "
              f"compute {ours['compute_ms']:.1f}, reduce-scatter "
              f"{ours['reduce_ms']:.1f}, wait {ours['wait_ms']:.1f} ms; "
              f"{ours['moved_bytes'] / ours['parameter_bytes']:.2f}x the parameter bytes moved "
              f"per worker)  Ray Train DDP {peer['step_ms']:7.2f} ms  ->  {ratio:.2f}x "
              f"({time.perf_counter() - began:.0f} s)")
    print()
    print(f"{'':<44}{'ratio':>8}{'target':>10}")
    for rate, target in (("10gbit", 1.5), ("1gbit", 3.0)):
        if rate in results:
            ours, peer = results[rate]
            note = "" if rate == "10gbit" else "  (target with compression: not built)"
            print(f"{'samples/s vs Ray Train DDP at ' + rate:<44}"
                  f"{peer['step_ms'] / ours['step_ms']:>8.2f}{'>= ' + str(target):>10}{note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
