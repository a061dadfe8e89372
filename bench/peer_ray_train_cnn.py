"""Peer baseline: Ray Train's TorchTrainer (PyTorch DDP over gloo, CPU) on LeNet-5.

After ../shared/bench/peer_ray_train.py (the MLP peer), with the CNN of bench/models.py: the
same LeNet-5 on synthetic 1x28x28 images, SGD lr 0.01, the global batch split over the workers,
each with 1 torch thread per core it is given. Rank 0 times `--steps` steps after 5 warm-up
steps (forward, backward with DDP's gradient all-reduce, optimizer step).

Prints one JSON line: {"peer": "ray-train-ddp-lenet", "workers": N, "batch": B,
"step_ms": ..., "samples_per_s": ..., "fit_wall_s": ...}. Needs `pip install -e ".[bench]"`
(ray[train] and torch 2.13.0 CPU).

    python bench/peer_ray_train_cnn.py --workers 2 --batch 64 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

WARMUP_STEPS = 5


def lenet(torch_nn):
    """LeNet-5 exactly as bench/models.py's `lenet` builds it (written out: the Ray Train
    workers import this function by value, not the bench package)."""
    return torch_nn.Sequential(
        torch_nn.Conv2d(1, 6, 5, padding=2), torch_nn.ReLU(), torch_nn.MaxPool2d(2),
        torch_nn.Conv2d(6, 16, 5), torch_nn.ReLU(), torch_nn.MaxPool2d(2), torch_nn.Flatten(),
        torch_nn.Linear(400, 120), torch_nn.ReLU(), torch_nn.Linear(120, 84), torch_nn.ReLU(),
        torch_nn.Linear(84, 10),
    )


def train_loop(config: dict) -> None:
    import ray.train
    import ray.train.torch
    import torch

    torch.set_num_threads(config["threads"])
    torch.manual_seed(0)
    model = ray.train.torch.prepare_model(lenet(torch.nn))
    sgd = torch.optim.SGD(model.parameters(), lr=0.01)
    context = ray.train.get_context()
    local_batch = config["batch"] // context.get_world_size()
    x = torch.randn(local_batch, 1, 28, 28)
    y = torch.randint(0, 10, (local_batch,))
    for i in range(WARMUP_STEPS + config["steps"]):
        if i == WARMUP_STEPS:
            start = time.perf_counter()
        sgd.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        sgd.step()
    step_seconds = (time.perf_counter() - start) / config["steps"]
    if context.get_world_rank() == 0:
        with open(config["out"], "w") as f:
            f.write(str(step_seconds))
    ray.train.report({"step_seconds": step_seconds})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=64, help="global batch")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    args = parser.parse_args()

    import ray
    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    out = tempfile.NamedTemporaryFile(delete=False, suffix=".step").name
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    config = {"batch": args.batch, "steps": args.steps,
              "threads": max(1, args.cpus // args.workers), "out": out}
    trainer = TorchTrainer(
        train_loop, train_loop_config=config,
        scaling_config=ScalingConfig(num_workers=args.workers, use_gpu=False,
                                     resources_per_worker={"CPU": args.cpus / args.workers}),
    )
    start = time.time()
    trainer.fit()
    wall = time.time() - start
    ray.shutdown()
    with open(out) as f:
        step_seconds = float(f.read())
    os.unlink(out)
    print(json.dumps({"peer": "ray-train-ddp-lenet", "workers": args.workers,
                      "batch": args.batch, "step_ms": round(step_seconds * 1e3, 3),
                      "samples_per_s": round(args.batch / step_seconds, 1),
                      "fit_wall_s": round(wall, 1)}))


if __name__ == "__main__":
    main()
