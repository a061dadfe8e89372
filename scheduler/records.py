"""What the runner reports: one record per optimizer step, per evaluation and per recovery, as
plain data.

These are what the metrics exporter, the progress display and the gRPC WatchJob stream read;
they carry no Ray or protobuf types.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepTimings:
    """Where one step's wall time went, in seconds."""

    compute: float  # slowest block's forward + backward + local tree sum
    reduce: float  # the reduce-scatter: slowest block write plus slowest shard's sum
    apply: float  # slowest shard's optimizer step (a compressed job's: slowest worker's)
    gather: float  # moving updated parameters back to the replicas (0 with shared memory)
    wait: float  # the rest: call latency and synchronisation
    wall: float
    straggler_spread: float  # slowest block's compute minus the median block's
    # Gradient chunks in flight between workers and shards (object-store transport), summed
    # over the chunks, and the part of that hidden behind the workers' backward passes.
    communication: float = 0.0
    hidden_communication: float = 0.0


@dataclass(frozen=True)
class StepRecord:
    step: int  # optimizer steps completed, 1-based
    total_steps: int
    epoch: int
    samples: int  # samples in this step
    loss: float  # mean training loss over the step's samples
    train_correct: int
    learning_rate: float
    gradient_norm: float  # global L2 norm of the reduced gradient, before clipping
    parameter_gradient_norms: dict[str, float]  # per named parameter (vanishing / exploding)
    timings: StepTimings
    bytes_sent_per_worker: int  # counted where written: the gradient block
    bytes_received_per_worker: int  # counted where written: the updated parameter slices
    parameter_bytes: int  # the model's parameter vector, for scale
    workers: int  # workers alive at the end of the step
    worker_failures: int  # workers lost since the job started (cumulative)
    shard_failures: int = 0  # parameter-server shards lost, each recovered by a replay

    @property
    def samples_per_second(self) -> float:
        return self.samples / self.timings.wall if self.timings.wall > 0 else 0.0


@dataclass(frozen=True)
class EvaluationRecord:
    step: int
    epoch: int
    loss: float
    accuracy: float | None  # classification only
    samples: int


# What a job recovered from (RecoveryRecord.kind), each with what it means: a bounded set, a
# Prometheus label whose help text is made from these descriptions.
RECOVERY_KIND_DESCRIPTIONS = {
    "worker_lost": "a worker died or fell silent: its blocks recomputed by others, same step",
    "worker_replaced": "a new replica took a lost worker's place at a step boundary",
    "shard_lost": "a parameter-server shard died: the shards restarted from their kept state",
    "error_feedback_lost": "a compressed job's worker died with its error feedback: restarted "
                           "from a checkpoint",
    "lost_block_applied": "a lost worker's gradient reached the shards, which applied the step "
                          "before its block was computed again: restarted from a checkpoint",
    "worker_not_fenced": "a lost worker's process could not be ended before its blocks moved: "
                         "every actor restarted from the kept state or a checkpoint",
    "fence_unavailable": "shared memory was not used: the runner cannot end its workers' "
                         "processes here (no pidfds, another PID namespace)",
    "shared_memory_full": "no room in /dev/shm for the job's arrays: the object store instead",
    "ray_lost": "the service's Ray died: the run given up, the job requeued from a checkpoint",
    "lease_expired": "the runner stopped renewing its lease: the job requeued from a checkpoint",
    "node_drained": "a node it had actors on was drained: stopped at a step boundary, requeued",
    "node_gone": "a node chosen for it left before its actors were placed there: requeued",
    "runner_lost": "the runner's process died: the job requeued from a checkpoint",
}
RECOVERY_KINDS = tuple(RECOVERY_KIND_DESCRIPTIONS)


@dataclass(frozen=True)
class RecoveryRecord:
    """A failure the job recovered from, when the runner carried the recovery out."""

    step: int  # the step it happened in (worker_replaced: the first step the new one computes)
    kind: str  # one of RECOVERY_KINDS
    message: str  # for a person: "worker 1 lost at step 5086 (...): recomputed in-step"


@dataclass(frozen=True)
class RunPlacement:
    """Where a run's actors are reserved, as a detached runner reports it to a server that
    attaches to the run: each worker's CPUs (the share the server that started it gave) and the
    node of each bundle, workers first then shards (its placement group is pinned to them)."""

    cpus_per_worker: float
    nodes: tuple[str, ...]
