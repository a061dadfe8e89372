"""The shards' kept state in shared memory: what a runner reads back after a shard is lost."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from worker.backprop.optim import RULES
from worker.backprop.optim.functional import AdamHyper, SGDHyper
from worker.shard_state_replica import (
    ShardReplicaSpec,
    ShardStateWriter,
    read_kept_state,
    replica_arrays,
    state_keys_of,
)
from worker.shared_memory import SharedArrayGroup

SIZE = 10
BOUNDS = [(0, 4), (4, 10)]


@pytest.fixture
def replica():
    group = SharedArrayGroup("replica-test")
    wanted = replica_arrays(len(BOUNDS), SIZE, ("exp_avg", "exp_avg_sq"), "float32")
    arrays = {Path(spec.path).name: spec for spec in group.create_all(wanted)}
    spec = ShardReplicaSpec((arrays["shard-replica-0"], arrays["shard-replica-1"]),
                            arrays["shard-replica-steps"], ("exp_avg", "exp_avg_sq"))
    spec.steps.attach()[:] = -1
    yield spec
    group.remove()


def shard_state(seed: float, lo: int, hi: int) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    values = np.arange(lo, hi, dtype=np.float32) + seed
    return values, {"exp_avg": values * 2, "exp_avg_sq": values * 3}


def test_the_state_every_shard_kept_after_a_step_reads_back_whole(replica):
    for step in (1, 2):
        for index, (lo, hi) in enumerate(BOUNDS):
            parameters, state = shard_state(step * 100, lo, hi)
            ShardStateWriter(replica, index, (lo, hi), parameters, state).keep(step, step + 4)
    kept = read_kept_state(replica, 1)
    assert kept is not None and kept.step == 1 and kept.optimizer_steps == 5
    np.testing.assert_array_equal(kept.parameters, np.arange(SIZE) + 100)
    np.testing.assert_array_equal(kept.optimizer_state["exp_avg_sq"], (np.arange(SIZE) + 100) * 3)
    later = read_kept_state(replica, 2)
    assert later is not None
    np.testing.assert_array_equal(later.parameters, np.arange(SIZE) + 200)


def test_a_step_one_shard_did_not_keep_is_not_read(replica):
    for index, (lo, hi) in enumerate(BOUNDS):
        ShardStateWriter(replica, index, (lo, hi), *shard_state(0, lo, hi)).keep(3, 3)
    lo, hi = BOUNDS[0]
    ShardStateWriter(replica, 0, (lo, hi), *shard_state(1, lo, hi)).keep(4, 4)
    assert read_kept_state(replica, 4) is None  # shard 1 died before keeping step 4
    assert read_kept_state(replica, 3) is not None  # the other half still holds step 3
    assert read_kept_state(replica, 7) is None  # never kept


def test_a_copy_cut_short_leaves_its_half_marked_empty(replica):
    lo, hi = BOUNDS[1]
    parameters, state = shard_state(0, lo, hi)
    writer = ShardStateWriter(replica, 1, (lo, hi), parameters, state)
    writer.sources[1] = None  # type: ignore[call-overload]  # the copy fails midway
    with pytest.raises(TypeError):
        writer.keep(6, 6)
    assert replica.steps.attach()[0, 1, 0] == -1


def test_the_replicated_arrays_are_the_rules_state_arrays():
    assert state_keys_of(RULES["adam"], AdamHyper()) == ("exp_avg", "exp_avg_sq")
    assert state_keys_of(RULES["sgd"], SGDHyper(lr=0.1)) == ()
