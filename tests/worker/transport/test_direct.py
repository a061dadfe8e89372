"""The direct transport's two ends (worker/transport/direct.py) over real sockets on loopback:
a step leaves the shards with the bits of the same step done in one process, the all-gather
lands in the replica's own parameter vector, and a shard that goes away, a stranger without the
job's token or a malformed chunk are found at once; strangers cannot hold a shard's port. A
chunk counts only once its block is delivered everywhere, so a lost worker's block is either
delivered (its figures come from the shards) or recomputed, never half of each. No Ray: the
replica and the shards are plain objects here, as inside their actors (tests/chaos/ kills real
workers)."""

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
from worker.replica import BlockResult
from worker.transport import direct
from worker.transport.direct import (
    DirectTransport,
    FiguresSize,
    Message,
    Op,
    ParametersMovedOn,
    ShardEnd,
    ShardNotReached,
    ShardUnreachable,
    WorkerNotConnected,
    block_figures,
    read_block_figures,
)
from worker.transport.object_store import ChunkSends
from worker.transport.step import LostBlockApplied, StepWork, WorkersLost

TOKEN = bytes(range(direct.TOKEN_BYTES))
TIMEOUT = 30.0  # far above what any wait below should take, even on a loaded machine
# The replica here has no buffers, but the lost workers below send the figures of a model with
# 4 buffer values (BatchNorm statistics) per micro-batch, of up to 2 micro-batches.
BUFFER_VALUES, MICRO_BATCHES = 4, 2


def _figures_size(shards: int) -> FiguresSize:
    return FiguresSize(shards, BUFFER_VALUES, MICRO_BATCHES)


def _shards_and_worker(shard_count: int = 2, block_count: int = 1):
    """Shards on loopback and worker 0's replica connected to them, as the runner sets up."""
    replica = _replica()
    bounds = replica.layout.shard_bounds(shard_count, align_to_parameters=False)
    shards = [_shard(replica, k, bounds[k], block_count) for k in range(shard_count)]
    for shard in shards:
        shard.worker_links = ShardEnd(shard, TOKEN, "127.0.0.1", worker_count=block_count)
        shard.worker_links.figures_size = _figures_size(shard_count)
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
    """The check behind the delivery rule: were a shard to apply a step while a survivor
    recomputes one of its blocks (here the lost block is filed by hand, as no shard does
    since DELIVERED), the new parameters would move on under the survivor: it must not
    recompute the block from them (its figures and BatchNorm statistics would be of other
    parameters), and the runner must learn why."""
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


def _lost_worker(shards, bounds, dtype):
    """Worker slot 1 on raw connections to every shard, and its block 1 of step 1: a chunk
    per shard and the block's figures (two micro-batches of four buffer values each)."""
    connections = [_raw_hello(shard, TOKEN, 1) for shard in shards]
    _wait_until(lambda: all(1 in _end(shard).links for shard in shards), "hello not taken")
    chunks = [np.full(hi - lo, k + 1.0, dtype) for k, (lo, hi) in enumerate(bounds)]
    result = BlockResult(3.25, 8, 5, 0.5, 64, 0.01, None)
    figures = block_figures(result, ChunkSends({0: 10.0, 1: 11.0}, 12.0), len(shards),
                            [np.arange(4, dtype=np.float32), np.arange(4, 8, dtype=np.float32)])
    return connections, chunks, figures


def _wait_until_read(shards, worker: int) -> None:
    """Until every shard has read all `worker` sent before closing its connections."""
    _wait_until(lambda: all(worker not in _end(shard).links for shard in shards),
                "a closed connection stayed registered")


def _send_chunk(connection: socket.socket, chunk: np.ndarray) -> None:
    connection.sendall(Message(Op.CHUNK, 1, 1, chunk.nbytes).pack() + chunk.tobytes())


def _send_delivered(connection: socket.socket, figures: np.ndarray) -> None:
    connection.sendall(Message(Op.DELIVERED, 1, 1, figures.nbytes).pack() + figures.tobytes())


def test_a_blocks_figures_come_back_from_the_shards_with_the_bits_the_worker_had():
    result = BlockResult(0.1 + 0.2, 48, 17, 0.031, 4096, 0.002, None)
    sends = ChunkSends({1: 100.5, 0: 100.75}, 101.0)
    rows = [np.array([0.1, 3.0, 2.0], np.float32), np.array([1e-8, 2.5, 7.0], np.float32)]
    figures = block_figures(result, sends, 2, rows)

    back = read_block_figures(figures, 2, 2, np.dtype(np.float32))
    assert back.result == result and back.sends == sends
    assert [row.dtype for row in back.buffers] == [np.float32] * 2
    assert all(a.tobytes() == b.tobytes() for a, b in zip(back.buffers, rows))
    assert read_block_figures(block_figures(result, sends, 2, []), 2, 2, None).buffers == []
    with pytest.raises(ValueError, match="do not fit a block of 4 micro-batches"):
        read_block_figures(figures, 2, 4, np.dtype(np.float32))  # 6 values in 4 rows


def test_a_chunk_counts_only_once_its_block_is_delivered_even_if_one_shard_heard_it():
    """A worker that died between its DELIVERED to shard 0 and to shard 1: its chunks are on
    both shards (DELIVERED follows their acknowledgement), so the block is delivered. Shard 1
    does not count it on its own (it cannot know), and counts it once the runner, having
    shard 0's figures, says so: no shard sums a block another is still waiting for."""
    replica, shards, bounds = _shards_and_worker(block_count=2)
    connections, chunks, figures = _lost_worker(shards, bounds, replica.flat.dtype)
    for connection, chunk in zip(connections, chunks):
        _send_chunk(connection, chunk)
    _send_delivered(connections[0], figures)
    for connection in connections:
        connection.shutdown(socket.SHUT_WR)  # the worker's process dies: its kernel says FIN
    _wait_until_read(shards, 1)
    assert (1, 1) in shards[0].inbox.gradients and (1, 1) not in shards[1].inbox.gradients

    held = [direct.settle_lost_blocks(shard, 1, {1: 1}, [1], TIMEOUT) for shard in shards]
    assert held[1] == {} and held[0][1].tobytes() == figures.tobytes()
    for shard in shards:
        direct.count_delivered_blocks(shard, 1, {1: 1})
    for shard, chunk in zip(shards, chunks):
        assert shard.inbox.gradients[1, 1].tobytes() == chunk.tobytes()


def test_a_lost_workers_block_no_shard_holds_as_delivered_goes_to_a_survivor_alone():
    """A worker lost after its chunks reached the shards but before it said DELIVERED (or
    silent: its DELIVERED comes late): the settled shards hold nothing of it, do not count
    its late DELIVERED, and sum the survivor's recomputation, which counts as usual."""
    replica, shards, bounds = _shards_and_worker(block_count=2)
    start = np.zeros(replica.flat.size, replica.flat.dtype)
    for shard, (lo, hi) in zip(shards, bounds):
        direct.load_and_send_parameters(shard, start[lo:hi], 1)
    connections, chunks, figures = _lost_worker(shards, bounds, replica.flat.dtype)
    for connection, chunk in zip(connections, chunks):
        _send_chunk(connection, chunk)
    _wait_until(lambda: all((1, 1, 1) in _end(s).chunks for s in shards), "chunks not read")

    assert [direct.settle_lost_blocks(s, 1, {1: 1}, [], 0.0) for s in shards] == [{}, {}]
    for connection in connections:
        _send_delivered(connection, figures)  # the silent worker wakes up: too late
        # Then is killed. FIN, not RST, although it never read its slice: a reset could
        # discard the DELIVERED on the shard before it is read, and prove nothing.
        connection.shutdown(socket.SHUT_WR)
    _wait_until_read(shards, 1)
    assert all((1, 1) not in shard.inbox.gradients for shard in shards)
    direct.compute_direct(replica, [(0, np.arange(8))], 1, 16, None, 0, 1, TIMEOUT)
    direct.compute_direct(replica, [(1, np.arange(8, 16))], 1, 16, None, 1, 1, TIMEOUT)
    _wait_until(lambda: all((1, 1) in s.inbox.gradients for s in shards), "not counted")
    for shard, chunk in zip(shards, chunks):
        assert shard.inbox.gradients[1, 1].tobytes() != chunk.tobytes()  # the survivor's
        direct.reduce_apply_direct(shard, 1, 2, TIMEOUT, 0.1, 2)
    links = replica.shard_links
    assert links is not None
    links.wait_for_parameters(2, TIMEOUT)


def test_settling_a_workers_lost_block_leaves_its_delivered_block_counting_everywhere():
    """Worker 1 computed blocks 1 and 2 (a replica takes two calls at once). Block 1 was
    delivered (every shard's host acknowledged its chunks and DELIVERED) and answered; the
    worker is then lost computing block 2, so the runner settles block 2 only. A shard whose
    reader had not got to block 1's DELIVERED yet must still count block 1 when it does, as
    the shard that read it first does: settling is per block, not per worker."""
    replica, shards, bounds = _shards_and_worker(block_count=3)
    connections, chunks, figures = _lost_worker(shards, bounds, replica.flat.dtype)
    for connection, chunk in zip(connections, chunks):
        _send_chunk(connection, chunk)
    _send_delivered(connections[0], figures)
    _wait_until(lambda: (1, 1) in shards[0].inbox.gradients
                and (1, 1, 1) in _end(shards[1]).chunks, "block 1 not read")

    assert [direct.settle_lost_blocks(s, 1, {2: 1}, [], 0.0) for s in shards] == [{}, {}]
    _send_delivered(connections[1], figures)  # shard 1's reader gets to it only now
    for connection in connections:
        connection.shutdown(socket.SHUT_WR)
    _wait_until_read(shards, 1)
    for shard, chunk in zip(shards, chunks):
        assert shard.inbox.gradients[1, 1].tobytes() == chunk.tobytes()


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
    Message(Op.DELIVERED, 1, 7, 8),  # figures of a block the job does not have
    Message(Op.DELIVERED, 1, 0, 12),  # figures that are not float64 values
    Message(Op.DELIVERED, 1, 0, 0),  # no figures
    Message(Op.DELIVERED, 1, 0, 8 * (7 + 1 + 4 + 1)),  # part of a micro-batch's buffers
    Message(Op.DELIVERED, 1, 0, 8 * (7 + 1 + 4 * 3)),  # more micro-batches than a step has
    Message(Op.DELIVERED, 1, 0, 1 << 40),  # a terabyte: refused, never allocated
    Message(Op.CHUNK, 0, 0, 4),  # step 0: steps count from 1
])
def test_a_message_a_worker_may_not_send_closes_its_connection(header):
    _, shards, _ = _shards_and_worker(1, block_count=2)
    intruder = _raw_hello(shards[0], TOKEN, 1)
    intruder.sendall(header.pack())
    assert intruder.recv(1 << 16) == b""


def test_a_message_of_a_step_past_the_next_closes_its_connection_and_keeps_the_step():
    """A shard takes the next step's messages (step 2's at step 1: a worker that got the
    new parameters first) but none further ahead (step 4's at step 2): those would drop the
    step in progress's chunks, and the shard would wait out its deadline for them."""
    replica, shards, bounds = _shards_and_worker(1, block_count=2)
    connections, chunks, _ = _lost_worker(shards, bounds, replica.flat.dtype)
    _send_chunk(connections[0], chunks[0])
    next_step = Message(Op.CHUNK, 2, 1, chunks[0].nbytes).pack() + chunks[0].tobytes()
    connections[0].sendall(next_step)
    _wait_until(lambda: (2, 1, 1) in _end(shards[0]).chunks, "step 2's chunk not read")
    connections[0].sendall(Message(Op.CHUNK, 4, 1, chunks[0].nbytes).pack())
    assert connections[0].recv(1 << 16) == b""
    assert _end(shards[0]).step == 2 and (2, 1, 1) in _end(shards[0]).chunks


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


def test_a_refused_connection_names_the_shard_for_the_runner_to_ask_whether_it_lives():
    """A worker cannot tell a shard gone from a path that rejects it (a firewall's reject is
    a refusal too): it reports which shard and what happened, and connects to none."""
    replica, shards, bounds = _shards_and_worker(1)
    bounds = replica.layout.shard_bounds(2, align_to_parameters=False)
    closed = socket.create_server(("127.0.0.1", 0))
    address = closed.getsockname()
    closed.close()  # nothing listens there now: the kernel refuses
    with pytest.raises(ShardNotReached) as failed:
        direct.connect_to_shards(replica, 0, [_end(shards[0]).address, address], bounds,
                                 TOKEN, TIMEOUT)
    assert failed.value.shard == 1 and "could not be reached" in str(failed.value)
    assert replica.shard_links is None
