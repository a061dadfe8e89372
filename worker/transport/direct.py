"""A step over direct TCP connections between workers and shards: for actors on other hosts.

Why not the object store (object_store.py): there every chunk and every updated slice is a Ray
object, and a transfer between two hosts costs about 7 ms before its first byte, two of them
in series per step (profiled on the 10 Gbit/s namespace hosts, bench/multihost.py). Here the
bytes go over one TCP connection per worker and shard, straight from the sender's array into
the receiver's (socket_link.py); Ray carries only the runner's small calls and the figures.

Connections, made when the transport starts: each shard listens on its node's address, at a
port the kernel picks; the runner hands every worker the shards' addresses and the job's
random token through Ray calls (Ray's own channel is authenticated); each worker connects to
every shard and says HELLO with its slot and the token. A shard drops a connection whose token
is wrong, or whose message has an op, a block, a size or a step other than the job's.

One step, version v being the parameters the step starts from (the runner counts versions:
one per step, one per push of the runner's vector):

  runner --Ray: compute_direct(block, v)--> each block's worker, and at the same time
  runner --Ray: reduce_apply_direct(step, v+1)--> every shard, which waits for the chunks
  worker: waits until every shard's SLICE of version v is in its parameter vector (received
      in place), computes the block, and sends shard k its CHUNK as soon as it is known:
      during the last micro-batch's backward pass, as object_store.py does (ChunkSender);
      once every shard's host has acknowledged its chunk, it sends every shard DELIVERED with
      the block's figures (what the runner takes from a block: loss, samples, right
      predictions, timings, each micro-batch's BatchNorm statistics)
  shard:  once every block's DELIVERED is in (a chunk counts from then on: ChunkInbox), sums
      the chunks in the fixed tree order, applies the optimizer, sends every worker its SLICE
      of version v+1 (the all-gather), and answers the runner with the figures
With global-norm clipping or K-FAC's KL clip the shards first answer with their norms, and
the runner sends the coefficients with apply_and_send. The shard's call is made with the
blocks' (not after them) so that a shard starts summing the moment the last chunk is in, and
so that the runner sends the shards heartbeats while the blocks compute.

The runner's side reports what went wrong and decides nothing, as object_store.py's does, which
it extends: a worker that dies or falls silent is WorkersLost (the shards go on waiting for its
blocks, so `recompute` on a survivor completes the step with the same bits); a shard that dies
closes its connections, so the workers waiting for its slice or sending it a chunk fail at once
with ShardUnreachable, which is ShardLost (and the shard's silence on its heartbeat is too);
a worker's closed connection frees the shard's thread reading it. A worker that could not
connect (in time, or at all to a shard that still answers its heartbeat: the path between is
broken) raises WorkerNotConnected when given a block: WorkersLost too.

A worker lost after its chunks left: why DELIVERED. Its chunks may have reached some shards
and not others (one connection per shard), and a shard that counted a lost block would apply
the step while a survivor recomputes it for the others, moving the survivor's parameters
under it. So a shard counts a chunk only once its sender says DELIVERED, which it says only
after every shard's host acknowledged every chunk of the block (socket_link.py): one shard
holding a DELIVERED proves that every shard has or will read the block's chunks. (A dying
worker's kernel resets a connection, which can discard what the shard has not read yet, only
when unread bytes came in on it: a slice, which its shard sends after reading all of the
step.) The cost, per block and step: two round trips and the figures. DELIVERED leaves one
acknowledgement (a round trip) after the block's last chunk, and the shards start summing when
it arrives; the worker answers the runner one acknowledgement later (so that a block the runner
has is one every shard counts). DELIVERED goes to each of the K shards with the whole figures:
7 + K float64 values and, for a model with BatchNorm, each micro-batch's running statistics,
which a shard keeps until the next step and reads only when the worker is lost. For an MLP
that is a few hundred bytes; for a BatchNorm-heavy CNN, K x micro-batches x its statistics.
(Off Linux a link knows only that its bytes are in its own kernel's hands, socket_link.py:
that still survives the worker's process dying, not its host going down.)

When the runner finds workers lost it settles their blocks with the shards
(`settle_lost_blocks`): each shard, once a dead worker's connection has closed (all it sent
has been read), stops taking DELIVERED of those blocks from the lost workers in the step and
answers with the figures of those it holds as delivered. A block any shard holds is delivered:
every shard is told to count it (`count_delivered_blocks`), its figures come from the shards and
nothing is recomputed (WorkersLost's `delivered_blocks`). No shard counts the others, so
survivors recompute them at the step's parameters (`unfinished_blocks`). Either way the job
loses no step. ParametersMovedOn (a survivor's parameters moved on before its block was sent:
LostBlockApplied, a restart from the checkpoint) is kept as the check of that rule; with it,
no shard applies a step while a block it lacks is being recomputed, so it cannot happen short
of a bug. A lost shard's state is not kept on other hosts: the job restarts from its
checkpoint.

This module owns both ends of the protocol: the messages, the runner's side (DirectTransport)
and the actors' (ShardEnd, WorkerEnd and the functions ModelReplica and ParameterServerShard
expose as remote methods).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hmac
import math
import secrets
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from enum import IntEnum, unique
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import ray

from worker.transport.liveness import ActorsLost, ask_heartbeat
from worker.transport.named_pipe import Record
from worker.transport.object_store import (
    ChunkSends,
    ObjectStoreTransport,
    compute_and_stream,
    reduce_pushed,
)
from worker.transport.socket_link import Link, LinkClosed, connect, listen
from worker.transport.step import (
    ActorFailure,
    LostBlockApplied,
    ShardLost,
    StepFailure,
    StepOutcome,
    StepWork,
    WorkersLost,
    apply_coefficients,
)

if TYPE_CHECKING:
    from worker.parameter_server import ApplyResult, ParameterServerShard, ReduceResult
    from worker.replica import BlockResult, ModelReplica

TOKEN_BYTES = 32
HELLO_SECONDS = 10.0  # a connection that has not said all its HELLO by then is dropped
# Connections a shard lets wait for their HELLO at once (a job has one per worker, each saying
# it at once), from one address and in all: past either, the oldest waiting is dropped, so that
# strangers can neither pile up threads nor hold the slots a real worker needs.
PENDING_HELLOS_PER_PEER = 16
PENDING_HELLOS = 64
ACCEPT_RETRY_SECONDS = 0.1  # after a failed accept (e.g. no file descriptor left)
# How long a shard settling a step's lost blocks waits for a dead worker's connection to close
# (its kernel closes it as the process dies; the shard then has read all it sent). Past it the
# worker's blocks not yet delivered are recomputed: slower, never wrong.
DEAD_LINK_DRAIN_SECONDS = 5.0


# --- the messages ------------------------------------------------------------------------------


@unique
class Op(IntEnum):
    HELLO = 1  # worker -> shard, first on a connection: the worker's slot; the token follows
    CHUNK = 2  # worker -> shard: a block's gradient chunk of a step (and statistics section)
    SLICE = 3  # shard -> worker: the shard's parameters at a version
    # A compressed step's messages, on the same connections (compressed_direct.py has both
    # ends): number is the step, index the block (worker -> shard) or the shard.
    ROUND_ONE = 4  # worker -> shard: a block's first message (PowerSGD: dense runs and P_b;
    #                top-k: its indices, then its values)
    P_HAT = 5  # shard -> worker: PowerSGD's orthogonalised P of the matrices it answers for
    ROUND_TWO = 6  # worker -> shard: PowerSGD's Q_b of a block
    REPLY = 7  # shard -> worker: the step gradient compressed (PowerSGD: the dense runs' sums,
    #            then Q; top-k: the sum's nonzero indices, then their values)
    # worker -> shard, after every shard's host acknowledged the block's chunks: the block's
    # figures (block_figures); the shard counts the chunk from then on.
    DELIVERED = 8


@dataclasses.dataclass(frozen=True)
class Message(Record):
    """A message's header; the arrays it announces follow it on the connection, in order."""

    layout: ClassVar = struct.Struct("<iqqqq")
    op: Op
    number: int  # CHUNK, DELIVERED: the step; SLICE: the parameters' version; HELLO: 0
    index: int  # CHUNK, DELIVERED: the block; HELLO: the worker's slot; SLICE: the shard
    first_bytes: int  # the chunk, the slice, the token or the figures
    second_bytes: int = 0  # CHUNK of a K-FAC factor-update step: its statistics (float64)

    def __post_init__(self) -> None:
        object.__setattr__(self, "op", Op(self.op))  # an unknown code fails here, loudly


# --- a block's figures, as DELIVERED carries them ---------------------------------------------

# BlockResult's numbers and when the block was complete, in this order (float64, which holds
# each exactly: a Python float, or counts far below 2^53); then when its chunk left for each
# shard (ChunkSends); then each micro-batch's flat buffers (BatchNorm running statistics).
_FIXED_FIGURES = 7


def block_figures(result: BlockResult, sends: ChunkSends, shards: int,
                  flat_buffers: Sequence[np.ndarray]) -> np.ndarray:
    """What the runner takes from a block's call, as one float64 vector for DELIVERED."""
    fixed = [result.loss_sum, result.samples, result.correct, result.seconds,
             result.bytes_written, result.write_seconds, sends.computed_at]
    sent = [sends.sent_at.get(k, math.nan) for k in range(shards)]
    return np.concatenate([np.array(fixed + sent, np.float64),
                           *(np.asarray(row, np.float64) for row in flat_buffers)])


@dataclasses.dataclass(frozen=True)
class FiguresSize:
    """The sizes of block_figures a shard takes in a DELIVERED: the fixed figures, a time
    per shard, then `buffer_size` values per micro-batch of the block, a step having at most
    `max_micro_batches` (the block's own count varies with the step, and its DELIVERED may
    come before the shard's call for the step says it). Anything else is a bug or garbage,
    refused before a byte of it is allocated."""

    shards: int
    buffer_size: int  # float64 values of one micro-batch's flat buffers; 0: the model has none
    max_micro_batches: int

    def fits(self, values: int) -> bool:
        rows = values - _FIXED_FIGURES - self.shards
        if rows == 0 or self.buffer_size == 0:
            return rows == 0
        return (0 < rows <= self.max_micro_batches * self.buffer_size
                and rows % self.buffer_size == 0)


@dataclasses.dataclass(frozen=True)
class DeliveredBlock:
    """A lost worker's delivered block, read back from the figures a shard held."""

    result: BlockResult  # its `buffers` are None: they are `buffers`, flat
    sends: ChunkSends
    buffers: list[np.ndarray]  # one flat vector per micro-batch, in the runner's dtype


def read_block_figures(figures: np.ndarray, shards: int, micro_batches: int,
                       buffers_dtype: np.dtype | None) -> DeliveredBlock:
    """block_figures' vector for a block of `micro_batches`; `buffers_dtype`: the runner's
    flat buffers' (None: the model has none). ValueError when the sizes do not fit."""
    head = _FIXED_FIGURES + shards
    rows = figures[head:]
    if (figures.ndim != 1 or figures.size < head
            or (rows.size and (buffers_dtype is None or micro_batches == 0
                               or rows.size % micro_batches))):
        raise ValueError(f"{figures.size} figures do not fit a block of {micro_batches} "
                         f"micro-batches and {shards} shards")
    loss_sum, samples, correct, seconds, written, write_seconds, computed_at = (
        figures[:_FIXED_FIGURES].tolist())
    sent_at = {k: at for k, at in enumerate(figures[_FIXED_FIGURES:head].tolist())
               if not math.isnan(at)}
    from worker.replica import BlockResult  # here: worker.replica imports this module

    buffers = ([] if buffers_dtype is None or micro_batches == 0
               else [row.astype(buffers_dtype) for row in np.split(rows, micro_batches)])
    result = BlockResult(loss_sum, int(samples), int(correct), seconds, int(written),
                         write_seconds, None)
    return DeliveredBlock(result, ChunkSends(sent_at, computed_at), buffers)


class WorkerNotConnected(RuntimeError):
    """A worker was given a block before its connections to the shards were made (it could
    not make them in time): for the runner, a lost worker, whose blocks others compute."""


class _AboutShard(Exception):
    """A worker's error about shard `shard`, carried to the runner (which maps it to a
    failure naming that shard) with its message as its text."""

    def __init__(self, shard: int, message: str):
        super().__init__(shard, message)
        self.shard, self.message = shard, message

    def __str__(self) -> str:
        return self.message


class ParametersMovedOn(_AboutShard, RuntimeError):
    """A shard's parameters of the next version reached a worker before the worker sent that
    shard its chunk of the step: the shard applied the step without this block (a lost
    worker's copy of it had arrived first), and the block's computation may have read the new
    parameters. For the runner, LostBlockApplied."""


class ShardNotReached(_AboutShard, ConnectionError):
    """A worker's connection to shard `shard` failed as it was made (refused, no route to
    the host, not permitted): the shard is gone, or this worker's path to it is broken. The
    runner tells which by the shard's heartbeat (DirectTransport._connect)."""


class ShardUnreachable(_AboutShard, ConnectionError):
    """A worker's connection to shard `shard` closed or stayed silent: the shard is gone."""


@contextlib.contextmanager
def unreachable_if_link_fails(k: int) -> Iterator[None]:
    """A worker's use of its link to shard k: the link closed (LinkClosed), or the shard
    took or acknowledged nothing in time (TimeoutError), is ShardUnreachable naming shard k."""
    try:
        yield
    except (LinkClosed, TimeoutError) as failed:
        raise ShardUnreachable(k, f"parameter-server shard {k}: {failed}") from failed


# --- the runner's side -------------------------------------------------------------------------


class DirectTransport(ObjectStoreTransport):
    """The object-store transport's step, with the chunks and slices on direct connections.
    From object_store.py it keeps the runner's calls, the heartbeats and how lost actors are
    reported; the connections, the settling of a lost worker's blocks with the shards and
    the figures of delivered blocks are its own (see the module's docstring)."""

    # Whether lost workers' blocks are settled with the shards (delivered or recomputed: see
    # the module's docstring).
    settles_lost_blocks = True

    def __init__(self, *args, buffer_size: int = 0, max_micro_batches: int = 0, **kwargs):
        """`buffer_size`: float64 values of one micro-batch's flat buffers (0: the model has
        none); `max_micro_batches`: of a step. The shards take DELIVERED of those sizes only."""
        super().__init__(*args, **kwargs)
        self.figures_size = FiguresSize(len(self.actors.shards), buffer_size, max_micro_batches)
        self.token = secrets.token_bytes(TOKEN_BYTES)
        self.version = 0  # of the parameters on the shards
        self.addresses: list[tuple[str, int]] = []
        self.shard_calls: list[list[ray.ObjectRef]] = []  # the step's, by shard
        # The step's blocks of lost workers whose figures came from the shards: their
        # micro-batches' flat buffers (the rest of their figures are in self.delivered).
        self.buffers_from_shards: dict[int, list[np.ndarray]] = {}

    def start(self) -> None:
        self.addresses = [tuple(address) for address in self._shard_values(
            [shard.listen_for_workers.remote(self.token, len(self.actors.replicas),
                                             self.figures_size)
             for shard in self.actors.shards],
            "while opening its port")]
        self._connect(range(len(self.actors.replicas)))
        self.push_parameters()

    def push_parameters(self) -> None:
        """The runner's vector to every shard, which sends it on to every worker."""
        self.version += 1
        self._shard_values([shard.load_and_send_parameters.remote(self.parameters[lo:hi],
                                                                   self.version)
                            for shard, (lo, hi) in zip(self.actors.shards, self.bounds)],
                           "while loading parameters")

    def sync_parameters(self) -> None:
        values = self._shard_values([shard.parameter_slice.remote()
                                     for shard in self.actors.shards],
                                    "while reading its parameters")
        for (lo, hi), value in zip(self.bounds, values):
            self.parameters[lo:hi] = value

    def worker_replaced(self, worker: int) -> None:
        self._connect([worker])

    def _connect(self, workers: Iterable[int]) -> None:
        """Connect these slots' replicas to every shard, which sends each its slice, all at
        once and under one deadline: each replica has half of it to connect, so that its
        answer normally comes within the runner's. A replica whose connection to a shard
        failed (ShardNotReached) has that shard's heartbeat asked: one that does not answer
        is lost (ActorFailure(ShardLost)); one that does is alive and listening, so what
        refused the connection or had no route to it lies on the worker's path, and the
        worker is left unconnected. A replica left unconnected, dead, hanging, still connecting
        at the deadline or whose connection went unanswered is found by the next step: its
        block raises WorkerNotConnected, a lost worker (the failure policy stops replacing a
        slot whose workers cannot connect). One that misses its heartbeat (stopped, its node
        gone) is not waited for (liveness.py): the next step's heartbeats find it."""
        replicas = self.actors.replicas
        calls = {worker: replicas[worker].connect_to_shards.remote(
            worker, self.addresses, self.bounds, self.token, self.timeout_seconds / 2)
            for worker in workers}
        settled = self.liveness.settle(calls, {w: replicas[w] for w in calls},
                                       self.timeout_seconds)
        not_reached: dict[int, ShardNotReached] = {}  # shard -> a worker's failed connect
        for call in settled.ready.values():
            try:
                ray.get(call)
            except ray.exceptions.RayActorError:
                pass
            except ray.exceptions.RayTaskError as error:
                if isinstance(error.cause, WorkerNotConnected):
                    continue  # its first block says so: a lost worker
                if isinstance(error.cause, ShardNotReached):
                    not_reached.setdefault(error.cause.shard, error.cause)
                    continue
                raise
        if not_reached:
            shards = {k: self.actors.shards[k] for k in sorted(not_reached)}

            def lost(gone: ActorsLost) -> ShardLost:
                shard = min(gone.actors)
                return ShardLost(shard, f"while a worker connected: {not_reached[shard]} "
                                        f"({gone.why(shard)})")

            self.liveness.answers_or_failure(
                {k: ask_heartbeat(shard) for k, shard in shards.items()}, shards,
                self.timeout_seconds, lost)

    # --- one step ----------------------------------------------------------------------------

    def run_step(self, work: StepWork) -> StepOutcome | StepFailure:
        self.shard_calls, self.buffers_from_shards = [], {}
        return super().run_step(work)

    def _submit_blocks(self, work: StepWork, owners: Mapping[int, int]) -> None:
        for block, worker in owners.items():
            lo, hi = work.block_ranges[block]
            self.owners[block] = worker
            self.calls[block] = self.actors.replicas[worker].compute_direct.remote(
                work.micro_batches[lo:hi], work.step, work.samples, self.master_buffers, block,
                self.version, work.deadline_seconds)
        if self.shard_calls:  # a recompute: the shards still wait for the lost blocks
            return
        # The shards wait past the step's deadline (the runner's to enforce) for a recompute.
        inbox = (work.step, len(work.block_ranges), work.deadline_seconds + self.timeout_seconds)
        if work.waits_for_coefficients:
            self.shard_calls = [[shard.reduce_pushed.remote(*inbox)]
                                for shard in self.actors.shards]
        else:
            self.shard_calls = [
                shard.reduce_apply_direct.options(num_returns=2).remote(*inbox, work.lr,
                                                                        self.version + 1)
                for shard in self.actors.shards]

    def _shards_watched_with_blocks(self) -> dict[int, object]:
        return dict(enumerate(self.actors.shards))

    def _collect_blocks(self, work: StepWork) -> StepFailure | None:
        failure = super()._collect_blocks(work)
        if (self.settles_lost_blocks and isinstance(failure, WorkersLost)
                and failure.unfinished_blocks):
            return self._settle_lost_blocks(work, failure)
        return failure

    def _settle_lost_blocks(self, work: StepWork, lost: WorkersLost) -> StepFailure:
        """Which of the lost workers' blocks reached the shards (see the module's docstring):
        those become delivered, with the figures a shard held, and every shard counts them;
        the rest are left unfinished for survivors, and no shard will count the lost workers'
        copies of them. A shard lost meanwhile is ShardLost."""
        owners = {block: self.owners[block] for block in lost.unfinished_blocks}
        # Workers whose process died: their connections close, so the shards can wait for
        # what they sent. Silent ones may still be sending; what arrives late is not counted.
        # An unconnected one sent nothing (its blocks raised before computing), and its
        # connect may still finish: nothing to wait for.
        died = [w for w in lost.workers
                if w not in lost.silent + lost.unanswered + lost.unconnected]
        shards = self.actors.shards
        try:
            held = self._shard_values(
                [shard.settle_lost_blocks.remote(work.step, owners, died,
                                                 DEAD_LINK_DRAIN_SECONDS)
                 for shard in shards], f"while settling the lost blocks of step {work.step}")
            figures = {block: values for answer in held for block, values in answer.items()}
            if figures:
                self._shard_values(
                    [shard.count_delivered_blocks.remote(
                        work.step, {block: owners[block] for block in figures})
                     for shard in shards],
                    f"while counting the delivered blocks of step {work.step}")
        except ActorFailure as failed:
            return failed.failure
        dtype = None if work.master_buffers is None else work.master_buffers.dtype
        for block, values in figures.items():
            lo, hi = work.block_ranges[block]
            delivered = read_block_figures(values, len(shards), hi - lo, dtype)
            self.delivered[block], self.sends[block] = delivered.result, delivered.sends
            self.buffers_from_shards[block] = delivered.buffers
        return lost.with_delivered({block: owners[block] for block in figures})

    def _micro_batch_buffers(self, work: StepWork) -> list[np.ndarray] | None:
        if work.master_buffers is None:  # the model has no buffers
            return None
        rows: list[np.ndarray] = []
        for block in range(len(work.block_ranges)):
            if block in self.buffers_from_shards:
                rows += self.buffers_from_shards[block]
            else:
                rows += [self.flatten_buffers(values)
                         for values in self.delivered[block].buffers or ()]
        return rows

    def _block_error(self, work: StepWork, block: int, cause: BaseException) -> StepFailure:
        if isinstance(cause, ShardUnreachable):
            return ShardLost(cause.shard, f"during step {work.step}: {cause}")
        if isinstance(cause, ParametersMovedOn):
            return LostBlockApplied(work.step, self.owners[block], cause.shard)
        if isinstance(cause, WorkerNotConnected):
            # Its other blocks' calls raise the same; the survivors compute them all.
            worker = self.owners[block]
            return WorkersLost(work.step, (worker,),
                               tuple(b for b in range(len(work.block_ranges))
                                     if b not in self.delivered and self.owners[b] == worker),
                               unconnected=(worker,))
        return super()._block_error(work, block, cause)

    def _reduce_and_apply_on_shards(self, work: StepWork
                                    ) -> tuple[list[ReduceResult], list[ApplyResult]]:
        reduced = self._from_shards([calls[0] for calls in self.shard_calls], work)
        if not work.waits_for_coefficients:
            applied = self._from_shards([calls[1] for calls in self.shard_calls], work)
        else:
            coefficient, nu = apply_coefficients(
                work, sum(r.squared_norm for r in reduced),
                [dot for r in reduced for dot in r.direction_dots.values()])
            applied = self._from_shards(
                [shard.apply_and_send.remote(work.lr, coefficient, nu, self.version + 1)
                 for shard in self.actors.shards], work)
        self.version += 1
        return reduced, applied


# --- the shards' side --------------------------------------------------------------------------


class ShardEnd:
    """Shard k's connections: it accepts the workers', files their chunks in its inbox once
    they are delivered (DELIVERED, or the runner's word for a lost worker's block) and sends
    them its slice whenever it changes (and to a worker as soon as it connects)."""

    def __init__(self, shard: ParameterServerShard, token: bytes, host: str, worker_count: int):
        self.shard, self.token, self.worker_count = shard, token, worker_count
        setup = shard.setup
        self.chunk_bytes = (shard.hi - shard.lo) * np.dtype(setup.layout.dtype).itemsize
        self.statistics_size = 0  # float64 values of a K-FAC chunk's statistics section
        if setup.kfac is not None:
            lo, hi = setup.kfac.statistics_bounds(shard.lo, shard.hi)
            self.statistics_size = hi - lo
        self.server = listen(host)
        self.address: tuple[str, int] = self.server.getsockname()[:2]
        # The links, the version, the waiting hellos, closed, the step's chunks; notified
        # when a link closes.
        self.lock = threading.Condition()
        self.links: dict[int, Link] = {}  # worker slot -> its connection
        # The step in progress (the newest a chunk came for; older ones are done) and its
        # chunks, by (step, block, sender), until they are delivered and filed in the inbox.
        self.step = 0
        self.chunks: dict[tuple[int, int, int], tuple[np.ndarray, np.ndarray | None]] = {}
        self.delivered: set[tuple[int, int, int]] = set()
        self.figures: dict[tuple[int, int], tuple[int, np.ndarray]] = {}  # -> (sender, figures)
        # (step, block, worker): the runner settled that worker's block as lost in the step,
        # so its DELIVERED no longer counts (per block: the worker's other blocks of the step
        # may be delivered, their DELIVERED still unread here).
        self.settled: set[tuple[int, int, int]] = set()
        # What a DELIVERED may carry (listen_for_workers sets it before any worker has the
        # address); None: no DELIVERED is taken (a compressed job's end).
        self.figures_size: FiguresSize | None = None
        self.version = 0  # of the slice last loaded or applied; 0: none yet
        # Connections still to say HELLO, oldest first, with their peer's address.
        self.waiting: dict[Link, str] = {}
        self.closed = False
        threading.Thread(target=self._accept, name="accept workers", daemon=True).start()

    def send_slice(self, version: int) -> None:
        """The shard's parameters, now at `version`, to every connected worker."""
        with self.lock:
            self.version = version
            for link in self.links.values():
                self._send_slice(link)

    def _send_slice(self, link: Link) -> None:
        """(With self.lock.) The workers wait for this version before they compute, and the
        shard changes its slice only once every block of the next step is in, so the slice
        stays put while it leaves (a worker given up as lost may get a torn one: it never
        counts)."""
        parameters = self.shard.parameters
        try:
            link.send(Message(Op.SLICE, self.version, self.shard.setup.index, parameters.nbytes),
                      parameters)
        except LinkClosed:
            pass  # that worker is gone; its reader forgets it

    def close(self) -> None:
        """Stop accepting and close every connection (a standby shard taking over another's
        place drops the old job's ends: ParameterServerShard.take_over)."""
        with self.lock:
            self.closed = True
            links = list(self.links.values()) + list(self.waiting)
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept thread
        except OSError:
            pass  # not connected: a listening socket on some systems
        self.server.close()
        for link in links:
            link.close()

    def _accept(self) -> None:
        """Accept connections until the end is closed. A failed accept (a connection reset
        before it was taken, no file descriptor left) is that connection's, not the port's:
        the loop goes on, after a pause in case the cause persists."""
        while True:
            try:
                connection, peer = self.server.accept()
            except OSError:
                with self.lock:
                    if self.closed:
                        return
                time.sleep(ACCEPT_RETRY_SECONDS)
                continue
            try:
                link = Link(connection, f"a worker at {peer[0]}")
            except OSError:
                connection.close()
                continue
            self._make_room_for(link, peer[0])
            threading.Thread(target=self._serve, args=(link,), name="worker link",
                             daemon=True).start()

    def _make_room_for(self, link: Link, peer: str) -> None:
        """File `link` as waiting for its HELLO. Past PENDING_HELLOS_PER_PEER from its peer's
        address, or PENDING_HELLOS in all, the OLDEST waiting connection (of that peer, else of
        all) is dropped: a real worker says HELLO the moment it connects, so it is never the
        oldest for long, and strangers holding slots cannot keep it out."""
        with self.lock:
            if self.closed:
                oldest = [link]
            else:
                from_peer = [w for w, address in self.waiting.items() if address == peer]
                oldest = (from_peer[:1] if len(from_peer) >= PENDING_HELLOS_PER_PEER
                          else list(self.waiting)[:1] if len(self.waiting) >= PENDING_HELLOS
                          else [])
                for dropped in oldest:
                    del self.waiting[dropped]
                self.waiting[link] = peer
        for dropped in oldest:
            dropped.close()  # its thread's read fails, and the thread ends

    def _serve(self, link: Link) -> None:
        try:
            worker = self._hello(link)
        finally:
            with self.lock:
                self.waiting.pop(link, None)
        if worker is None:
            link.close()
            return
        link.name = f"worker {worker}"
        with self.lock:
            if self.closed:
                link.close()
                return
            replaced = self.links.get(worker)
            self.links[worker] = link
            if self.version:
                self._send_slice(link)
        if replaced is not None:
            replaced.close()
        try:
            while True:
                self._receive(link, worker)
        except (LinkClosed, ValueError):
            link.close()
            with self.lock:
                if self.links.get(worker) is link:
                    del self.links[worker]
                self.lock.notify_all()

    def _hello(self, link: Link) -> int | None:
        """The worker slot a new connection says HELLO for, or None if it does not say all of
        it within HELLO_SECONDS of connecting, with the job's token."""
        deadline = time.monotonic() + HELLO_SECONDS
        try:
            hello = link.receive_header(Message, deadline)
            if hello.op != Op.HELLO or hello.first_bytes != len(self.token):
                return None
            token = bytearray(len(self.token))
            link.receive_into(memoryview(token), deadline)
        except (LinkClosed, ValueError):
            return None
        if not hmac.compare_digest(bytes(token), self.token):
            return None
        if not 0 <= hello.index < self.worker_count:
            return None
        return hello.index

    def _receive(self, link: Link, worker: int) -> None:
        """The next message from `worker`: a chunk, or a block's DELIVERED with its figures.
        ValueError for anything else (the connection is then closed)."""
        header = link.receive_header(Message)
        if header.op in (Op.CHUNK, Op.DELIVERED):
            self._check_step(link, header)
        if header.op == Op.CHUNK:
            self._receive_chunk(link, worker, header)
        elif (header.op == Op.DELIVERED and 0 <= header.index < self.shard.setup.block_count
              and self.figures_size is not None and header.first_bytes % 8 == 0
              and self.figures_size.fits(header.first_bytes // 8) and header.second_bytes == 0):
            figures = np.empty(header.first_bytes // 8)
            link.receive_into(figures)
            with self.lock:  # not from a worker the runner settled as lost in the step
                if (self._still_wanted(header.number)
                        and (header.number, header.index, worker) not in self.settled):
                    self.figures[header.number, header.index] = (worker, figures)
                    self._count(header.number, header.index, worker)
        else:
            raise ValueError(f"{link.name} sent {header}, not a chunk of {self.chunk_bytes} "
                             f"bytes nor a block's figures")

    def _receive_chunk(self, link: Link, worker: int, header: Message) -> None:
        statistics_bytes = self.statistics_size * 8
        if (not 0 <= header.index < self.shard.setup.block_count
                or header.first_bytes != self.chunk_bytes
                or header.second_bytes not in (0, statistics_bytes)):
            raise ValueError(f"{link.name} sent {header}, not a chunk of {self.chunk_bytes} "
                             f"bytes")
        gradient = np.empty(self.shard.hi - self.shard.lo, self.shard.setup.layout.dtype)
        link.receive_into(gradient)
        statistics = None
        if header.second_bytes:
            statistics = np.empty(self.statistics_size)
            link.receive_into(statistics)
        with self.lock:
            if self._still_wanted(header.number):
                self.chunks[header.number, header.index, worker] = (gradient, statistics)
                self._file_if_delivered(header.number, header.index, worker)

    def _check_step(self, link: Link, header: Message) -> None:
        """ValueError for a message of a step no worker can be at: steps run one after the
        other, and a worker computes step s only from the parameters the shards applied step
        s - 1 to, so a message is of the step in progress, of the next one or late. Anything
        further ahead would drop the step in progress (`_still_wanted`). A new end (the job's
        first step, or the first after a restart) has no step yet and takes the first."""
        with self.lock:
            newest = self.step
        if header.number < 1 or (newest and header.number > newest + 1):
            raise ValueError(f"{link.name} sent {header} while the shard is at step {newest}: "
                             f"not a step in progress")

    def _still_wanted(self, step: int) -> bool:
        """(With self.lock.) Whether a message of `step` is still of use: not of a step done.
        The first of a newer step drops what was kept of older ones."""
        if step < self.step:
            return False
        if step > self.step:
            self.step = step
            self.chunks = {key: chunk for key, chunk in self.chunks.items() if key[0] >= step}
            self.delivered = {key for key in self.delivered if key[0] >= step}
            self.figures = {key: held for key, held in self.figures.items() if key[0] >= step}
            self.settled = {key for key in self.settled if key[0] >= step}
        return True

    def _count(self, step: int, block: int, worker: int) -> None:
        """(With self.lock.) `worker`'s chunk of `block` is delivered: it counts."""
        self.delivered.add((step, block, worker))
        self._file_if_delivered(step, block, worker)

    def _file_if_delivered(self, step: int, block: int, worker: int) -> None:
        """(With self.lock.) Into the inbox (which sums it), once both in and delivered."""
        key = (step, block, worker)
        if key in self.delivered and key in self.chunks:
            gradient, statistics = self.chunks.pop(key)
            self.shard.inbox.accept(step, block, gradient, statistics)

    def settle_lost_blocks(self, step: int, owners: Mapping[int, int], died: Iterable[int],
                           drain_seconds: float) -> dict[int, np.ndarray]:
        """The runner found the workers of `owners` (block -> worker) lost in `step`. Once the
        connections of those that `died` have closed (all they sent has been read) or
        `drain_seconds` have passed, no later DELIVERED of theirs counts in this step, and
        the answer is the figures of those blocks that this shard holds as delivered by
        their owner. Only these blocks are settled: the workers' other blocks of the step
        (answered, so delivered everywhere) still count when their DELIVERED is read."""
        died = list(died)
        with self.lock:
            self.lock.wait_for(lambda: all(self.links.get(w) is None or self.links[w].closed
                                           for w in died), timeout=drain_seconds)
            self._still_wanted(step)
            self.settled.update((step, block, worker) for block, worker in owners.items())
            return {block: held[1] for block, worker in owners.items()
                    if (held := self.figures.get((step, block))) is not None
                    and held[0] == worker}

    def count_delivered_blocks(self, step: int, owners: Mapping[int, int]) -> None:
        """These blocks (block -> the lost worker that sent them) reached every shard (one
        holds their DELIVERED): each counts once its chunk is in, which its host has
        acknowledged already."""
        with self.lock:
            if self._still_wanted(step):
                for block, worker in owners.items():
                    self._count(step, block, worker)


def listen_for_workers(shard: ParameterServerShard, token: bytes, worker_count: int,
                       end: type[ShardEnd] | None = None,
                       figures_size: FiguresSize | None = None) -> tuple[str, int]:
    """Open the shard's end (`end`: a ShardEnd or one of its kind) on its node's address,
    for worker slots [0, worker_count), taking DELIVERED of `figures_size`; returns
    (address, port) for the workers."""
    if len(token) != TOKEN_BYTES:
        raise ValueError(f"the token must be {TOKEN_BYTES} bytes, got {len(token)}")
    if shard.worker_links is not None:
        shard.worker_links.close()
    shard.worker_links = (end or ShardEnd)(shard, token, ray.util.get_node_ip_address(),
                                           worker_count)
    shard.worker_links.figures_size = figures_size
    return shard.worker_links.address


def _shard_end(shard: ParameterServerShard) -> ShardEnd:
    if shard.worker_links is None:
        raise RuntimeError("the shard was not asked to listen for workers (listen_for_workers)")
    return shard.worker_links


def settle_lost_blocks(shard: ParameterServerShard, step: int, owners: Mapping[int, int],
                       died: Sequence[int], drain_seconds: float) -> dict[int, np.ndarray]:
    return _shard_end(shard).settle_lost_blocks(step, owners, died, drain_seconds)


def count_delivered_blocks(shard: ParameterServerShard, step: int,
                           owners: Mapping[int, int]) -> None:
    _shard_end(shard).count_delivered_blocks(step, owners)


def load_and_send_parameters(shard: ParameterServerShard, values: np.ndarray,
                             version: int) -> None:
    shard.load_parameters(values)
    _shard_end(shard).send_slice(version)


def reduce_apply_direct(shard: ParameterServerShard, step: int, blocks: int,
                        timeout_seconds: float, lr: float, version: int
                        ) -> tuple[ReduceResult, ApplyResult]:
    """Sum the step's chunks once all are in, apply, and send every worker the new slice."""
    reduced = reduce_pushed(shard, step, blocks, timeout_seconds)
    return reduced, apply_and_send(shard, lr, 1.0, 1.0, version)


def apply_and_send(shard: ParameterServerShard, lr: float, coefficient: float,
                   kl_coefficient: float, version: int) -> ApplyResult:
    applied = shard.apply(lr, coefficient, kl_coefficient)
    _shard_end(shard).send_slice(version)
    return applied


# --- the workers' side -------------------------------------------------------------------------


class WorkerEnd:
    """A worker's connections to every shard: its chunks go out on them, and the shards'
    slices come in straight into the replica's parameter vector."""

    def __init__(self, replica: ModelReplica, worker: int, addresses: Sequence[tuple[str, int]],
                 bounds: Sequence[tuple[int, int]], token: bytes, timeout_seconds: float):
        self.bounds = list(bounds)
        self.changed = threading.Condition()
        self.versions = [0] * len(addresses)  # of each shard's slice in the vector
        # Shards whose slice is being written into the vector now (a half-written slice is
        # parameters moved on as much as a whole one).
        self.receiving = [False] * len(addresses)
        self.links: list[Link] = []
        # One deadline for them all: a shard's host dropping connections costs the rest of
        # it, not a timeout per shard.
        deadline = time.monotonic() + timeout_seconds
        for k, address in enumerate(addresses):
            try:
                connection = connect(address, max(deadline - time.monotonic(), 1e-3))
            except TimeoutError as error:
                # Unanswered, not refused: the shard's other workers may reach it, and only
                # this worker's path may be broken, so the worker counts as lost (not the
                # shard, which would restart every actor).
                self.close()
                raise WorkerNotConnected(f"parameter-server shard {k} at {address[0]}:"
                                         f"{address[1]} did not answer the connection within "
                                         f"{timeout_seconds:g} s") from error
            except OSError as error:
                # Refused, no route, not permitted: this end cannot tell a shard gone from
                # a path broken in between (a firewall's reject looks like a closed port),
                # so it says which shard and what happened, and the runner asks the shard.
                self.close()
                raise ShardNotReached(k, f"parameter-server shard {k} at {address[0]}:"
                                         f"{address[1]} could not be reached: {error}"
                                      ) from error
            link = Link(connection, f"parameter-server shard {k}")
            link.send(Message(Op.HELLO, 0, worker, len(token)), np.frombuffer(token, np.uint8))
            self.links.append(link)
        for k, link in enumerate(self.links):
            lo, hi = self.bounds[k]
            threading.Thread(target=self._receive_slices, args=(k, link, replica.flat[lo:hi]),
                             name=f"slices of shard {k}", daemon=True).start()

    def _receive_slices(self, k: int, link: Link, destination: np.ndarray) -> None:
        """Shard k's slices, into the replica's vector: no block computes while they arrive
        (see ShardEnd._send_slice)."""
        try:
            while True:
                header = link.receive_header(Message)
                if header.op != Op.SLICE or header.first_bytes != destination.nbytes:
                    raise ValueError(f"shard {k} sent {header}, not its slice of "
                                     f"{destination.nbytes} bytes")
                with self.changed:
                    self.receiving[k] = True
                link.receive_into(destination)
                with self.changed:
                    self.receiving[k] = False
                    self.versions[k] = header.number
                    self.changed.notify_all()
        except (LinkClosed, ValueError):
            link.close()
            with self.changed:
                self.changed.notify_all()

    def wait_for_parameters(self, version: int, timeout_seconds: float) -> None:
        """Until every shard's slice of `version` is in; ShardUnreachable for the first
        shard whose connection closed first or whose slice did not come in time."""
        with self.changed:
            self.changed.wait_for(
                lambda: all(v >= version for v in self.versions)
                or any(link.closed and v < version for link, v in zip(self.links, self.versions)),
                timeout=timeout_seconds)
            versions = list(self.versions)
        if newer := [k for k, have in enumerate(versions) if have > version]:
            raise ParametersMovedOn(newer[0], f"parameter-server shard {newer[0]} sent "
                                              f"parameters of version {versions[newer[0]]} "
                                              f"before a block of version {version} began")
        behind = [k for k, have in enumerate(versions) if have < version]
        for k in behind:
            if self.links[k].closed:
                raise ShardUnreachable(k, f"parameter-server shard {k}'s connection closed "
                                          f"before it sent its parameters")
        if behind:
            raise ShardUnreachable(behind[0], f"parameter-server shard {behind[0]} sent no "
                                              f"parameters for {timeout_seconds:g} s")

    def send_chunk(self, k: int, step: int, block: int, chunk: np.ndarray,
                   statistics: np.ndarray | None, version: int) -> None:
        """Shard k's chunk of a block computed at parameters `version`. Shard k's slice of
        the next version may arrive once the shard has every block's chunk, so after this
        one in a step that goes well (by then backward no longer reads that slice); arrived
        or arriving before it, the shard applied the step without this block, whose figures
        may have been computed from moved parameters: ParametersMovedOn."""
        with self.changed:
            if self.receiving[k] or self.versions[k] > version:
                raise ParametersMovedOn(k, f"parameter-server shard {k} moved its parameters "
                                           f"past version {version} before block {block} of "
                                           f"step {step} sent it its chunk")
        arrays = (chunk,) if statistics is None else (chunk, statistics)
        with unreachable_if_link_fails(k):
            self.links[k].send(Message(Op.CHUNK, step, block, chunk.nbytes,
                                       0 if statistics is None else statistics.nbytes), *arrays)

    def send_delivered(self, step: int, block: int, figures: np.ndarray) -> None:
        """Every shard's DELIVERED of a block whose chunks they all acknowledged
        (`wait_acknowledged`): from then on they count the block's chunks."""
        for k, link in enumerate(self.links):
            with unreachable_if_link_fails(k):
                link.send(Message(Op.DELIVERED, step, block, figures.nbytes), figures)

    def flush(self, timeout_seconds: float) -> None:
        """Until every message sent is in the kernel's hands (which delivers it even if this
        process dies next)."""
        for k, link in enumerate(self.links):
            with unreachable_if_link_fails(k):
                link.flush(timeout_seconds)

    def wait_acknowledged(self, timeout_seconds: float) -> None:
        """Until every shard's host has acknowledged all that was sent to it: it is then
        the shard's to read even if this process or its host dies next."""
        deadline = time.monotonic() + timeout_seconds
        for k, link in enumerate(self.links):
            with unreachable_if_link_fails(k):
                link.wait_acknowledged(max(deadline - time.monotonic(), 1e-3))

    def close(self) -> None:
        for link in self.links:
            link.close()


def connect_to_shards(replica: ModelReplica, worker: int, addresses: Sequence[tuple[str, int]],
                      bounds: Sequence[tuple[int, int]], token: bytes,
                      timeout_seconds: float, end: type[WorkerEnd] | None = None) -> None:
    """(Re)connect the replica to every shard within `timeout_seconds` (`end`: a WorkerEnd or
    one of its kind); until it is done, a block given to it raises WorkerNotConnected
    (replicas take two calls at once)."""
    links, replica.shard_links = replica.shard_links, None
    if links is not None:
        links.close()
    replica.shard_links = (end or WorkerEnd)(replica, worker, addresses, bounds, token,
                                             timeout_seconds)


def compute_direct(replica: ModelReplica, micro_batches: list[tuple[int, np.ndarray]],
                   step: int, batch_size: int, master_buffers: np.ndarray | None, block: int,
                   version: int, timeout_seconds: float) -> tuple[BlockResult, ChunkSends]:
    """A worker's step: wait for the parameters of `version` from every shard (the
    all-gather), compute the block and stream each shard its chunk (the reduce-scatter);
    once every shard's host has them, send every shard the block's DELIVERED with its
    figures, and return once those are acknowledged too (so that a block the runner has is
    one the shards count)."""
    links = replica.shard_links
    if links is None:
        raise WorkerNotConnected(f"the worker given block {block} of step {step} is not "
                                 f"connected to the shards (connect_to_shards did not finish)")
    links.wait_for_parameters(version, timeout_seconds)

    def send(k: int, chunk: np.ndarray, statistics: np.ndarray | None) -> None:
        links.send_chunk(k, step, block, chunk, statistics, version)

    result, sends = compute_and_stream(replica, micro_batches, step, batch_size, master_buffers,
                                       links.bounds, (), send)
    links.wait_acknowledged(timeout_seconds)
    flat_buffers = [replica.flatten_buffers(values) for values in result.buffers or ()]
    links.send_delivered(step, block, block_figures(result, sends, len(links.links),
                                                    flat_buffers))
    links.wait_acknowledged(timeout_seconds)
    return result, sends
