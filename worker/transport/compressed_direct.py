"""A compressed step (compressed.py's) over the direct connections (direct.py's): PowerSGD's
two rounds and top-k's pairs go between the workers and the shards on their TCP links, and
the runner only starts the step and reads its figures.

Why: through the object store every round is a hand-off through Ray, worker -> object store ->
shard -> back, five per step, about 11 ms of a compressed step at 1 Gbit/s between two hosts
(bench/multihost.py), against a few hundred microseconds for the same factors on a link.

One step s, PowerSGD (top-k: round one carries the block's (indices, values) pairs, the
reply the sum's nonzero pairs, and there is no round two):

  runner --Ray: compress_direct(block, s, update of step s-1)--> each block's worker, and at
  runner --Ray: reduce_compressed_direct(s)--> every shard          the same time
  worker: waits for every shard's REPLY of step s-1 and applies that step's update (the
          clipping coefficient and learning rate ride in the call), computes the block and
          sends each shard its ROUND_ONE: its dense runs and P_b = M_b Q
  shard:  once every block's ROUND_ONE is in: sums, orthogonalises, sends every worker P_HAT
  worker: once every shard's P_HAT is in: sends each shard its ROUND_TWO, Q_b = M_b^T P^,
          then updates the block's error feedback while they travel; answers the runner with
          the block's figures
  shard:  once every block's ROUND_TWO is in: sums Q, sends every worker its REPLY (the dense
          runs' sums and Q), and answers the runner with its norms once the REPLY is in its
          kernel's hands (delivered even if the shard's process dies next)
  runner: the clipping coefficient from the norms, for the next step's calls (or for
          sync_parameters, which has every worker apply the update now)

The same functions of worker/compression.py on the same values in the same order as
compressed.py's step, so the same bits: only the carrier differs. Each message is received
with recv_into into arrays allocated for it (a matrix's factor into an array of its own).

Failures, as direct.py's: a worker waiting for a shard whose connection closed fails at once
with ShardUnreachable (ShardLost); a worker lost takes its error feedback with it
(ErrorFeedbackLost, a restart from the checkpoint: compressed.py); a shard waits for the
blocks' messages no longer than the step's deadline plus the transport's timeout. Between
steps (sync_parameters) the workers wait for the last step's REPLYs: that wait has heartbeats
to the shards too, and a shard lost there, or found gone by a worker, is ShardLost as well.

This module owns both ends of these messages: the runner's side (CompressedDirectTransport),
the shard's end (CompressedShardEnd, reduce_compressed_direct) and the worker's
(CompressedWorkerEnd, compress_direct, apply_received_update), which ParameterServerShard and
ModelReplica expose as remote methods. The connections, the HELLO and the ops are direct.py's.
"""

from __future__ import annotations

import dataclasses
import hashlib
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import ray

from worker.compression import (
    PowerSGD,
    PowerSGDPlan,
    PowerSGDShard,
    TopK,
    TopKShard,
    message_bytes,
    topk_count,
    topk_index_dtype,
    topk_reply,
)
from worker.transport.compressed import (
    CompressedObjectStoreTransport,
    StepUpdate,
    apply_update,
    first_messages,
    powersgd_worker,
)
from worker.transport.direct import (
    DirectTransport,
    Message,
    Op,
    ShardEnd,
    ShardUnreachable,
    WorkerEnd,
    WorkerNotConnected,
    unreachable_if_link_fails,
)
from worker.transport.liveness import ActorsLost
from worker.transport.object_store import _ShardGone
from worker.transport.socket_link import Link, LinkClosed
from worker.transport.step import (
    ActorFailure,
    ErrorFeedbackLost,
    ShardLost,
    StepFailure,
    StepOutcome,
    apply_coefficients,
)

if TYPE_CHECKING:
    from worker.parameter_server import ParameterServerShard, ReduceResult
    from worker.replica import BlockResult, ModelReplica


# --- the runner's side -------------------------------------------------------------------------


class CompressedDirectTransport(CompressedObjectStoreTransport, DirectTransport):
    """compressed.py's step with its messages on direct.py's connections: the connections,
    the heartbeats and the failures of a block are DirectTransport's; the parameters, the
    optimizer state, the checkpoints and the figures are CompressedObjectStoreTransport's."""

    # A lost worker's error feedback is gone with it whatever its messages reached: nothing
    # of its blocks to settle with the shards (ErrorFeedbackLost restarts the job).
    settles_lost_blocks = False

    def recompute(self, owners: Mapping[int, int]) -> StepOutcome | StepFailure:
        """The step's blocks (block -> worker); called once by run_step (a lost worker ends
        the step: ErrorFeedbackLost)."""
        work = self.work
        if work is None:
            raise RuntimeError("recompute() needs a step in progress")
        if work.carries_statistics:
            raise ValueError("gradient compression does not carry K-FAC statistics")
        update = self.update[0] if self.update is not None else None
        for block, worker in owners.items():
            lo, hi = work.block_ranges[block]
            self.owners[block] = worker
            self.calls[block] = self.actors.replicas[worker].compress_direct.remote(
                block, work.micro_batches[lo:hi], work.step, work.samples, self.master_buffers,
                update, work.deadline_seconds)
        # Called with the blocks, so that a shard starts summing the moment the last message
        # is in; it waits past the step's deadline (the runner's to enforce).
        calls = [shard.reduce_compressed_direct.options(num_returns=2).remote(
            work.step, len(work.block_ranges), work.deadline_seconds + self.timeout_seconds)
            for shard in self.actors.shards]
        failure = self._collect_blocks(work)
        if failure is not None:
            return failure
        self.update = None  # every block's worker has applied it
        try:
            reduced: list[ReduceResult] = self._from_shards([c[0] for c in calls], work)
            received: list[int] = self._from_shards([c[1] for c in calls], work)
        except ray.exceptions.RayActorError:
            return ShardLost(None, f"during step {work.step}")
        except ray.exceptions.RayTaskError as error:  # a shard's messages never all came
            return ShardLost(None, f"during step {work.step}: {error.cause}")
        except _ShardGone as gone:
            return gone.failure
        coefficient, _ = apply_coefficients(work, sum(r.squared_norm for r in reduced), ())
        self.update = (StepUpdate(work.step, work.lr, coefficient), [])
        # The blocks' figures already count both rounds' messages (compress_direct).
        no_second_round = [(0, 0.0)] * len(work.block_ranges)
        return self._outcome(work, reduced, no_second_round, received)

    def _apply_update_on_every_worker(self, update: StepUpdate,
                                      replies: list[ray.ObjectRef]) -> list[str]:
        """Every worker applies `update` with the shards' REPLYs it received. The workers wait
        on the shards, so the wait sends the shards heartbeats too; a shard lost (missing one,
        or gone before a worker had its REPLY) is ShardLost, a worker lost ErrorFeedbackLost,
        both as ActorFailure for the failure policy."""
        when = f"while the workers applied step {update.step}"
        replicas = self.actors.replicas

        def failure(gone: ActorsLost) -> StepFailure:
            shards = sorted(k for kind, k in gone.actors if kind == "shard")
            if shards:
                return ShardLost(shards[0], f"{when} ({gone.why(('shard', shards[0]))})")
            return ErrorFeedbackLost(update.step, tuple(sorted(w for _, w in gone.actors)))

        try:
            return self.liveness.answers_or_failure(
                {("worker", w): replica.apply_received_update.remote(update,
                                                                     self.timeout_seconds)
                 for w, replica in enumerate(replicas)},
                {("worker", w): replica for w, replica in enumerate(replicas)},
                self.timeout_seconds, failure,
                watching={("shard", k): shard for k, shard in enumerate(self.actors.shards)})
        except ray.exceptions.RayTaskError as error:
            if isinstance(error.cause, ShardUnreachable):
                raise ActorFailure(ShardLost(error.cause.shard,
                                             f"{when}: {error.cause}")) from error
            raise


# --- where messages wait for their reader -----------------------------------------------------


class Inbox:
    """The messages of the step in progress and the next one, by (op, step) and sender (a
    block, or a shard), until a newer step's first message drops the older steps'. A
    message of a step past the next one cannot be of this job's (steps run one after the
    other): a ValueError, which closes the connection that sent it."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.messages: dict[tuple[Op, int], dict[int, object]] = {}
        self.step = 0  # the newest step a message came for; 0: none yet (a new end)

    def accept(self, op: Op, step: int, sender: int, message: object) -> None:
        with self.changed:
            if step < 1 or (self.step and step > self.step + 1):
                raise ValueError(f"a {op.name} of step {step} while at step {self.step}: "
                                 f"not a step in progress")
            if step < self.step:
                return  # late: its step is over
            if step > self.step:
                self.step = step
                self.messages = {key: got for key, got in self.messages.items()
                                 if key[1] >= step}
            self.messages.setdefault((op, step), {})[sender] = message
            self.changed.notify_all()

    def wake(self) -> None:
        """Have the waiting readers look again (a connection closed)."""
        with self.changed:
            self.changed.notify_all()

    def missing(self, op: Op, step: int, senders: int) -> set[int]:
        """Senders 0..senders-1 whose message of `op` of step `step` is not in."""
        with self.changed:
            return set(range(senders)) - self.messages.get((op, step), {}).keys()

    def read(self, op: Op, step: int, senders: int, deadline: float,
             given_up: Callable[[set[int]], bool] = lambda missing: False) -> list | None:
        """The messages of senders 0..senders-1, in that order, once all are in; None if the
        deadline (time.monotonic()) passes or `given_up(the senders missing)` first. They
        stay for other readers (a worker's two blocks of a step both read its P^) until a
        newer step's messages come."""
        with self.changed:
            while absent := self.missing(op, step, senders):
                left = deadline - time.monotonic()
                if left <= 0 or given_up(absent):
                    return None
                self.changed.wait(left)
            got = self.messages[op, step]
            return [got[sender] for sender in range(senders)]


# --- the shards' side --------------------------------------------------------------------------


class CompressedShardEnd(ShardEnd):
    """Shard k's connections for a compressed job: the blocks' messages land in its inbox,
    checked against the sizes the job's compression gives them; nothing else is accepted."""

    def __init__(self, shard: ParameterServerShard, token: bytes, host: str, worker_count: int):
        # Set before the connections are accepted (ShardEnd's __init__ starts that).
        self.inbox = Inbox()
        self.dtype = np.dtype(shard.setup.layout.dtype)
        compressed = shard.compressed
        self.first_size = self.second_size = self.topk_pairs = 0
        if isinstance(compressed, PowerSGDShard):
            self.first_size = compressed.first_sum.total.size
            self.second_size = compressed.second_sum.total.size
        elif isinstance(compressed, TopKShard):
            compression = shard.setup.compression
            assert isinstance(compression, TopK)
            self.topk_pairs = topk_count(shard.hi - shard.lo, compression.ratio)
            self.index_dtype = topk_index_dtype(shard.hi - shard.lo)
        else:
            raise ValueError("a compressed shard end needs a job with communication.compression")
        super().__init__(shard, token, host, worker_count)

    def _receive(self, link: Link, worker: int) -> None:
        """One block's message of a round (ShardEnd._serve reads them one after another)."""
        header = link.receive_header(Message)
        expected = self._expected_bytes(header.op)
        if (expected is None or not 0 <= header.index < self.shard.setup.block_count
                or (header.first_bytes, header.second_bytes) != expected):
            raise ValueError(f"{link.name} sent {header}, not a compressed message of "
                             f"{expected} bytes")
        message: object
        if self.topk_pairs:
            indices = np.empty(self.topk_pairs, self.index_dtype)
            values = np.empty(self.topk_pairs, self.dtype)
            link.receive_into(indices)
            link.receive_into(values)
            message = (indices, values)
        else:
            message = np.empty(header.first_bytes // self.dtype.itemsize, self.dtype)
            link.receive_into(message)
        self.inbox.accept(header.op, header.number, header.index, message)

    def _expected_bytes(self, op: Op) -> tuple[int, int] | None:
        """(first, second) byte counts of a block's message of `op`; None: not one to get."""
        if self.topk_pairs:
            return ((self.topk_pairs * self.index_dtype.itemsize,
                     self.topk_pairs * self.dtype.itemsize) if op == Op.ROUND_ONE else None)
        if op == Op.ROUND_ONE:
            return self.first_size * self.dtype.itemsize, 0
        if op == Op.ROUND_TWO:
            return self.second_size * self.dtype.itemsize, 0
        return None

    def take(self, op: Op, step: int, blocks: int, deadline: float) -> list:
        messages = self.inbox.read(op, step, blocks, deadline)
        if messages is None:
            raise TimeoutError(f"step {step}: not every block's {op.name} message came in time")
        return messages

    def send_to_workers(self, op: Op, step: int, first: Sequence[np.ndarray],
                        second: Sequence[np.ndarray] = ()) -> int:
        """One message to every connected worker (a lost one's connection is gone: skipped);
        returns its bytes. The arrays must not change afterwards (the links send them
        later)."""
        first_bytes = sum(a.nbytes for a in first)
        second_bytes = sum(a.nbytes for a in second)
        header = Message(op, step, self.shard.setup.index, first_bytes, second_bytes)
        with self.lock:
            for link in self.links.values():
                try:
                    link.send(header, *first, *second)
                except LinkClosed:
                    pass  # that worker is gone; its reader forgets it
        return first_bytes + second_bytes

    def flush(self, deadline: float) -> None:
        """Until every message sent is in the kernel's hands, which delivers it even if this
        process dies next (the runner takes the shard's answer to mean that). A worker's
        connection that took nothing until `deadline` (time.monotonic()) is closed: that
        worker is stopped or cut off, and the runner's heartbeats find it."""
        with self.lock:
            links = list(self.links.values())
        for link in links:
            try:
                link.flush(max(deadline - time.monotonic(), 1e-3))
            except LinkClosed:
                pass  # that worker is gone
            except TimeoutError:
                link.close()


def reduce_compressed_direct(shard: ParameterServerShard, step: int, blocks: int,
                             timeout_seconds: float) -> tuple[ReduceResult, int]:
    """The shard's part of a compressed step, its rounds as the blocks' messages come in;
    returns (its figures, the bytes it sent each worker)."""
    from worker.parameter_server import ReduceResult

    end = shard.worker_links
    if not isinstance(end, CompressedShardEnd):
        raise RuntimeError("the shard was not asked to listen for a compressed job's workers")
    deadline = time.monotonic() + timeout_seconds
    compressed = shard.compressed
    if isinstance(compressed, TopKShard):
        reduced = shard.reduce(compressed.dense_parts(end.take(Op.ROUND_ONE, step, blocks,
                                                               deadline)))
        indices, values = topk_reply(shard.gradient)
        sent = end.send_to_workers(Op.REPLY, step, [indices], [values])
        end.flush(deadline)
        return reduced, sent
    assert isinstance(compressed, PowerSGDShard)
    firsts = end.take(Op.ROUND_ONE, step, blocks, deadline)
    start = time.perf_counter()
    p_hat = compressed.reduce_first(firsts)
    sent = end.send_to_workers(Op.P_HAT, step, list(p_hat.values()))
    first_seconds = time.perf_counter() - start
    seconds = end.take(Op.ROUND_TWO, step, blocks, deadline)
    start = time.perf_counter()
    owned_q, norms = compressed.reduce_second(seconds)
    reduced = ReduceResult(sum(norms.values()), norms,
                           first_seconds + time.perf_counter() - start)
    # A copy: the dense sums live in a buffer the next step's round one writes.
    dense = compressed.dense_total.copy()
    sent += end.send_to_workers(Op.REPLY, step, [dense], list(owned_q.values()))
    end.flush(deadline)
    return reduced, sent


# --- the workers' side -------------------------------------------------------------------------


class CompressedWorkerEnd(WorkerEnd):
    """A compressed job's worker's connections to every shard: its messages go out on them,
    and the shards' P^ and replies come into its inbox."""

    def __init__(self, replica: ModelReplica, worker: int, addresses: Sequence[tuple[str, int]],
                 bounds: Sequence[tuple[int, int]], token: bytes, timeout_seconds: float):
        # Set before the connections are made (WorkerEnd's __init__ starts their readers).
        self.inbox = Inbox()
        self.dtype = replica.flat.dtype
        compression = replica.job.compression
        self.compression = compression
        self.applying = threading.Lock()  # one block's call applies a step's update
        if isinstance(compression, PowerSGD):
            plan = PowerSGDPlan.of(replica.layout, compression.rank)
            self.rank = compression.rank
            self.owned = [plan.owned_by(lo, hi) for lo, hi in bounds]
            self.dense_sizes = [sum(b - a for a, b in plan.dense_runs(lo, hi))
                                for lo, hi in bounds]
        elif not isinstance(compression, TopK):
            raise ValueError("a compressed worker end needs a job with "
                             "communication.compression")
        super().__init__(replica, worker, addresses, bounds, token, timeout_seconds)

    def _receive_slices(self, k: int, link: Link, destination: np.ndarray) -> None:
        """Shard k's P^ and replies, into the inbox (a compressed job's shards send no
        slices: the workers hold the parameters)."""
        try:
            while True:
                header = link.receive_header(Message)
                if header.op == Op.P_HAT and isinstance(self.compression, PowerSGD):
                    message: object = self._receive_p_hat(k, link, header)
                elif header.op == Op.REPLY:
                    message = self._receive_reply(k, link, header)
                else:
                    raise ValueError(f"shard {k} sent {header}: not a compressed job's message")
                self.inbox.accept(header.op, header.number, k, message)
        except (LinkClosed, ValueError):
            link.close()
            self.inbox.wake()

    def _receive_p_hat(self, k: int, link: Link, header: Message) -> dict[int, np.ndarray]:
        shapes = {m.index: (m.rows, self.rank) for m in self.owned[k]}
        _check(k, header, (_bytes(shapes, self.dtype), 0))
        return self._receive_matrices(link, shapes)

    def _receive_reply(self, k: int, link: Link, header: Message) -> tuple:
        """PowerSGD: (the dense runs' sums, Q by matrix); top-k: (indices, values)."""
        if isinstance(self.compression, PowerSGD):
            dense = np.empty(self.dense_sizes[k], self.dtype)
            shapes = {m.index: (m.columns, self.rank) for m in self.owned[k]}
            _check(k, header, (dense.nbytes, _bytes(shapes, self.dtype)))
            link.receive_into(dense)
            return dense, self._receive_matrices(link, shapes)
        lo, hi = self.bounds[k]
        index_dtype = topk_index_dtype(hi - lo)
        pairs = min(header.first_bytes // index_dtype.itemsize, hi - lo)  # the sum's nonzeros
        _check(k, header, (pairs * index_dtype.itemsize, pairs * self.dtype.itemsize))
        indices, values = np.empty(pairs, index_dtype), np.empty(pairs, self.dtype)
        link.receive_into(indices)
        link.receive_into(values)
        return indices, values

    def _receive_matrices(self, link: Link, shapes: Mapping[int, tuple[int, int]]
                          ) -> dict[int, np.ndarray]:
        """A factor of each matrix (by index), each into an array of its own."""
        factors = {index: np.empty(shape, self.dtype) for index, shape in shapes.items()}
        for factor in factors.values():
            link.receive_into(factor)
        return factors

    def wait(self, op: Op, step: int, timeout_seconds: float) -> list:
        """Every shard's message of `op` of step `step`, by shard; ShardUnreachable for the
        first shard whose connection closed without it, or that did not send it in time."""
        messages = self.inbox.read(op, step, len(self.links),
                                   time.monotonic() + timeout_seconds,
                                   lambda missing: any(self.links[k].closed for k in missing))
        if messages is not None:
            return messages
        missing = sorted(self.inbox.missing(op, step, len(self.links)))
        for k in missing:
            if self.links[k].closed:
                raise ShardUnreachable(k, f"parameter-server shard {k}'s connection closed "
                                          f"before it sent its {op.name} of step {step}")
        first = missing[0]
        raise ShardUnreachable(first, f"parameter-server shard {first} sent no {op.name} of "
                                      f"step {step} for {timeout_seconds:g} s")

    def send(self, k: int, op: Op, step: int, block: int, message) -> None:
        """Block `block`'s message to shard k: an array, or top-k's (indices, values)."""
        first, second = message if isinstance(message, tuple) else (message, None)
        arrays = (first,) if second is None else (first, second)
        with unreachable_if_link_fails(k):
            self.links[k].send(Message(op, step, block, first.nbytes,
                                       0 if second is None else second.nbytes), *arrays)


def _check(k: int, header: Message, expected: tuple[int, int]) -> None:
    """A shard's message must announce the sizes the job gives it."""
    if (header.first_bytes, header.second_bytes) != expected:
        raise ValueError(f"shard {k} sent {header}, not a {header.op.name} of {expected} bytes")


def _bytes(shapes: Mapping[int, tuple[int, int]], dtype: np.dtype) -> int:
    return sum(rows * columns for rows, columns in shapes.values()) * dtype.itemsize


def _worker_end(replica: ModelReplica, what: str) -> CompressedWorkerEnd:
    links = replica.shard_links
    if not isinstance(links, CompressedWorkerEnd):
        raise WorkerNotConnected(f"the worker given {what} is not connected to the shards "
                                 f"(connect_to_shards did not finish)")
    return links


def compress_direct(replica: ModelReplica, block: int,
                    micro_batches: list[tuple[int, np.ndarray]], step: int, batch_size: int,
                    master_buffers: np.ndarray | None, update: StepUpdate | None,
                    timeout_seconds: float) -> tuple[BlockResult, None]:
    """A worker's compressed step: apply the last step's `update` (with the shards' replies
    it received), compute block `block`, and take part in every round; returns the block's
    figures (bytes_written: every message it sent) once its messages are in the kernel's
    hands, and None for the chunk sends compressed.py's answer has none of."""
    links = _worker_end(replica, f"block {block} of step {step}")
    apply_seconds = 0.0
    if update is not None:
        apply_seconds = _apply_received(replica, links, update, timeout_seconds)
    gradient = np.empty_like(replica.flat)
    result = replica.compute(replica.layout.views(gradient), micro_batches, step, batch_size,
                             master_buffers)
    start = time.perf_counter()
    messages = first_messages(replica, block, gradient, links.bounds)
    for k, message in enumerate(messages):
        links.send(k, Op.ROUND_ONE, step, block, message)
    sent = message_bytes(messages)
    message_seconds = time.perf_counter() - start
    if isinstance(replica.job.compression, PowerSGD):
        p_hat = {index: p for part in links.wait(Op.P_HAT, step, timeout_seconds)
                 for index, p in part.items()}
        start = time.perf_counter()
        worker = powersgd_worker(replica)
        seconds = worker.second_messages(block, p_hat, links.bounds)
        for k, message in enumerate(seconds):
            links.send(k, Op.ROUND_TWO, step, block, message)
        worker.keep_error(block)  # while the messages travel and the shards sum them
        sent += message_bytes(seconds)
        message_seconds += time.perf_counter() - start
    links.flush(timeout_seconds)
    return dataclasses.replace(result, bytes_written=sent,
                               write_seconds=result.write_seconds + message_seconds,
                               apply_seconds=apply_seconds), None


def apply_received_update(replica: ModelReplica, update: StepUpdate,
                          timeout_seconds: float) -> str:
    """Apply `update` now (the runner needs the parameters before the next step); returns a
    digest of the parameter vector, which every worker's must match."""
    _apply_received(replica, _worker_end(replica, f"step {update.step}'s update"), update,
                    timeout_seconds)
    return hashlib.blake2b(replica.flat.data, digest_size=16).hexdigest()


def _apply_received(replica: ModelReplica, links: CompressedWorkerEnd, update: StepUpdate,
                    timeout_seconds: float) -> float:
    """Wait for every shard's reply of `update`'s step and apply it, once per step and worker
    (two blocks' calls on one worker carry the same update); returns its seconds."""
    with links.applying:
        if replica.applied_update_step == update.step:
            return 0.0
        replies = links.wait(Op.REPLY, update.step, timeout_seconds)
        return apply_update(replica, links.bounds, update, replies)
