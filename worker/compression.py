"""Gradient compression with error feedback: what a worker sends in place of its gradient block,
how a parameter-server shard sums what the workers sent, and how every worker rebuilds the step
gradient from the shards' compressed answers.

Pure NumPy (no Ray): the compressed steps call both ends, over the direct connections
(worker/transport/compressed_direct.py) or through the object store (compressed.py there).
Every worker keeps, per gradient block it computes, an error-feedback memory e_b: it
compresses M_b = G_b + e_b and keeps what its message left out, e_b = M_b - C(M_b), so nothing
is lost, only delayed (Karimireddy et al. 2019).

Top-k: for each shard's slice, the ratio x size largest |M_b| entries, as sorted (index,
value) pairs; the shard scatters each block's pairs into a dense part and sums the parts in
the fixed tree order, as uncompressed gradient chunks are.

PowerSGD (Vogels, Karimireddy and Jaggi 2019): each weight matrix M (n x m; a kernel is
out_channels x the rest) is sent as rank-r factors, by one power iteration warm-started from
the previous step's Q (m x r):
  round 1: worker b sends P_b = M_b Q; the shards sum P = sum_b P_b (fixed tree order) and
           orthogonalise it (Gram-Schmidt) into P^;
  round 2: worker b sends Q_b = M_b^T P^; the shards sum Q = sum_b Q_b, and the gradient is
           P^ Q^T = P^ P^T sum_b M_b. Q is the next step's warm start.
Vectors (biases, norms' parameters), frozen parameters and matrices for which (n + m) r is
not smaller than n m travel whole, with the first round. The worker keeps e_b = M_b - P^ Q_b^T,
its own message's residual: PowerSGD is linear in M, so the errors' sum (which alone decides
what later steps send) is the paper's, without waiting for the summed Q.

A shard owns a contiguous slice [lo, hi) of the flat vector, which may cut a matrix: every
shard whose slice touches a matrix receives its factors and sums them (the same bits on each:
the same parts in the same order). The shard holding a matrix's first entry answers for it (its
P^ and its Q to the workers).

The way back is compressed too (Vogels et al. all-reduce P and Q, and every worker applies the
same step): a shard answers round 2 with its dense runs' sums and Q, a top-k shard with its
summed slice's nonzero entries, and every worker rebuilds the whole step gradient from the
replies (`PowerSGDWorker.decompress`, `topk_decompress`). P^ Q^T is formed elementwise
(`low_rank_product`), never by a BLAS product whose rounding depends on the CPU and its
threads: every worker gets the same bits. A PowerSGD shard never forms it: a matrix's norm,
for clipping and the metrics, comes from its factors (`low_rank_squared_norm`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from worker.backprop.optim.clip import squared_norm
from worker.flat_parameters import ParameterLayout
from worker.tree_sum import TreeSum

# Added to a column's norm before dividing by it, so a zero gradient (a layer not yet reached
# by any signal) orthogonalises to zeros instead of NaN.
ORTHOGONALISATION_EPSILON = 1e-12


@dataclass(frozen=True)
class PowerSGD:
    rank: int


@dataclass(frozen=True)
class TopK:
    ratio: float


Compression = PowerSGD | TopK


# --- top-k ------------------------------------------------------------------------------------


def topk_count(size: int, ratio: float) -> int:
    """Entries sent of a slice of `size`: ratio x size rounded up, at least one."""
    return min(size, max(1, math.ceil(ratio * size)))


def topk_index_dtype(size: int) -> np.dtype:
    """The dtype of the indices into a slice of `size` entries: 32 bits when they fit (they
    travel with the values), else 64. Both ends of a message derive it from the slice."""
    return np.dtype(np.int32 if size < 2**31 else np.int64)


def topk_select(values: np.ndarray, count: int) -> np.ndarray:
    """The indices of the `count` largest |values|, ascending. Ties go to the lower index
    (a stable sort), so the choice is a function of the values alone."""
    order = np.argsort(-np.abs(values), kind="stable")[:count]
    return np.sort(order).astype(topk_index_dtype(len(values)))


def topk_scatter(out: np.ndarray, indices: np.ndarray, values: np.ndarray) -> np.ndarray:
    out[...] = 0
    out[indices] = values
    return out


def topk_reply(total: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A top-k shard's answer to the workers: its summed slice's nonzero entries, (indices
    within the slice, values); at most the blocks' pairs together."""
    indices = np.flatnonzero(total)
    return indices.astype(topk_index_dtype(len(total))), total[indices]


def topk_decompress(out: np.ndarray, replies: Sequence[tuple[np.ndarray, np.ndarray]],
                    bounds: Sequence[tuple[int, int]]) -> np.ndarray:
    """The step's gradient over the whole flat vector from every shard's reply."""
    out[...] = 0
    for (lo, _), (indices, values) in zip(bounds, replies):
        out[lo + indices.astype(np.int64)] = values
    return out


# --- PowerSGD: which entries travel how ---------------------------------------------------------


@dataclass(frozen=True)
class CompressedMatrix:
    index: int  # among the plan's matrices, in the flat vector's order
    name: str
    offset: int  # of its first entry in the flat vector
    rows: int
    columns: int

    @property
    def size(self) -> int:
        return self.rows * self.columns

    def overlaps(self, lo: int, hi: int) -> bool:
        return self.offset < hi and lo < self.offset + self.size


@dataclass(frozen=True)
class PowerSGDPlan:
    rank: int
    matrices: tuple[CompressedMatrix, ...]
    size: int  # of the flat vector

    @classmethod
    def of(cls, layout: ParameterLayout, rank: int) -> PowerSGDPlan:
        matrices: list[CompressedMatrix] = []
        for slot in layout.slots:
            if len(slot.shape) < 2 or not slot.trainable:
                continue
            rows = slot.shape[0]
            columns = slot.size // rows
            if (rows + columns) * rank < rows * columns:  # else the factors are no smaller
                matrices.append(CompressedMatrix(len(matrices), slot.name, slot.offset, rows,
                                                 columns))
        return cls(rank, tuple(matrices), layout.size)

    def matrices_within(self, lo: int, hi: int) -> list[CompressedMatrix]:
        return [matrix for matrix in self.matrices if matrix.overlaps(lo, hi)]

    def owned_by(self, lo: int, hi: int) -> list[CompressedMatrix]:
        """The matrices whose first entry is in [lo, hi): that shard answers for them."""
        return [matrix for matrix in self.matrices if lo <= matrix.offset < hi]

    def dense_runs(self, lo: int, hi: int) -> list[tuple[int, int]]:
        """The runs of [lo, hi) outside every compressed matrix: sent whole."""
        runs, start = [], lo
        for matrix in self.matrices_within(lo, hi):
            if matrix.offset > start:
                runs.append((start, matrix.offset))
            start = max(start, matrix.offset + matrix.size)
        if start < hi:
            runs.append((start, hi))
        return runs

    def initial_q(self, seed: int, dtype: np.dtype | str) -> dict[int, np.ndarray]:
        """The first step's warm start: standard normal, from the job's seed."""
        return {m.index: np.random.default_rng(np.random.SeedSequence([seed, m.index, 0x5D6]))
                .standard_normal((m.columns, self.rank)).astype(dtype)
                for m in self.matrices}


def orthogonalise(p: np.ndarray) -> np.ndarray:
    """Gram-Schmidt on the columns of `p`, in place (torch's PowerSGD hook does the same)."""
    for i in range(p.shape[1]):
        column = p[:, i]
        column /= np.linalg.norm(column) + ORTHOGONALISATION_EPSILON
        if i + 1 < p.shape[1]:
            rest = p[:, i + 1:]
            rest -= np.outer(column, column @ rest)
    return p


def low_rank_product(p: np.ndarray, q: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out = P Q^T as the sum of its rank-one terms, in column order, elementwise: each entry is
    rounded the same way on any CPU, with any number of BLAS threads."""
    # Columns made contiguous: a strided column in the inner loop is 3x slower.
    p_columns, q_columns = np.ascontiguousarray(p.T), np.ascontiguousarray(q.T)
    np.multiply(p_columns[0][:, None], q_columns[0], out=out)
    term = np.empty_like(out)
    for i in range(1, p.shape[1]):
        np.multiply(p_columns[i][:, None], q_columns[i], out=term)
        out += term
    return out


def _matrix(flat: np.ndarray, matrix: CompressedMatrix) -> np.ndarray:
    return flat[matrix.offset:matrix.offset + matrix.size].reshape(matrix.rows, matrix.columns)


# --- the worker's end: one memory per gradient block it computes --------------------------------


class ErrorFeedback:
    """A worker's error-feedback memories, by gradient block (blocks, not workers: a block is
    the same micro-batches at every step, whoever computes it). Zero until a block's first
    step."""

    def __init__(self, size: int, dtype: np.dtype | str):
        self.size, self.dtype = size, np.dtype(dtype)
        self.errors: dict[int, np.ndarray] = {}

    def error(self, block: int) -> np.ndarray:
        if block not in self.errors:
            self.errors[block] = np.zeros(self.size, self.dtype)
        return self.errors[block]

    def state(self) -> dict[int, np.ndarray]:
        return {block: np.array(error) for block, error in self.errors.items()}

    def load(self, errors: Mapping[int, np.ndarray]) -> None:
        for block, error in errors.items():
            np.copyto(self.error(block), error)


def topk_messages(memory: ErrorFeedback, block: int, gradient: np.ndarray,
                  bounds: Sequence[tuple[int, int]],
                  ratio: float) -> list[tuple[np.ndarray, np.ndarray]]:
    """(indices within the slice, values) for each shard's slice of M = gradient + error; the
    error becomes what was left out."""
    error = memory.error(block)
    error += gradient  # now M
    messages = []
    for lo, hi in bounds:
        part = error[lo:hi]
        indices = topk_select(part, topk_count(hi - lo, ratio))
        messages.append((indices, part[indices].copy()))
        part[indices] = 0
    return messages


class PowerSGDWorker:
    """A worker's two PowerSGD messages per block (`first` keeps M_b until `second`), and the
    step gradient rebuilt from the shards' replies (`decompress`)."""

    def __init__(self, plan: PowerSGDPlan, memory: ErrorFeedback,
                 warm_q: dict[int, np.ndarray]):
        self.plan, self.memory = plan, memory
        self.pending: dict[int, np.ndarray] = {}  # block -> M over the flat vector
        # Block -> (M, its Q_b) from `second_messages` until `keep_error`.
        self.owed: dict[int, tuple[np.ndarray, dict[int, np.ndarray]]] = {}
        # Q of the last step (by matrix), the next step's warm start; and the step's P^,
        # from round 2 until `decompress`.
        self.warm_q = warm_q
        self.p_hat: dict[int, np.ndarray] = {}

    def first(self, block: int, gradient: np.ndarray, warm_q: Mapping[int, np.ndarray],
              bounds: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """For each shard: its dense runs of the gradient, then P_b = M_b Q of each matrix
        its slice touches, flattened and concatenated."""
        error = self.memory.error(block)
        m = self.pending[block] = gradient + error  # only the matrices' part of error is used
        p = {matrix.index: _matrix(m, matrix) @ warm_q[matrix.index]
             for matrix in self.plan.matrices}
        return [np.concatenate([m[a:b] for a, b in self.plan.dense_runs(lo, hi)]
                               + [p[matrix.index].ravel()
                                  for matrix in self.plan.matrices_within(lo, hi)]
                               or [np.empty(0, m.dtype)])
                for lo, hi in bounds]

    def second(self, block: int, p_hat: Mapping[int, np.ndarray],
               bounds: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """For each shard: Q_b = M_b^T P^ of each matrix its slice touches. The error becomes
        M_b - P^ Q_b^T on the matrices (the dense entries were sent whole: no error)."""
        messages = self.second_messages(block, p_hat, bounds)
        self.keep_error(block)
        return messages

    def second_messages(self, block: int, p_hat: Mapping[int, np.ndarray],
                        bounds: Sequence[tuple[int, int]]) -> list[np.ndarray]:
        """`second`'s messages alone: keep_error(block) must follow, which a sender can do
        while they travel."""
        m = self.pending.pop(block)
        self.p_hat = dict(p_hat)
        q = {matrix.index: _matrix(m, matrix).T @ p_hat[matrix.index]
             for matrix in self.plan.matrices}
        self.owed[block] = (m, q)
        return [np.concatenate([q[matrix.index].ravel()
                                for matrix in self.plan.matrices_within(lo, hi)]
                               or [np.empty(0, m.dtype)])
                for lo, hi in bounds]

    def keep_error(self, block: int) -> None:
        """Block `block`'s error becomes M_b - P^ Q_b^T on the matrices, for its next step's
        first message."""
        m, q = self.owed.pop(block)
        error = self.memory.error(block)
        for matrix in self.plan.matrices:
            kept = _matrix(error, matrix)
            np.matmul(self.p_hat[matrix.index], q[matrix.index].T, out=kept)
            np.subtract(_matrix(m, matrix), kept, out=kept)

    def decompress(self, out: np.ndarray, replies: Sequence[tuple[np.ndarray,
                                                                  Mapping[int, np.ndarray]]],
                   bounds: Sequence[tuple[int, int]]) -> np.ndarray:
        """The step's gradient over the whole flat vector from every shard's reply (its dense
        runs' sums, the Q of the matrices it answers for): the dense runs as summed, each
        matrix P^ Q^T. That Q is the next step's warm start."""
        q: dict[int, np.ndarray] = {}
        for (lo, hi), (dense, owned_q) in zip(bounds, replies):
            at = 0
            for a, b in self.plan.dense_runs(lo, hi):
                out[a:b] = dense[at:at + b - a]
                at += b - a
            q.update(owned_q)
        for matrix in self.plan.matrices:
            low_rank_product(self.p_hat[matrix.index], q[matrix.index], _matrix(out, matrix))
        self.warm_q = q
        return out


# --- the shard's end ----------------------------------------------------------------------------


class TopKShard:
    """Scatters each block's pairs into its own dense part, then the fixed-tree sum (the
    parts are what ParameterServerShard.reduce sums)."""

    def __init__(self, block_count: int, size: int, dtype: np.dtype | str):
        self.parts = [np.zeros(size, dtype) for _ in range(block_count)]

    def dense_parts(self, messages: Sequence[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        return [topk_scatter(part, indices, values)
                for part, (indices, values) in zip(self.parts, messages)]


class PowerSGDShard:
    """Shard [lo, hi)'s two rounds: sum and orthogonalise P, then sum Q. It never forms the
    step gradient (the workers do): the norms it reports come from the dense runs' sums and,
    for the matrices it answers for, from the factors."""

    def __init__(self, plan: PowerSGDPlan, layout: ParameterLayout, bounds: tuple[int, int],
                 block_count: int, dtype: np.dtype | str):
        self.plan, (self.lo, self.hi) = plan, bounds
        self.matrices = plan.matrices_within(self.lo, self.hi)
        self.owned = {m.index for m in plan.owned_by(self.lo, self.hi)}
        self.runs = plan.dense_runs(self.lo, self.hi)
        # Each dense run's parameters: (name, start, end) within the dense sums.
        self.dense_parameters: list[tuple[str, int, int]] = []
        at = 0
        for a, b in self.runs:
            self.dense_parameters += [(slot.name, at + lo - a, at + hi - a)
                                      for slot, lo, hi in layout.slots_within(a, b)]
            at += b - a
        factors = sum(m.rows for m in self.matrices) * plan.rank
        self.first_sum = TreeSum(block_count, at + factors, dtype)
        self.second_sum = TreeSum(block_count, sum(m.columns for m in self.matrices) * plan.rank,
                                  dtype)
        self.p_hat: dict[int, np.ndarray] = {}
        self.dense_total = np.empty(0, dtype)

    def reduce_first(self, messages: Sequence[np.ndarray]) -> dict[int, np.ndarray]:
        """Sum the blocks' first messages: the dense runs' sums are kept for the reply, P is
        orthogonalised. Returns P^ of the matrices this shard answers for."""
        total = self.first_sum.sum(messages)
        at = sum(b - a for a, b in self.runs)
        self.dense_total = total[:at]  # the workers' reply (until the next step's round 1)
        self.p_hat = {}
        for matrix in self.matrices:
            rows = matrix.rows * self.plan.rank
            self.p_hat[matrix.index] = orthogonalise(
                total[at:at + rows].reshape(matrix.rows, self.plan.rank).copy())
            at += rows
        return {index: p for index, p in self.p_hat.items() if index in self.owned}

    def reduce_second(self, messages: Sequence[np.ndarray]) -> tuple[dict[int, np.ndarray],
                                                                      dict[str, float]]:
        """Sum the blocks' Q_b. Returns Q of the matrices this shard answers for, and the
        squared norms of this shard's part of the step gradient by parameter: its dense runs'
        entries, and each matrix it answers for whole (whatever shards it spans)."""
        total = self.second_sum.sum(messages)
        norms = {name: 0.0 for name, _, _ in self.dense_parameters}
        for name, a, b in self.dense_parameters:
            norms[name] += squared_norm(self.dense_total[a:b])
        at, warm_q = 0, {}
        for matrix in self.matrices:
            size = matrix.columns * self.plan.rank
            if matrix.index in self.owned:
                q = warm_q[matrix.index] = total[at:at + size].reshape(
                    matrix.columns, self.plan.rank).copy()
                norms[matrix.name] = low_rank_squared_norm(self.p_hat[matrix.index], q)
            at += size
        return warm_q, norms


def low_rank_squared_norm(p: np.ndarray, q: np.ndarray) -> float:
    """||P Q^T||^2 without forming P Q^T: trace(P^T P Q^T Q), the sum of the two r x r Gram
    matrices' elementwise product (whether or not P's columns are exactly orthonormal)."""
    p64, q64 = p.astype(np.float64), q.astype(np.float64)
    return float(np.sum((p64.T @ p64) * (q64.T @ q64)))


def message_bytes(messages: Sequence) -> int:
    """Bytes of a message list as it travels: its arrays' data."""
    total = 0
    for message in messages:
        parts = message if isinstance(message, tuple) else (message,)
        total += sum(part.nbytes for part in parts)
    return total
