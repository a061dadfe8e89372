"""How a parameter-server shard's state outlives its process: a copy in the job's shared memory.

A shard owns its slice's optimizer state (Adam's moments, the step count) in its own process, so
a SIGKILLed shard used to take it along, and the job went back to its last checkpoint. On the
shared-memory transport every shard now copies, after each optimizer step and before it reports
the step applied, its slice of the parameters and of each optimizer-state array into a replica
in shared memory, which the runner owns and which outlives the shard.

The replica has two halves, by step parity: step s is written into half s % 2 while half
(s - 1) % 2 still holds step s - 1 whole, so a shard killed halfway through its copy leaves the
previous step intact. Each half records, per shard, the job step and the optimizer step count
it holds, written after the arrays. When a shard is lost during step s, the runner reads half
(s - 1) % 2: every shard reported step s - 1 applied (after writing it), so the job's whole
state as of step s - 1 is there. New shards load it, the shared parameters are set back to it,
and step s runs again: the only one computed twice, none lost.

Only elementwise rules are replicated (their state is one array per key over the slice); K-FAC
and Adafactor keep their state per layer or per parameter, and a lost shard of theirs still
restarts the job from its last checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from worker.shared_memory import SharedArraySpec

PARITIES = 2


def replica_arrays(shards: int, parameter_count: int, state_keys: tuple[str, ...],
                   dtype: str) -> list[tuple[str, tuple[int, ...], str]]:
    """(label, shape, dtype) of the replica's arrays: per parity, one row for the parameters and
    one per state key, over the whole flat vector (each shard writes its own columns); and the
    (job step, optimizer steps) each shard's half holds (-1: nothing yet)."""
    rows = 1 + len(state_keys)
    return [*[(f"shard-replica-{parity}", (rows, parameter_count), dtype)
              for parity in range(PARITIES)],
            ("shard-replica-steps", (PARITIES, shards, 2), "int64")]


@dataclass(frozen=True)
class ShardReplicaSpec:
    """Where the replica lives; picklable, handed to the shards' step loops."""

    halves: tuple[SharedArraySpec, ...]  # by parity: rows (parameters, *state_keys)
    steps: SharedArraySpec  # [parity, shard] -> (job step, optimizer steps)
    state_keys: tuple[str, ...]


def state_keys_of(rule, hyper) -> tuple[str, ...]:
    """The names of an elementwise rule's state arrays (none for plain SGD)."""
    return tuple(rule.init_state(np.zeros(1), hyper).keys())


class ShardStateWriter:
    """A shard's side: `keep(step)` after each optimizer step."""

    def __init__(self, spec: ShardReplicaSpec, index: int, bounds: tuple[int, int],
                 parameters: np.ndarray, state: dict[str, np.ndarray]):
        lo, hi = bounds
        self.index = index
        self.sources = [parameters, *[state[key] for key in spec.state_keys]]
        self.halves = [half.attach()[:, lo:hi] for half in spec.halves]
        self.steps = spec.steps.attach()

    def keep(self, step: int, optimizer_steps: int) -> None:
        parity = step % PARITIES
        marker = self.steps[parity, self.index]
        marker[0] = -1  # the half is being written: it holds no step until the copy is done
        for row, source in zip(self.halves[parity], self.sources):
            np.copyto(row, source)
        marker[1] = optimizer_steps
        marker[0] = step


@dataclass(frozen=True)
class KeptState:
    """The job's parameters and optimizer state as every shard kept them after `step`."""

    step: int
    optimizer_steps: int
    parameters: np.ndarray
    optimizer_state: dict[str, np.ndarray]


def read_kept_state(spec: ShardReplicaSpec, step: int) -> KeptState | None:
    """Copies of what the shards kept after `step`, or None unless every shard's half holds
    that step (a run resumed at `step` has kept nothing of it yet)."""
    parity = step % PARITIES
    markers = spec.steps.attach()[parity]
    if not all(marker[0] == step for marker in markers):
        return None
    optimizer_steps = {int(marker[1]) for marker in markers}
    if len(optimizer_steps) != 1:  # every shard steps once per job step: a bug otherwise
        raise RuntimeError(f"the shards kept different optimizer step counts after step "
                           f"{step}: {sorted(optimizer_steps)}")
    rows = np.array(spec.halves[parity].attach())
    return KeptState(step, optimizer_steps.pop(), rows[0],
                     {key: rows[1 + i] for i, key in enumerate(spec.state_keys)})
