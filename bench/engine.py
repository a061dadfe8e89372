"""Engine speed and memory against the peers, measured side by side in one run.

    python bench/engine.py [--rounds 3] [--n 20]

For each model (the reference MLP 784-1024-1024-10 at batch 256, and the small 64-64-64-10 at
batch 32 where per-op overhead dominates) it runs the peers' script
(`../shared/bench/peer_local_step.py`: PyTorch eager, the step written by hand in NumPy, and the
raw GEMM time of the step's shapes) and our engine's training step, alternating for several
rounds and keeping each one's best time (the machine is shared and noisy). Then it measures
the peak memory of one step (tracemalloc) against the hand-written NumPy step.

Targets (issue 2): large step <= 1.0x PyTorch and >= 85% of gemm-peak; small step <= 1.3x
PyTorch; peak memory <= 1.2x the hand-written step.

"Share of gemm-peak" is gemm-peak's time over ours. It can exceed 1: the peer's GEMM set
includes the first layer's input gradient, which a training step never computes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.backprop import allocator, nn, optim  # noqa: E402
from worker.backprop.nn import functional as F  # noqa: E402
from worker.backprop.tensor import Tensor  # noqa: E402

PEERS = Path(os.environ.get("CHAINRULE_PEERS_DIR", ROOT.parent / "shared" / "bench"))

MODELS = {
    "large": ([784, 1024, 1024, 10], 256),
    "small": ([64, 64, 64, 10], 32),
}


def make_batch(dims: list[int], batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, dims[0]), dtype=np.float32)
    return x, rng.integers(0, dims[-1], batch)


def make_engine_step(dims: list[int], batch: int):
    """The step a user writes with our engine: forward, cross-entropy, backward, SGD."""
    layers: list[nn.Module] = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    model = nn.Sequential(*layers)
    sgd = optim.SGD(model.parameters(), lr=0.01)
    x, y = make_batch(dims, batch)
    inputs = Tensor(x)

    def step() -> None:
        sgd.zero_grad()
        F.cross_entropy(model(inputs), y).backward()
        sgd.step()

    return step


def make_numpy_step(dims: list[int], batch: int):
    """The peer's hand-written NumPy step (peer_local_step.py), rebuilt here so that its memory
    can be traced in this process."""
    rng = np.random.default_rng(0)
    x, y = make_batch(dims, batch)
    n_layers = len(dims) - 1
    ws = [rng.standard_normal((dims[i], dims[i + 1]), dtype=np.float32) * 0.03
          for i in range(n_layers)]
    bs = [np.zeros(dims[i + 1], np.float32) for i in range(n_layers)]

    def step() -> None:
        acts, zs = [x], []
        for i in range(n_layers):
            z = acts[-1] @ ws[i] + bs[i]
            zs.append(z)
            acts.append(np.maximum(z, 0) if i < n_layers - 1 else z)
        z = acts[-1] - acts[-1].max(1, keepdims=True)
        d = np.exp(z)
        d /= d.sum(1, keepdims=True)
        d[np.arange(batch), y] -= 1
        d /= batch
        for i in reversed(range(n_layers)):
            gw, gb = acts[i].T @ d, d.sum(0)
            if i:
                d = (d @ ws[i].T) * (zs[i - 1] > 0)
            ws[i] -= 0.01 * gw
            bs[i] -= 0.01 * gb

    return step


def best_time(fn, n: int) -> float:
    """Best of n single-step timings after warm-up, in seconds."""
    for _ in range(3):
        fn()
    best = float("inf")
    for _ in range(n):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def mean_time(fn, n: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - start) / n


def run_peers(dims: list[int], batch: int, n: int) -> dict[str, float]:
    script = PEERS / "peer_local_step.py"
    if not script.exists():
        sys.exit(f"peer script not found at {script}; set CHAINRULE_PEERS_DIR")
    out = subprocess.run(
        [sys.executable, str(script), "--dims", ",".join(map(str, dims)), "--batch", str(batch),
         "--threads", "2", "--n", str(n)],
        capture_output=True, text=True, check=True,
    ).stdout
    return {row["ref"]: row["step_ms"] / 1e3 for row in map(json.loads, out.splitlines())}


def peak_memory(step) -> int:
    """Peak bytes allocated during one step, above what was allocated before it."""
    step()  # warm: lazily created state (optimizer buffers) is not part of a step
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak - base


def flops_of(dims: list[int], batch: int) -> float:
    return 3 * 2 * batch * sum(dims[i] * dims[i + 1] for i in range(len(dims) - 1))


def main() -> None:
    allocator.keep_freed_memory()  # a training process's setting (worker/backprop/allocator.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=20)
    args = parser.parse_args()

    results = {}
    for name, (dims, batch) in MODELS.items():
        engine_step = make_engine_step(dims, batch)
        n = args.n if name == "large" else args.n * 20
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for ref, seconds in run_peers(dims, batch, n).items():
                best[ref] = min(best.get(ref, float("inf")), seconds)
            best["chainrule"] = min(best.get("chainrule", float("inf")),
                                    mean_time(engine_step, n))
        results[name] = best
        print(f"\n{name} MLP {'-'.join(map(str, dims))}, batch {batch} "
              f"(best of {args.rounds} rounds, mean of {n} steps each)")
        for ref, seconds in best.items():
            gflops = flops_of(dims, batch) / seconds / 1e9
            print(f"  {ref:14s} {seconds * 1e3:8.3f} ms/step  {gflops:7.1f} GFLOP/s")

    large, small = results["large"], results["small"]
    dims, batch = MODELS["large"]
    memory_engine = peak_memory(make_engine_step(dims, batch))
    memory_numpy = peak_memory(make_numpy_step(dims, batch))
    print(f"\npeak memory of one large step: chainrule {memory_engine / 2**20:.1f} MiB, "
          f"numpy-by-hand {memory_numpy / 2**20:.1f} MiB")

    rows = [
        ("large step time vs PyTorch eager", large["chainrule"] / large["pytorch"], "<=", 1.0),
        ("large step share of gemm-peak", large["gemm-peak"] / large["chainrule"], ">=", 0.85),
        ("small step time vs PyTorch eager", small["chainrule"] / small["pytorch"], "<=", 1.3),
        ("large step time vs numpy-by-hand", large["chainrule"] / large["numpy-by-hand"],
         "info", None),
        ("peak memory vs numpy-by-hand", memory_engine / memory_numpy, "<=", 1.2),
    ]
    print("\nratios (target)")
    for label, value, sense, target in rows:
        if target is None:
            print(f"  {label:36s} {value:6.3f}")
            continue
        ok = value <= target if sense == "<=" else value >= target
        print(f"  {label:36s} {value:6.3f}  ({sense} {target})  {'met' if ok else 'NOT MET'}")


if __name__ == "__main__":
    main()
