"""A compressed step over the direct connections (worker/transport/compressed_direct.py), its
two ends over real sockets on loopback: the same bits and bytes as the object-store step of
compressed.py, a shard that goes away found at once by a worker waiting for its round, and a
message of the wrong size dropped with its connection. No Ray: the replicas and the shards
are plain objects here, as inside their actors."""

from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest

from chainrule.spec_file import load_job_spec
from scheduler.datasets import from_arrays, split_and_standardize
from worker.parameter_server import ParameterServerShard, ShardSetup
from worker.replica import ModelReplica, ReplicaSetup
from worker.resolved_job import resolve
from worker.transport import compressed, compressed_direct, direct
from worker.transport.compressed import StepUpdate
from worker.transport.compressed_direct import CompressedShardEnd, CompressedWorkerEnd, Inbox
from worker.transport.direct import Message, Op, ShardUnreachable

TOKEN = bytes(range(direct.TOKEN_BYTES))
TIMEOUT = 30.0  # far above what any wait below should take, even on a loaded machine
WORKERS = SHARDS = 2
# Each worker's micro-batches of a step (one block each).
MICRO_BATCHES = [[(0, np.arange(0, 8))], [(1, np.arange(8, 16))]]

SPEC = """
name: small
model: {layers: [{linear: {out_features: 8}}, {relu: {}}, {linear: {out_features: 3}}]}
loss: cross_entropy
optimizer: {adam: {lr: 0.01}}
data: {dataset: "upload:synthetic", batch_size: 16, epochs: 1, validation_fraction: 0.5}
communication: {compression: {powersgd: {rank: 2}}}
seed: 1
"""


def _replicas(count: int) -> list[ModelReplica]:
    rng = np.random.default_rng(0)
    raw = from_arrays(rng.standard_normal((64, 5)), rng.integers(0, 3, 64))
    dataset = split_and_standardize(raw, 0.5, True, 1)
    job = resolve(load_job_spec(SPEC), dataset.shape)
    replicas = [ModelReplica(ReplicaSetup(job, None), dataset.training_rows(),
                             owns_process=False) for _ in range(count)]
    for replica in replicas:
        replica.compute = _one_at_a_time(replica.compute)  # type: ignore[method-assign]
    return replicas


_ENGINE = threading.Lock()


def _one_at_a_time(compute):
    """The engine's grad mode is per process (each worker has its own): the replicas sharing
    this one take turns to compute."""

    def computed(*args, **kwargs):
        with _ENGINE:
            return compute(*args, **kwargs)

    return computed


def _shards(replica: ModelReplica) -> tuple[list[ParameterServerShard], list[tuple[int, int]]]:
    # Cut inside the first weight matrix: both shards receive its factors.
    bounds = [(0, 21), (21, replica.layout.size)]
    job = replica.job
    return [ParameterServerShard(ShardSetup(k, bounds[k], replica.layout, None, WORKERS,
                                            job.optimizer, job.hyperparameters,
                                            compression=job.compression), owns_process=False)
            for k in range(SHARDS)], bounds


def _connected() -> tuple[list[ModelReplica], list[ParameterServerShard], list[tuple[int, int]]]:
    replicas = _replicas(WORKERS)
    shards, bounds = _shards(replicas[0])
    for shard in shards:
        direct.listen_for_workers(shard, TOKEN, WORKERS, CompressedShardEnd)
    addresses = [_end(shard).address for shard in shards]
    for worker, replica in enumerate(replicas):
        direct.connect_to_shards(replica, worker, addresses, bounds, TOKEN, TIMEOUT,
                                 CompressedWorkerEnd)
    _wait_until(lambda: all(len(_end(shard).links) == WORKERS for shard in shards),
                "the workers' hellos were not taken")
    return replicas, shards, bounds


def _end(shard: ParameterServerShard) -> CompressedShardEnd:
    assert isinstance(shard.worker_links, CompressedShardEnd)
    return shard.worker_links


def _wait_until(condition, what: str) -> None:
    end = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < end, what
        time.sleep(0.01)


def _in_threads(calls: dict) -> dict:
    """Run every call at once, as the actors do (a worker waits for the shards' rounds)."""
    answers: dict = {}

    def run(name, call) -> None:
        try:
            answers[name] = call()
        except BaseException as error:  # noqa: BLE001 - re-raised below, in the test's thread
            answers[name] = error

    threads = [threading.Thread(target=run, args=item) for item in calls.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(TIMEOUT)
    for answer in answers.values():
        if isinstance(answer, BaseException):
            raise answer
    assert answers.keys() == calls.keys(), "a call did not end"
    return answers


def _direct_step(replicas, shards, step: int, update: StepUpdate | None) -> dict:
    calls: dict = {("worker", w): (lambda w=w: compressed_direct.compress_direct(
        replicas[w], w, MICRO_BATCHES[w], step, 16, None, update, TIMEOUT))
        for w in range(WORKERS)}
    calls.update({("shard", k): (lambda k=k: compressed_direct.reduce_compressed_direct(
        shards[k], step, WORKERS, TIMEOUT)) for k in range(SHARDS)})
    return _in_threads(calls)


def _object_store_step(replicas, shards, bounds, step: int, update: StepUpdate | None,
                       replies: list) -> tuple[list, list]:
    """compressed.py's step with the runner's hand-offs made by hand: (each worker's
    BlockResult, each shard's reply)."""
    firsts = [compressed.compress_block(replicas[w], w, MICRO_BATCHES[w], step, 16, None, bounds,
                                        update, *replies) for w in range(WORKERS)]
    rounds_one = [compressed.reduce_powersgd_first(shards[k], *[f[k] for f in firsts])
                  for k in range(SHARDS)]
    p_hats = [p_hat for p_hat, _ in rounds_one]
    seconds = [compressed.powersgd_second(replicas[w], w, bounds, *p_hats)
               for w in range(WORKERS)]
    answers = [compressed.reduce_powersgd_second(shards[k], *[s[k] for s in seconds])
               for k in range(SHARDS)]
    results = [dict(enumerate(f))[SHARDS][0] for f in firsts]
    written = [r.bytes_written + s[-1][0] for r, s in zip(results, seconds)]
    # What a shard sent every worker: P^, then its reply.
    received = [p_hat_bytes + a[2] for (_, (p_hat_bytes, _)), a in zip(rounds_one, answers)]
    return ([(a[0].squared_norm, sent) for a, sent in zip(answers, received)] + written,
            [a[1] for a in answers])


def test_two_powersgd_steps_over_loopback_give_the_bits_and_bytes_of_the_object_store_steps():
    replicas, shards, bounds = _connected()
    by_store = _replicas(WORKERS)
    store_shards, _ = _shards(by_store[0])
    update, replies = None, []
    for step in (1, 2):
        answers = _direct_step(replicas, shards, step, update)
        figures, replies = _object_store_step(by_store, store_shards, bounds, step, update,
                                              replies)
        direct_figures = [(answers["shard", k][0].squared_norm, answers["shard", k][1])
                          for k in range(SHARDS)]
        direct_figures += [answers["worker", w][0].bytes_written for w in range(WORKERS)]
        assert direct_figures == figures  # the norms to the bit, the bytes each way
        update = StepUpdate(step, 0.01, 1.0)
    digests = [compressed_direct.apply_received_update(r, update, TIMEOUT) for r in replicas]
    assert len(set(digests)) == 1
    compressed.apply_step_update(by_store[0], bounds, update, *replies)
    assert not np.array_equal(replicas[0].flat, _replicas(1)[0].flat)  # the updates moved it
    np.testing.assert_array_equal(replicas[0].flat, by_store[0].flat)


def test_a_worker_waiting_for_a_round_from_a_shard_that_goes_away_learns_it_at_once():
    replicas, shards, _ = _connected()
    links = replicas[0].shard_links
    assert isinstance(links, CompressedWorkerEnd)
    began = time.monotonic()
    _end(shards[1]).links[0].close()  # as the kernel does when the shard's process dies
    with pytest.raises(ShardUnreachable) as lost:
        links.wait(Op.P_HAT, 1, TIMEOUT)
    assert lost.value.shard == 1 and "closed" in str(lost.value)
    assert time.monotonic() - began < TIMEOUT / 3  # the closing, not the timeout, ended it


@pytest.mark.parametrize("header", [
    Message(Op.ROUND_ONE, 1, 1, 8),  # the wrong size for the job's round one
    Message(Op.CHUNK, 1, 1, 4),  # an uncompressed job's message
    Message(Op.ROUND_TWO, 1, 7, 4),  # a block the job does not have
])
def test_a_message_a_compressed_job_s_worker_may_not_send_closes_its_connection(header):
    _, shards, _ = _connected()
    end = _end(shards[0])
    intruder = socket.create_connection(end.address, timeout=TIMEOUT)
    intruder.sendall(Message(Op.HELLO, 0, 1, len(TOKEN)).pack() + TOKEN)
    intruder.sendall(header.pack() + bytes(header.first_bytes))
    assert intruder.recv(1 << 16) == b""
    assert end.inbox.messages == {}


def test_a_shard_answers_its_step_only_once_its_reply_is_in_the_kernel_s_hands():
    # The runner takes a shard's answer to mean the workers will have its REPLY: a shard
    # process that dies right after answering must not take a queued REPLY with it.
    replicas, shards, _ = _connected()
    unsent_at_answer: dict[int, list[int]] = {}

    def reduce_then_look(k: int):
        answer = compressed_direct.reduce_compressed_direct(shards[k], 1, WORKERS, TIMEOUT)
        unsent_at_answer[k] = []
        for worker, link in _end(shards[k]).links.items():
            try:
                link.flush(0)  # returns at once only if nothing is left to hand the kernel
            except TimeoutError:
                unsent_at_answer[k].append(worker)
        return answer

    calls: dict = {("worker", w): (lambda w=w: compressed_direct.compress_direct(
        replicas[w], w, MICRO_BATCHES[w], 1, 16, None, None, TIMEOUT)) for w in range(WORKERS)}
    calls.update({("shard", k): (lambda k=k: reduce_then_look(k)) for k in range(SHARDS)})
    _in_threads(calls)
    assert unsent_at_answer == {0: [], 1: []}
    for shard in shards:  # as the kernel does when the shards' processes die
        _end(shard).close()
    update = StepUpdate(1, 0.01, 1.0)
    digests = {compressed_direct.apply_received_update(r, update, TIMEOUT) for r in replicas}
    assert len(digests) == 1 and all(r.applied_update_step == 1 for r in replicas)


def test_every_block_a_worker_computes_in_a_step_reads_the_step_s_p_hat():
    inbox = Inbox()
    for k in range(SHARDS):
        inbox.accept(Op.P_HAT, 3, k, f"P^ of shard {k}")
    deadline = time.monotonic() + TIMEOUT
    first_block = inbox.read(Op.P_HAT, 3, SHARDS, deadline)
    second_block = inbox.read(Op.P_HAT, 3, SHARDS, deadline)
    assert first_block == second_block == ["P^ of shard 0", "P^ of shard 1"]


def test_an_inbox_keeps_only_the_step_in_progress_and_the_next():
    inbox = Inbox()
    inbox.accept(Op.P_HAT, 3, 0, "P^ of step 3")
    inbox.accept(Op.REPLY, 3, 0, "reply of step 3")
    inbox.accept(Op.P_HAT, 4, 0, "P^ of step 4")  # the first of step 4 drops step 3's
    assert inbox.messages == {(Op.P_HAT, 4): {0: "P^ of step 4"}}
    inbox.accept(Op.REPLY, 3, 1, "a late reply of step 3")  # not kept: its step is over
    assert inbox.messages == {(Op.P_HAT, 4): {0: "P^ of step 4"}}
    with pytest.raises(ValueError, match="of step 6 while at step 4"):
        inbox.accept(Op.P_HAT, 6, 0, "a step no worker can be at yet")
    assert inbox.read(Op.REPLY, 3, 1, time.monotonic()) is None
