"""The failure policy on its own: what it decides for each failure, and what it counts."""

from scheduler.failure_policy import Decision, FailurePolicy
from worker.transport.step import (
    BlockFailed,
    LostBlockApplied,
    ShardLost,
    WorkerNotFenced,
    WorkersLost,
)


def lost(*workers):
    return WorkersLost(step=7, workers=workers, unfinished_blocks=workers)


def test_lost_workers_are_recomputed_on_survivors_and_counted():
    policy = FailurePolicy()
    assert policy.decide(lost(1), survivors=1) is Decision.RECOMPUTE
    assert policy.decide(lost(0, 2), survivors=1) is Decision.RECOMPUTE
    assert policy.worker_failures == 3


def test_losing_the_last_worker_fails_the_job():
    policy = FailurePolicy()
    assert policy.decide(lost(0), survivors=0) is Decision.FAIL
    assert "every worker" in policy.why_failed(lost(0))


def test_a_lost_shard_restarts_from_the_checkpoint_until_the_limit_then_fails():
    policy = FailurePolicy(max_shard_restarts=2)
    shard = ShardLost(1, "during step 9")
    decisions = [policy.decide(shard, survivors=2) for _ in range(3)]
    assert decisions == [Decision.RESTART, Decision.RESTART, Decision.FAIL]
    assert policy.shard_restarts == 2
    assert "parameter-server shard 1 died during step 9" in policy.why_failed(shard)


def test_a_step_applied_before_its_lost_block_was_recomputed_restarts_within_the_same_limit():
    policy = FailurePolicy(max_shard_restarts=1)
    applied = LostBlockApplied(step=6, worker=0, shard=1)
    assert policy.decide(applied, survivors=1) is Decision.RESTART
    assert policy.decide(applied, survivors=1) is Decision.FAIL
    assert "reached parameter-server shard 1, which applied step 6" in policy.why_failed(applied)


def test_an_error_in_the_jobs_own_computation_fails_without_retrying():
    policy = FailurePolicy()
    error = BlockFailed(step=3, block=0, worker=1, message="ValueError: NaN in the loss")
    assert policy.decide(error, survivors=2) is Decision.FAIL
    assert policy.worker_failures == 0
    assert "worker 1 failed on step 3: ValueError: NaN in the loss" == policy.why_failed(error)


def test_replacements_stop_at_the_cap_for_the_whole_job():
    policy = FailurePolicy(max_worker_replacements=3)
    assert policy.workers_to_replace([1, 2]) == [1, 2]
    assert policy.workers_to_replace([]) == []
    assert policy.workers_to_replace([0, 3]) == [0]
    assert policy.workers_to_replace([3]) == []
    assert policy.worker_replacements == 3


def test_a_standby_shard_is_kept_once_the_job_has_run_its_delay_and_never_when_disabled():
    policy = FailurePolicy()  # 10 s: a job that ends within seconds pays for no idle process
    assert not policy.wants_standby_shard(9.9)
    assert policy.wants_standby_shard(10.0)
    assert FailurePolicy(standby_shard_after_seconds=0).wants_standby_shard(0.0)
    assert not FailurePolicy(standby_shard_after_seconds=None).wants_standby_shard(1e9)


def test_standby_shards_stop_at_one_more_than_the_shard_restarts_allowed():
    # Each lost shard uses one, and so does one that never starts (its node gone).
    policy = FailurePolicy(max_shard_restarts=2, standby_shard_after_seconds=0)
    assert [policy.wants_standby_shard(60.0) for _ in range(5)] == [True] * 3 + [False] * 2


def test_a_slot_whose_workers_twice_in_a_row_could_not_connect_gets_no_more_replacements():
    policy = FailurePolicy()
    unconnected = WorkersLost(step=4, workers=(1,), unfinished_blocks=(1,), unconnected=(1,))
    assert policy.decide(unconnected, survivors=1) is Decision.RECOMPUTE
    assert policy.why_not_replaced(1) is None
    assert policy.workers_to_replace([1]) == [1]  # once may be a passing fault
    assert policy.decide(unconnected, survivors=1) is Decision.RECOMPUTE
    assert policy.workers_to_replace([0, 1]) == [0]
    assert policy.why_not_replaced(1) == (
        "worker slot 1 gets no more replacements: its last 2 workers could not connect to the "
        "parameter-server shards (at most 2 in a row)")
    assert policy.worker_replacements == 2  # the slot left vacant used none


def test_a_loss_of_another_kind_ends_a_slots_run_of_workers_that_could_not_connect():
    policy = FailurePolicy(max_unconnected_in_a_row=2)
    unconnected = WorkersLost(step=4, workers=(1,), unfinished_blocks=(1,), unconnected=(1,))
    policy.decide(unconnected, survivors=1)
    policy.decide(lost(1), survivors=1)  # that worker had connected: it died computing
    policy.decide(unconnected, survivors=1)
    assert policy.workers_to_replace([1]) == [1]


def test_a_lost_worker_that_cannot_be_fenced_restarts_every_actor_within_the_restart_budget():
    policy = FailurePolicy(max_shard_restarts=1)
    unfenced = WorkerNotFenced(step=9, workers=(1,),
                               why="worker 1's process 4242 still runs 120 s after SIGKILL")
    assert policy.decide(unfenced, survivors=3) is Decision.RESTART  # survivors or not
    assert policy.decide(unfenced, survivors=3) is Decision.FAIL
    assert policy.why_failed(unfenced) == (
        "workers [1] lost at step 9 could not be stopped from writing into shared memory "
        "(worker 1's process 4242 still runs 120 s after SIGKILL), after 1 restarts from a "
        "checkpoint (at most 1)")
