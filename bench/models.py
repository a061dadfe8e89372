"""Whole-model training steps against PyTorch eager, measured side by side in one run.

    python bench/models.py [--rounds 3] [--n 30] [--only lenet|transformer|lenet_ddp|generate]
                           [--optimizer sgd|adam] [--threads N] [--ddp-batch 64] [--ddp-steps 60]

Each model has one section below: a function that builds our training step and PyTorch's
(forward, cross-entropy, backward, optimizer update, float32, the same shapes), times both
alternately for several rounds and keeps each one's best mean (the machine is shared and
noisy), and measures the peak memory of our step. PyTorch runs in a child process
(`--peer MODEL`, this same file) with as many threads as NumPy's BLAS uses here, so neither
library's thread pool or allocations disturb the other's figures (--threads sets both; the
default is OpenBLAS's own, one per core). Each side's wall-clock time is the figure judged;
its CPU time (all threads of the process) is printed beside it, because on a loaded machine
(the load average is printed) CPU time with --threads 1 is the steadier comparison. `main`
runs every section and prints the ratios with their targets, then one JSON line per model.

Memory: the peak bytes one step allocates (tracemalloc, above what existed before the step)
next to the activation bytes the step must keep for backward at minimum: every float32 array
a backward pass reads that the step itself creates. The input batch exists before the step
(the data loader's), so it is in neither figure. PyTorch's own saved-tensor bytes (measured
with torch.autograd.graph.saved_tensors_hooks in the peer) are printed beside them.

Distributed (`lenet_ddp`): the same LeNet-5 trained on 2 workers by our runtime (JobRunner on
embedded Ray, 2 parameter-server shards, one micro-batch per worker, SGD) against Ray Train's
TorchTrainer running it in PyTorch with DDP on 2 workers (bench/peer_ray_train_cnn.py, after
../shared/bench/peer_ray_train.py), alternately for --rounds rounds, each with its own Ray:
the best steady samples/s of each over --ddp-steps steps after 5 warm-up steps, on synthetic
1x28x28 images.

Generation (`generate`): bytes per second writing text greedily with the key/value cache and
with a full pass per byte, and PyTorch eager's full-pass loop (issue 14; no target).

Targets (issue 9): LeNet-5 step <= 1.3x PyTorch eager; the causal transformer's step (always
with Adam, as the issue states it; --optimizer is LeNet's) <= 1.2x; peak memory <= 1.5x the
minimum; LeNet-5 on 2 workers >= 1.5x Ray Train DDP's samples/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

if "--threads" in sys.argv[:-1]:  # OpenBLAS reads its thread count when NumPy loads it
    os.environ["OPENBLAS_NUM_THREADS"] = sys.argv[sys.argv.index("--threads") + 1]

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.backprop import allocator, nn, optim  # noqa: E402
from worker.backprop.nn import functional as F  # noqa: E402
from worker.backprop.tensor import Tensor  # noqa: E402

FLOAT32 = 4  # bytes


@dataclass(frozen=True)
class StepTime:
    """Mean seconds per step: wall clock, and CPU time of the whole process."""

    wall: float
    cpu: float

    def best(self, other: StepTime) -> StepTime:
        return StepTime(min(self.wall, other.wall), min(self.cpu, other.cpu))


@dataclass
class ModelResult:
    """One model's figures: step times of each side, our peak memory, the minimum."""

    name: str
    optimizer: str
    ours: StepTime
    torch: StepTime
    peak_bytes: int
    held_after_forward_bytes: int  # what our graph holds when backward starts
    minimum_bytes: int
    torch_saved_bytes: int
    targets: dict[str, float]  # "time" and "memory" ratios not to exceed

    def rows(self) -> list[tuple[str, float, float]]:
        return [
            (f"{self.name} step time vs PyTorch eager", self.ours.wall / self.torch.wall,
             self.targets["time"]),
            (f"{self.name} peak memory vs minimum", self.peak_bytes / self.minimum_bytes,
             self.targets["memory"]),
        ]


# --- measuring -------------------------------------------------------------------------------


def mean_time(step: Callable[[], None], n: int) -> StepTime:
    for _ in range(3):
        step()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(n):
        step()
    return StepTime((time.perf_counter() - wall) / n, (time.process_time() - cpu) / n)


def peak_memory(step: Callable[[], None]) -> int:
    """Peak bytes allocated during one step, above what was allocated before it."""
    step()  # warm: lazily created state (optimizer buffers) is not part of a step
    tracemalloc.start()
    tracemalloc.reset_peak()
    base, _ = tracemalloc.get_traced_memory()
    step()
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak - base


def held_after_forward(forward: Callable[[], object]) -> int:
    """Bytes the recorded graph holds once the loss is computed: every activation it keeps
    for backward, plus whatever else the engine keeps alive until backward reaches it."""
    tracemalloc.start()
    base, _ = tracemalloc.get_traced_memory()
    loss = forward()
    held, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    del loss
    return held - base


def blas_threads() -> int:
    """Threads NumPy's OpenBLAS uses: its environment variable, else one per core."""
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return os.cpu_count() or 1


def run_peer(model: str, n: int, optimizer: str) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--peer", model, "--n", str(n), "--optimizer", optimizer,
         "--threads", str(blas_threads())],
        capture_output=True, text=True, check=True,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def compare(name: str, our_step: Callable[[], None], our_forward: Callable[[], object],
            minimum_bytes: int, args, targets: dict[str, float]) -> ModelResult:
    """Alternate PyTorch's step (in the peer) and ours for args.rounds rounds, best of each."""
    never = StepTime(float("inf"), float("inf"))
    ours, theirs, saved = never, never, 0
    for _ in range(args.rounds):
        peer = run_peer(name, args.n, args.optimizer)
        theirs = theirs.best(StepTime(peer["wall_seconds"], peer["cpu_seconds"]))
        saved = peer["saved_bytes"]
        ours = ours.best(mean_time(our_step, args.n))
    return ModelResult(name, args.optimizer, ours, theirs, peak_memory(our_step),
                       held_after_forward(our_forward), minimum_bytes, saved, targets)


def make_optimizer(kind: str, parameters, torch_module=None):
    """The same update on both sides: SGD (lr 0.01) or Adam (lr 1e-3)."""
    if torch_module is None:
        return (optim.SGD(parameters, lr=0.01) if kind == "sgd"
                else optim.Adam(parameters, lr=1e-3))
    return (torch_module.optim.SGD(parameters, lr=0.01) if kind == "sgd"
            else torch_module.optim.Adam(parameters, lr=1e-3))


# --- LeNet-5 on 1x28x28 images, batch 64 -----------------------------------------------------

LENET_BATCH = 64


def lenet_batch() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((LENET_BATCH, 1, 28, 28), dtype=np.float32)
    return x, rng.integers(0, 10, LENET_BATCH)


def lenet(module) -> object:
    """LeNet-5 as in the issue, written once for either library (`module` is nn or torch.nn)."""
    return module.Sequential(
        module.Conv2d(1, 6, 5, padding=2), module.ReLU(), module.MaxPool2d(2),
        module.Conv2d(6, 16, 5), module.ReLU(), module.MaxPool2d(2), module.Flatten(),
        module.Linear(400, 120), module.ReLU(), module.Linear(120, 84), module.ReLU(),
        module.Linear(84, 10),
    )


def lenet_minimum_bytes() -> int:
    """What a LeNet-5 backward must read that the step creates, in float32: each ReLU's output
    (its own mask; also the next max-pool's input, where the maximum was), each max-pool's
    output (the next layer's input: conv2 and the first Linear read it for their weight
    gradients), the hidden Linears' inputs (ReLU outputs) and the logits (cross-entropy's
    softmax). Counted once each."""
    n = LENET_BATCH
    shapes = [(n, 6, 28, 28), (n, 6, 14, 14), (n, 16, 10, 10), (n, 16, 5, 5), (n, 120),
              (n, 84), (n, 10)]
    return FLOAT32 * sum(int(np.prod(s)) for s in shapes)


def bench_lenet(args) -> ModelResult:
    nn.init.manual_seed(0)
    model = lenet(nn)
    update = make_optimizer(args.optimizer, model.parameters())
    x, y = lenet_batch()
    inputs = Tensor(x)

    def forward() -> Tensor:
        return F.cross_entropy(model(inputs), y)

    def step() -> None:
        update.zero_grad()
        forward().backward()
        update.step()

    return compare("lenet", step, forward, lenet_minimum_bytes(), args,
                   {"time": 1.3, "memory": 1.5})


def torch_lenet_step(torch, optimizer: str):
    torch.manual_seed(0)
    model = lenet(torch.nn)
    update = make_optimizer(optimizer, model.parameters(), torch)
    x, y = lenet_batch()
    inputs, target = torch.from_numpy(x), torch.from_numpy(y)

    def step() -> None:
        update.zero_grad()
        torch.nn.functional.cross_entropy(model(inputs), target).backward()
        update.step()

    return step, model, inputs


# --- a causal transformer encoder on byte tokens, batch 32 x 64 ------------------------------

TOKENS, CONTEXT, TEXT_BATCH = 256, 64, 32  # byte vocabulary, sequence length, batch
D_MODEL, HEADS, FEED_FORWARD, LAYERS = 128, 4, 512, 2


def text_batch() -> np.ndarray:
    """(batch, CONTEXT + 1) byte tokens: inputs are [:, :-1], next-token targets [:, 1:]."""
    return np.random.default_rng(0).integers(0, TOKENS, (TEXT_BATCH, CONTEXT + 1))


class OurTransformer(nn.Module):
    """Token embedding + learned positions -> causal pre-norm encoder with a final LayerNorm
    (the GPT-2 layout) -> vocabulary head. Dropout 0 on both sides, so the step times the same
    arithmetic in each library."""

    def __init__(self):
        super().__init__()
        self.tokens = nn.Embedding(TOKENS, D_MODEL)
        self.positions = nn.PositionalEmbedding(CONTEXT, D_MODEL)
        layer = nn.TransformerEncoderLayer(D_MODEL, HEADS, FEED_FORWARD, dropout=0.0,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, LAYERS, norm=nn.LayerNorm(D_MODEL))
        self.head = nn.Linear(D_MODEL, TOKENS)

    def forward(self, tokens: np.ndarray) -> Tensor:
        x = self.positions(self.tokens(tokens))
        return self.head(self.encoder(x, is_causal=True))


def transformer_minimum_bytes() -> int:
    """What this step's backward must read that the step creates, in float32, with attention
    computed as flash attention does (the (B, h, L, L) weights recomputed, not kept; PyTorch's
    CPU kernel does the same). Per layer: norm1's input and output (the residual stream, and the
    in-projection's input), q, k and v, the attention output (the out-projection's input),
    norm2's input and output, the feed-forward hidden activation (linear2's input and relu's
    mask); then the final norm's input and output (the head's input) and the logits
    (cross-entropy's softmax). Per-row statistics (LayerNorm's, attention's log-sum-exp) are
    under 0.5% and left out."""
    tokens = TEXT_BATCH * CONTEXT
    per_layer = tokens * (D_MODEL * (2 + 3 + 1 + 2) + FEED_FORWARD)
    return FLOAT32 * (LAYERS * per_layer + tokens * (2 * D_MODEL + TOKENS))


def bench_transformer(args) -> ModelResult:
    args = argparse.Namespace(**{**vars(args), "optimizer": "adam"})  # the step
    nn.init.manual_seed(0)
    model = OurTransformer()
    update = make_optimizer(args.optimizer, model.parameters())
    batch = text_batch()
    inputs, targets = batch[:, :-1], batch[:, 1:].reshape(-1)

    def forward() -> Tensor:  # next-token cross-entropy over every position
        return F.cross_entropy(model(inputs).reshape((-1, TOKENS)), targets)

    def step() -> None:
        update.zero_grad()
        forward().backward()
        update.step()

    return compare("transformer", step, forward, transformer_minimum_bytes(), args,
                   {"time": 1.2, "memory": 1.5})


def torch_transformer_step(torch, optimizer: str):
    torch.manual_seed(0)

    class TorchTransformer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.tokens = torch.nn.Embedding(TOKENS, D_MODEL)
            self.positions = torch.nn.Embedding(CONTEXT, D_MODEL)
            layer = torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FEED_FORWARD, dropout=0.0,
                                                     batch_first=True, norm_first=True)
            self.encoder = torch.nn.TransformerEncoder(layer, LAYERS,
                                                       norm=torch.nn.LayerNorm(D_MODEL),
                                                       enable_nested_tensor=False)
            self.head = torch.nn.Linear(D_MODEL, TOKENS)
            self.register_buffer("causal", torch.nn.Transformer.generate_square_subsequent_mask(
                CONTEXT), persistent=False)
            self.register_buffer("position_ids", torch.arange(CONTEXT), persistent=False)

        def forward(self, tokens):
            x = self.tokens(tokens) + self.positions(self.position_ids)
            # torch needs the mask beside is_causal; with both it runs its causal SDPA kernel.
            return self.head(self.encoder(x, mask=self.causal, is_causal=True))

    model = TorchTransformer()
    update = make_optimizer(optimizer, model.parameters(), torch)
    batch = torch.from_numpy(text_batch())
    inputs, targets = batch[:, :-1], batch[:, 1:].reshape(-1)

    def step() -> None:
        update.zero_grad()
        logits = model(inputs).reshape(-1, TOKENS)
        torch.nn.functional.cross_entropy(logits, targets).backward()
        update.step()

    return step, model, inputs


# --- generating text: a key/value cache against full passes (issue 14) ------------------------
#
# The transformer above (2 pre-norm causal layers, d_model 128, 4 heads) with a window of
# GENERATE_WINDOW positions writes GENERATE_BYTES bytes greedily after a prompt, all within its
# window: our engine with the key/value cache (worker/text_sampling.CachedDecoder) and with a
# full pass over the text so far per byte, and PyTorch eager in the peer process running the
# same full-pass loop (no cache: nn.TransformerEncoder has none).

GENERATE = "generate"  # its --only name
GENERATE_WINDOW, GENERATE_BYTES = 256, 192
GENERATE_PROMPT = b"def main(argv):\n"  # 16 bytes


@dataclass
class GenerationResult:
    cached: float  # bytes per second
    uncached: float
    torch: float | None  # PyTorch eager's full-pass loop; None when the peer failed


def generation_model() -> nn.Module:
    from chainrule.spec_file import job_spec_from_dict
    from worker.model_builder import build_model

    block = {"transformer_encoder_layer": {"nhead": HEADS, "dim_feedforward": FEED_FORWARD,
                                           "dropout": 0, "is_causal": True, "norm_first": True}}
    spec = job_spec_from_dict({"model": {"layers": [
        {"embedding": {"num_embeddings": TOKENS, "embedding_dim": D_MODEL}},
        {"positional_embedding": {"num_positions": GENERATE_WINDOW}},
        *[block] * LAYERS, {"layer_norm": {}}, {"linear": {"out_features": TOKENS}}]}})
    return build_model(spec.model, (GENERATE_WINDOW,), np.float32, seed=0,
                       input_dtype=np.int64)


def our_generation_rate(model: nn.Module, use_cache: bool) -> float:
    from worker.text_sampling import generate_bytes

    start = time.perf_counter()
    written = list(generate_bytes(model, GENERATE_PROMPT, GENERATE_BYTES, temperature=0.0,
                                  use_cache=use_cache))
    assert len(written) == GENERATE_BYTES
    return GENERATE_BYTES / (time.perf_counter() - start)


def torch_generation_rate(threads: int) -> float:
    """PyTorch eager, in this (peer) process: a full pass over the text so far per byte."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    tokens_in = torch.nn.Embedding(TOKENS, D_MODEL)
    positions = torch.nn.Embedding(GENERATE_WINDOW, D_MODEL)
    layer = torch.nn.TransformerEncoderLayer(D_MODEL, HEADS, FEED_FORWARD, dropout=0.0,
                                             batch_first=True, norm_first=True)
    encoder = torch.nn.TransformerEncoder(layer, LAYERS, norm=torch.nn.LayerNorm(D_MODEL),
                                          enable_nested_tensor=False).eval()
    head = torch.nn.Linear(D_MODEL, TOKENS)
    tokens = list(GENERATE_PROMPT)
    start = time.perf_counter()
    with torch.inference_mode():
        for _ in range(GENERATE_BYTES):
            ids = torch.tensor([tokens])
            length = ids.shape[1]
            mask = torch.nn.Transformer.generate_square_subsequent_mask(length)
            x = tokens_in(ids) + positions(torch.arange(length))
            logits = head(encoder(x, mask=mask, is_causal=True))[0, -1]
            tokens.append(int(logits.argmax()))
    return GENERATE_BYTES / (time.perf_counter() - start)


def bench_generation(args) -> GenerationResult:
    model = generation_model()
    cached = uncached = 0.0
    torch_rate: float | None = 0.0
    for _ in range(args.rounds):  # alternately, best of each: the machine is shared
        cached = max(cached, our_generation_rate(model, use_cache=True))
        uncached = max(uncached, our_generation_rate(model, use_cache=False))
        peer = subprocess.run([sys.executable, __file__, "--peer-generate", "--threads",
                               str(args.threads)], capture_output=True, text=True, cwd=ROOT)
        if peer.returncode != 0:
            print(f"PyTorch generation peer failed: {peer.stderr.strip()[-300:]}")
            torch_rate = None
        elif torch_rate is not None:
            rate = json.loads(peer.stdout.strip().splitlines()[-1])["bytes_per_second"]
            torch_rate = max(torch_rate, rate)
    return GenerationResult(cached, uncached, torch_rate)


# --- LeNet-5 on 2 workers against Ray Train (PyTorch DDP) on 2 workers -----------------------

LENET_DDP = "lenet_ddp"  # its --only name
DDP_WORKERS = 2
DDP_WARMUP_STEPS = 5  # as the peer: steps before the clock starts
DDP_TARGET = 1.5  # samples/s against Ray Train's (issue 9)


@dataclass
class DistributedResult:
    """Steady samples/s of LeNet-5 trained on DDP_WORKERS workers, ours and Ray Train's."""

    batch: int
    ours_step_seconds: float
    peer: dict | None  # the peer's JSON line; None when it could not run

    def ratio(self) -> float | None:
        return None if self.peer is None else self.peer["step_ms"] / 1e3 / self.ours_step_seconds


def lenet_job_spec(batch: int) -> dict:
    """`lenet` as a job spec: the same layers, SGD lr 0.01 (the peer's), one micro-batch per
    worker (the spec's `micro_batches`, as the peer splits its batch), no standardisation."""
    layers = [
        {"conv2d": {"out_channels": 6, "kernel_size": 5, "padding": 2}}, {"relu": {}},
        {"max_pool2d": {"kernel_size": 2}},
        {"conv2d": {"out_channels": 16, "kernel_size": 5}}, {"relu": {}},
        {"max_pool2d": {"kernel_size": 2}}, {"flatten": {}},
        {"linear": {"out_features": 120}}, {"relu": {}}, {"linear": {"out_features": 84}},
        {"relu": {}}, {"linear": {"out_features": 10}},
    ]
    return {"name": "bench-lenet", "model": {"layers": layers}, "loss": "cross_entropy",
            "optimizer": {"sgd": {"lr": 0.01}},
            "data": {"dataset": "bench-images", "batch_size": batch, "epochs": 1,
                     "micro_batches": DDP_WORKERS, "standardize": False},
            "resources": {"workers": DDP_WORKERS, "parameter_servers": DDP_WORKERS}, "seed": 0}


def run_lenet_job(batch: int, steps: int) -> float:
    """Seconds per step of our runtime (scheduler.job_runner.JobRunner on embedded Ray) over
    `steps` steps after the warm-up, by the wall clock between step ends: everything the
    runner does between steps counts, as everything in the peer's loop does."""
    import ray

    from chainrule.spec_file import job_spec_from_dict
    from scheduler import ray_cluster
    from scheduler.datasets import from_arrays
    from scheduler.job_runner import JobRunner

    rng = np.random.default_rng(0)
    samples = batch * (DDP_WARMUP_STEPS + steps)
    images = from_arrays(rng.standard_normal((samples, 1, 28, 28), dtype=np.float32),
                         rng.integers(0, 10, samples))
    ends: list[float] = []
    ray_cluster.connect()
    try:
        JobRunner.for_spec(job_spec_from_dict(lenet_job_spec(batch)), images,
                           on_step=lambda record: ends.append(time.perf_counter())).run()
    finally:
        ray.shutdown()
    timed = ends[DDP_WARMUP_STEPS - 1:]
    return (timed[-1] - timed[0]) / (len(timed) - 1)


def run_ray_train_lenet(batch: int, steps: int) -> dict | None:
    """The peer (bench/peer_ray_train_cnn.py) in its own process, with its own Ray."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("peer_ray_train_cnn.py")),
         "--workers", str(DDP_WORKERS), "--batch", str(batch), "--steps", str(steps),
         "--cpus", str(os.cpu_count())],
        capture_output=True, text=True,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        print(f"  Ray Train peer failed: {done.stderr.strip().splitlines()[-1:]}")
        return None
    return json.loads(lines[-1])


def bench_lenet_on_two_workers(args) -> DistributedResult:
    """Ours and the peer alternately for args.rounds rounds, the best of each (the load of a
    shared machine drifts over the minute one run of each takes)."""
    ours, peer = float("inf"), None
    for _ in range(args.rounds):
        ours = min(ours, run_lenet_job(args.ddp_batch, args.ddp_steps))
        run = run_ray_train_lenet(args.ddp_batch, args.ddp_steps)
        if run is not None and (peer is None or run["step_ms"] < peer["step_ms"]):
            peer = run
    return DistributedResult(args.ddp_batch, ours, peer)


# --- the sections ----------------------------------------------------------------------------

# name -> (our section, PyTorch's step for the peer). A new model adds one entry.
MODELS: dict[str, tuple[Callable, Callable]] = {
    "lenet": (bench_lenet, torch_lenet_step),
    "transformer": (bench_transformer, torch_transformer_step),
}


def run_as_peer(model: str, n: int, optimizer: str, threads: int) -> None:
    """The PyTorch side, in its own process: one JSON line with its mean step time and the
    bytes of the tensors its autograd saves for backward (parameters and the input excluded)."""
    import torch

    torch.set_num_threads(threads)
    step, module, inputs = MODELS[model][1](torch, optimizer)
    seconds = mean_time(step, n)
    not_activations = {p.untyped_storage().data_ptr() for p in module.parameters()}
    not_activations.add(inputs.untyped_storage().data_ptr())
    saved: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in not_activations:
            saved[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    print(json.dumps({"ref": "pytorch", "wall_seconds": seconds.wall,
                      "cpu_seconds": seconds.cpu, "saved_bytes": sum(saved.values())}))


def main() -> None:
    allocator.keep_freed_memory()  # a training process's setting (worker/backprop/allocator.py)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--n", type=int, default=30, help="steps per timing")
    parser.add_argument("--only", choices=sorted(MODELS) + [LENET_DDP, GENERATE],
                        action="append")
    parser.add_argument("--ddp-batch", type=int, default=64, help="global batch of lenet_ddp")
    parser.add_argument("--ddp-steps", type=int, default=60, help="timed steps of lenet_ddp")
    parser.add_argument("--optimizer", choices=["sgd", "adam"], default="sgd")
    parser.add_argument("--peer", choices=sorted(MODELS), help=argparse.SUPPRESS)
    parser.add_argument("--peer-generate", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=blas_threads(),
                        help="BLAS threads for NumPy and torch threads for PyTorch")
    args = parser.parse_args()
    if args.peer:
        run_as_peer(args.peer, args.n, args.optimizer, args.threads)
        return
    if args.peer_generate:
        print(json.dumps({"ref": "pytorch", "bytes_per_second":
                          torch_generation_rate(args.threads)}))
        return

    print(f"float32, {blas_threads()} BLAS threads on both sides, best of "
          f"{args.rounds} rounds x mean of {args.n} steps; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    selected = args.only or [*MODELS, LENET_DDP, GENERATE]
    results = [MODELS[name][0](args) for name in selected if name in MODELS]
    distributed = bench_lenet_on_two_workers(args) if LENET_DDP in selected else None
    generation = bench_generation(args) if GENERATE in selected else None
    for r in results:
        print(f"\n{r.name} ({r.optimizer}): ours {r.ours.wall * 1e3:.2f} ms/step "
              f"(CPU {r.ours.cpu * 1e3:.2f}), "
              f"PyTorch eager {r.torch.wall * 1e3:.2f} ms/step (CPU {r.torch.cpu * 1e3:.2f}), "
              f"CPU-time ratio {r.ours.cpu / r.torch.cpu:.3f}\n  peak memory "
              f"{r.peak_bytes / 2**20:.2f} MiB, minimum {r.minimum_bytes / 2**20:.2f} MiB "
              f"(PyTorch saves {r.torch_saved_bytes / 2**20:.2f} MiB); our graph holds "
              f"{r.held_after_forward_bytes / 2**20:.2f} MiB when backward starts")
    if distributed is not None:
        peer = distributed.peer
        print(f"\nLeNet-5 on {DDP_WORKERS} workers, global batch {distributed.batch}: ours "
              f"{distributed.ours_step_seconds * 1e3:.2f} ms/step "
              f"({distributed.batch / distributed.ours_step_seconds:.0f} samples/s), Ray Train DDP "
              + ("failed" if peer is None else f"{peer['step_ms']:.2f} ms/step "
                 f"({peer['samples_per_s']:.0f} samples/s, fit {peer['fit_wall_s']:.1f} s)"))
    if generation is not None:
        peer_rate = ("failed" if generation.torch is None
                     else f"{generation.torch:.0f} bytes/s")
        print(f"\ngenerating {GENERATE_BYTES} bytes after {len(GENERATE_PROMPT)} (greedy, "
              f"window {GENERATE_WINDOW}, {LAYERS} layers d{D_MODEL}): ours with the key/value "
              f"cache {generation.cached:.0f} bytes/s, with full passes "
              f"{generation.uncached:.0f} bytes/s, PyTorch eager's full-pass loop {peer_rate}")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")
    print("\nratios (target)")
    for result in results:
        for label, value, target in result.rows():
            verdict = "met" if value <= target else "NOT MET"
            print(f"  {label:40s} {value:6.3f}  (<= {target})  {verdict}")
    if generation is not None:
        speedup = generation.cached / generation.uncached
        print(f"  {'generate: cached vs full passes':40s} {speedup:6.2f}x  (no target: "
              f"O(context) vs O(context^2) per byte)")
        if generation.torch is not None:
            print(f"  {'generate: cached vs PyTorch full passes':40s} "
                  f"{generation.cached / generation.torch:6.2f}x  (no target)")
    if distributed is not None and distributed.ratio() is not None:
        ratio = distributed.ratio()
        verdict = "met" if ratio >= DDP_TARGET else "NOT MET"
        print(f"  {'lenet 2 workers samples/s vs Ray Train DDP':40s} {ratio:6.3f}  "
              f"(>= {DDP_TARGET})  {verdict}")
    for result in results:
        print(json.dumps({"model": result.name, "optimizer": result.optimizer,
                          "threads": blas_threads(),
                          "ours_ms": result.ours.wall * 1e3, "ours_cpu_ms": result.ours.cpu * 1e3,
                          "pytorch_ms": result.torch.wall * 1e3,
                          "pytorch_cpu_ms": result.torch.cpu * 1e3,
                          "peak_bytes": result.peak_bytes, "minimum_bytes": result.minimum_bytes,
                          "held_after_forward_bytes": result.held_after_forward_bytes,
                          "pytorch_saved_bytes": result.torch_saved_bytes}))
    if generation is not None:
        print(json.dumps({"model": GENERATE, "bytes": GENERATE_BYTES, "window": GENERATE_WINDOW,
                          "cached_bytes_per_s": generation.cached,
                          "uncached_bytes_per_s": generation.uncached,
                          "pytorch_full_pass_bytes_per_s": generation.torch}))
    if distributed is not None:
        print(json.dumps({"model": LENET_DDP, "workers": DDP_WORKERS, "batch": distributed.batch,
                          "ours_step_ms": distributed.ours_step_seconds * 1e3,
                          "ray_train_step_ms": distributed.peer and distributed.peer["step_ms"],
                          "ratio": distributed.ratio()}))


if __name__ == "__main__":
    main()
