"""The direct transport's two ends (worker/transport/direct.py) over real sockets on loopback:
a step leaves the shards with the bits of the same step done in one process, the all-gather
lands in the replica's own parameter vector, and a shard that goes away, a stranger without the
job's token or a malformed chunk are found at once; strangers cannot hold a shard's port. No
Ray: the replica and the shards are plain objects here, as inside their actors."""

from __future__ import annotations

import errno
import socket
import threading
import time
import types

import numpy as np
import pytest

from tests.worker.transport.test_object_store_overlap import _replica
from worker.parameter_server import ParameterServerShard, ShardSetup
from worker.transport import direct
from worker.transport.direct import (
    DirectTransport,
    Message,
    Op,
    ParametersMovedOn,
    ShardEnd,
    ShardUnreachable,
    WorkerNotConnected,
)
from worker.transport.step import LostBlockApplied, StepWork, WorkersLost

TOKEN = bytes(range(direct.TOKEN_BYTES))
TIMEOUT = 30.0  # far above what any wait below should take, even on a loaded machine


def _shards_and_worker(shard_count: int = 2, block_count: int = 1):
    """Shards on loopback and worker 0's replica connected to them, as the runner sets up."""
    replica = _replica()
    bounds = replica.layout.shard_bounds(shard_count, align_to_parameters=False)
    shards = [_shard(replica, k, bounds[k], block_count) for k in range(shard_count)]
    for shard in shards:
        shard.worker_links = ShardEnd(shard, TOKEN, "127.0.0.1", worker_count=block_count)
    direct.connect_to_shards(replica, 0, [_end(s).address for s in shards], bounds, TOKEN,
                             TIMEOUT)
    _wait_until(lambda: all(0 in _end(shard).links for shard in shards),
                "the worker's hello was not taken")
    return replica, shards, bounds


def _shard(replica, k: int, bounds: tuple[int, int], block_count: int) -> ParameterServerShard:
    return ParameterServerShard(ShardSetup(k, bounds, replica.layout, None, block_count,
                                           replica.job.optimizer, replica.job.hyperparameters),
                                owns_process=False)


def _end(shard: ParameterServerShard) -> ShardEnd:
    assert shard.worker_links is not None
    return shard.worker_links


def _wait_until(condition, what: str) -> None:
    end = time.monotonic() + TIMEOUT
    while not condition():
        assert time.monotonic() < end, what
        time.sleep(0.01)


def test_a_step_over_loopback_gives_the_bits_of_the_same_step_in_one_process():
    replica, shards, bounds = _shards_and_worker()
    start = np.random.default_rng(4).standard_normal(replica.flat.size).astype(replica.flat.dtype)
    for shard, (lo, hi) in zip(shards, bounds):
        direct.load_and_send_parameters(shard, start[lo:hi], 1)
    micro_batches = [(0, np.arange(16)), (1, np.arange(16, 48))]

    result, _ = direct.compute_direct(replica, micro_batches, 1, 48, None, 0, 1, TIMEOUT)
    assert np.array_equal(replica.flat, start)  # the all-gather of version 1 came in place
    for shard in shards:
        direct.reduce_apply_direct(shard, 1, 1, TIMEOUT, 0.1, 2)
    links = replica.shard_links
    assert links is not None
    links.wait_for_parameters(2, TIMEOUT)

    # The same step in one process: the block from the same start, each shard's update.
    alone = _replica()
    alone.flat[:] = start
    gradient = np.empty_like(alone.flat)
    alone.compute(alone.layout.views(gradient), micro_batches, 1, 48)
    assert result.samples == 48
    for k, (lo, hi) in enumerate(bounds):
        reference = _shard(alone, k, (lo, hi), 1)
        reference.load_parameters(start[lo:hi])
        reference.reduce([gradient[lo:hi]])
        reference.apply(0.1)
        assert shards[k].parameters.tobytes() == reference.parameters.tobytes()
        assert replica.flat[lo:hi].tobytes() == reference.parameters.tobytes()
    assert not np.array_equal(replica.flat, start)


def test_a_worker_waiting_for_a_shard_that_goes_away_learns_it_at_once():
    replica, shards, _ = _shards_and_worker()
    end = _end(shards[1])
    began = time.monotonic()
    end.links[0].close()  # as the kernel does when the shard's process dies
    links = replica.shard_links
    assert links is not None
    with pytest.raises(ShardUnreachable) as lost:
        links.wait_for_parameters(1, TIMEOUT)
    assert lost.value.shard == 1 and "closed" in str(lost.value)
    assert time.monotonic() - began < TIMEOUT / 3  # the closing, not the timeout, ended it
    with pytest.raises(ShardUnreachable):
        links.send_chunk(1, 1, 0, np.zeros(3, np.float32), None, 1)
        links.flush(TIMEOUT)


def test_a_recomputed_block_whose_step_the_shards_applied_first_is_reported_not_computed():
    """A worker that died after its chunks left (they are in the kernel's hands when its
    process dies) lets the shards apply the step, which moves the survivor's parameters on in
    place: the survivor must not recompute the lost block from them (its figures and BatchNorm
    statistics would be of other parameters), and the runner must learn why."""
    replica, shards, bounds = _shards_and_worker(block_count=2)
    start = np.zeros(replica.flat.size, replica.flat.dtype)
    for shard, (lo, hi) in zip(shards, bounds):
        direct.load_and_send_parameters(shard, start[lo:hi], 1)
    direct.compute_direct(replica, [(0, np.arange(8))], 1, 16, None, 0, 1, TIMEOUT)
    for shard, (lo, hi) in zip(shards, bounds):  # the lost worker's block 1, delivered
        shard.inbox.accept(1, 1, np.zeros(hi - lo, replica.flat.dtype), None)
        direct.reduce_apply_direct(shard, 1, 2, TIMEOUT, 0.1, 2)
    links = replica.shard_links
    assert links is not None
    links.wait_for_parameters(2, TIMEOUT)

    with pytest.raises(ParametersMovedOn) as moved:  # the recomputation of block 1
        direct.compute_direct(replica, [(1, np.arange(8, 16))], 1, 16, None, 1, 1, TIMEOUT)
    # A slice that came before the block's chunk was sent is found at the sending too (a
    # slice after it is the step going well).
    with pytest.raises(ParametersMovedOn):
        links.send_chunk(0, 1, 1, np.zeros(bounds[0][1], np.float32), None, 1)
    links.send_chunk(0, 2, 0, np.zeros(bounds[0][1], np.float32), None, 2)

    actors = types.SimpleNamespace(replicas=[], shards=[])
    transport = DirectTransport(actors, replica.flat, bounds, [],
                                lambda buffers: np.zeros(0), timeout_seconds=TIMEOUT)
    work = StepWork(step=1, micro_batches=[], block_ranges=[(0, 1), (1, 2)],
                    block_owners=[0, 0], samples=16, lr=0.1, max_norm=None,
                    master_buffers=None, deadline_seconds=TIMEOUT)
    transport.owners = {0: 0, 1: 0}
    assert transport._block_error(work, 1, moved.value) == LostBlockApplied(1, 0, moved.value.shard)


def _raw_hello(shard: ParameterServerShard, token: bytes, worker: int) -> socket.socket:
    connection = socket.create_connection(_end(shard).address, timeout=TIMEOUT)
    connection.sendall(Message(Op.HELLO, 0, worker, len(token)).pack() + token)
    return connection


def test_a_connection_without_the_jobs_token_is_dropped_and_sent_nothing():
    _, shards, bounds = _shards_and_worker(1, block_count=2)
    shard = shards[0]
    direct.load_and_send_parameters(shard, np.zeros(bounds[0][1], np.float32), 1)
    stranger = _raw_hello(shard, bytes(direct.TOKEN_BYTES), 1)
    assert stranger.recv(1 << 16) == b""  # closed, without a byte of the parameters
    assert set(_end(shard).links) == {0}  # only the real worker's


def test_a_chunk_of_the_wrong_size_closes_the_connection_and_is_not_filed():
    _, shards, _ = _shards_and_worker(1, block_count=2)
    shard = shards[0]
    intruder = _raw_hello(shard, TOKEN, 1)
    _wait_until(lambda: 1 in _end(shard).links, "the hello was not taken")
    intruder.sendall(Message(Op.CHUNK, 1, 1, 8).pack() + bytes(8))
    assert intruder.recv(1 << 16) == b""
    _wait_until(lambda: 1 not in _end(shard).links, "the closed connection stayed registered")
    assert shard.inbox.gradients == {}


@pytest.mark.parametrize("header", [
    Message(Op.SLICE, 1, 0, 4),  # an op a worker never sends
    Message(Op.CHUNK, 1, 7, 4),  # a block the job does not have
])
def test_a_message_a_worker_may_not_send_closes_its_connection(header):
    _, shards, _ = _shards_and_worker(1, block_count=2)
    intruder = _raw_hello(shards[0], TOKEN, 1)
    intruder.sendall(header.pack())
    assert intruder.recv(1 << 16) == b""


def test_a_hello_for_a_slot_past_the_jobs_workers_is_dropped():
    _, shards, _ = _shards_and_worker(1, block_count=2)
    _end(shards[0]).worker_count = 1  # two blocks, one worker: slot 1 is nobody's
    stranger = _raw_hello(shards[0], TOKEN, 1)
    assert stranger.recv(1 << 16) == b""
    assert set(_end(shards[0]).links) == {0}


def test_a_stranger_trickling_its_hello_is_dropped_at_the_deadline_for_the_whole_hello(
        monkeypatch):
    monkeypatch.setattr(direct, "HELLO_SECONDS", 1.0)
    _, shards, _ = _shards_and_worker(1)
    hello = Message(Op.HELLO, 0, 0, len(TOKEN)).pack() + TOKEN
    interval = 0.2  # well inside HELLO_SECONDS: a deadline per read would never pass
    stranger = socket.create_connection(_end(shards[0]).address, timeout=TIMEOUT)
    dropped = threading.Event()

    def trickle() -> None:
        for byte in hello[:-1]:  # never the whole hello
            if dropped.wait(interval):
                return
            try:
                stranger.send(bytes([byte]))
            except OSError:
                return

    threading.Thread(target=trickle, daemon=True).start()
    began = time.monotonic()
    try:
        assert stranger.recv(1 << 16) == b""
    except ConnectionResetError:
        pass  # dropped while bytes were in flight: as closed
    finally:
        dropped.set()
    assert time.monotonic() - began < len(hello) * interval / 2


@pytest.mark.parametrize("cap", ["from one address", "in all"])
def test_waiting_strangers_do_not_keep_a_real_worker_out(monkeypatch, cap):
    if cap == "in all":  # loopback has one address: lift the per-address cap above the total
        monkeypatch.setattr(direct, "PENDING_HELLOS_PER_PEER", direct.PENDING_HELLOS + 10)
    replica, shards, bounds = _shards_and_worker(1)
    end = _end(shards[0])
    # More silent strangers than a shard lets wait, from the worker's own address.
    strangers = [socket.create_connection(end.address, timeout=TIMEOUT)
                 for _ in range(direct.PENDING_HELLOS + 1)]
    _wait_until(lambda: len(end.waiting) == min(direct.PENDING_HELLOS_PER_PEER,
                                                direct.PENDING_HELLOS),
                "the strangers were not all accepted")
    first = end.links[0]
    direct.connect_to_shards(replica, 0, [end.address], bounds, TOKEN, TIMEOUT)
    _wait_until(lambda: end.links.get(0) not in (None, first), "the real worker was kept out")
    for stranger in strangers:
        stranger.close()


class _ServerFailingItsFirstAccept(socket.socket):
    """A real listening socket whose first accept fails as the kernel's does when a connection
    is reset before it is taken."""

    failed = False

    def accept(self) -> tuple[socket.socket, tuple]:
        if not self.failed:
            self.failed = True
            raise OSError(errno.ECONNABORTED, "Software caused connection abort")
        return super().accept()


def test_a_failed_accept_does_not_close_the_shards_port(monkeypatch):
    def listen(host: str) -> socket.socket:
        server = _ServerFailingItsFirstAccept(socket.AF_INET, socket.SOCK_STREAM)
        server.bind((host, 0))
        server.listen()
        return server

    monkeypatch.setattr(direct, "listen", listen)
    replica, shards, _ = _shards_and_worker(1)  # waits until the worker's hello is taken
    server = _end(shards[0]).server
    assert isinstance(server, _ServerFailingItsFirstAccept) and server.failed


def test_a_standby_taking_over_closes_the_direct_end_it_had():
    _, shards, bounds = _shards_and_worker(1)
    end = _end(shards[0])
    shards[0].take_over(shards[0].setup)
    assert shards[0].worker_links is None
    with pytest.raises(OSError):
        socket.create_connection(end.address, timeout=TIMEOUT)
    _wait_until(lambda: all(link.closed for link in end.links.values()),
                "the old job's connections stayed open")


def test_a_block_given_to_a_worker_not_yet_connected_is_a_lost_worker_for_the_policy():
    """Replicas take two calls at once, so a step's block can reach a replica whose connect
    did not finish by the runner's deadline: that is a lost worker (its blocks recomputed by
    survivors), never the job's own computation failing."""
    replica = _replica()
    with pytest.raises(WorkerNotConnected) as raised:
        direct.compute_direct(replica, [(0, np.arange(4))], 3, 4, None, 1, 1, TIMEOUT)

    actors = types.SimpleNamespace(replicas=[], shards=[])
    transport = DirectTransport(actors, replica.flat, [(0, replica.flat.size)], [],
                                lambda buffers: np.zeros(0), timeout_seconds=TIMEOUT)
    work = StepWork(step=3, micro_batches=[], block_ranges=[(0, 1), (1, 2), (2, 3)],
                    block_owners=[0, 1, 1], samples=4, lr=0.1, max_norm=None,
                    master_buffers=None,
                    deadline_seconds=TIMEOUT)
    transport.owners = {0: 0, 1: 1, 2: 1}
    failure = transport._block_error(work, 1, raised.value)
    assert failure == WorkersLost(3, (1,), (1, 2), unconnected=(1,))


def test_a_shard_that_does_not_answer_the_connection_makes_the_worker_unconnected():
    """A host dropping the worker's SYNs (here: a port whose accept queue is full, where Linux
    drops them) leaves the worker unconnected, a lost worker, rather than the shard lost."""
    replica, shards, bounds = _shards_and_worker(1)
    bounds = replica.layout.shard_bounds(2, align_to_parameters=False)
    silent = socket.create_server(("127.0.0.1", 0), backlog=0)
    filling = socket.create_connection(silent.getsockname(), timeout=TIMEOUT)
    try:
        with pytest.raises(WorkerNotConnected):
            direct.connect_to_shards(replica, 0, [_end(shards[0]).address, silent.getsockname()],
                                     bounds, TOKEN, 0.5)
        assert replica.shard_links is None
    finally:
        filling.close()
        silent.close()
