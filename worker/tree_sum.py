"""Summing gradients in a fixed order, whatever the number of workers.

Floating-point addition is not associative, so the order of a sum decides its last bits. The
gradients of the M micro-batches of a step are always added as the same balanced binary tree
over micro-batch indices: ((g0 + g1) + (g2 + g3)) + ... A worker that holds an aligned block of
micro-batches computes that block's subtree; the parameter-server shard adds the blocks' subtrees
by the tree's upper levels. When M and the worker count N are powers of two, every N gives
bitwise the same sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def tree_sum_into(out: np.ndarray, parts: Sequence[np.ndarray]) -> np.ndarray:
    """out = the pairwise tree sum of parts (`out` may be one of them). Allocates its scratch
    on every call: a step loop keeps a TreeSum instead."""
    tree = TreeSum(len(parts), out.shape, out.dtype)
    np.copyto(out, tree.sum(parts))
    return out


class TreeSum:
    """The pairwise tree over up to `parts` arrays, in buffers of its own, allocated once:
    ((p0 + p1) + (p2 + p3)) + ..., an odd part out carried up to the next level.

    The parts are only read. A parameter-server shard sums the workers' gradient blocks with
    one: were the sum formed in a block, a late or recomputed write of that block during a
    worker's recovery could change a sum in progress.
    """

    def __init__(self, parts: int, shape: int | tuple[int, ...], dtype: np.dtype | str):
        # The first level's pair sums each need a buffer; higher levels add into their left
        # operand, which is always one of these. buffers[0] ends up holding the total.
        self.buffers = [np.empty(shape, dtype) for _ in range(max(1, parts // 2))]

    @property
    def total(self) -> np.ndarray:
        """Where `sum` leaves its result (valid until the next call)."""
        return self.buffers[0]

    def sum(self, parts: Sequence[np.ndarray]) -> np.ndarray:
        if len(parts) // 2 > len(self.buffers):
            raise ValueError(f"a TreeSum for {2 * len(self.buffers) + 1} parts got {len(parts)}")
        if len(parts) <= 1:
            if parts:
                np.copyto(self.total, parts[0])
            else:
                self.total[...] = 0
            return self.total
        level = list(parts)
        first_level = True
        while len(level) > 1:
            merged = []
            for i in range(0, len(level) - 1, 2):
                target = self.buffers[i // 2] if first_level else level[i]
                np.add(level[i], level[i + 1], out=target)
                merged.append(target)
            if len(level) % 2:
                merged.append(level[-1])
            level = merged
            first_level = False
        return level[0]


class TreeAccumulator:
    """The same pairwise tree, built as leaves arrive, holding only log2(M) partial sums.

    A leaf is one micro-batch's gradient as a list of arrays (one per parameter). Leaves are
    pushed in index order; two partial sums of equal size merge as soon as both exist, which is
    exactly the balanced tree of `tree_sum_into` when the count is a power of two. Partial sums
    are formed in place in the left operand's arrays, which the accumulator then owns.
    """

    def __init__(self) -> None:
        self._stack: list[tuple[int, list[np.ndarray]]] = []  # (leaf count, partial sum)

    def push(self, leaf: Sequence[np.ndarray]) -> None:
        count, value = 1, list(leaf)
        while self._stack and self._stack[-1][0] == count:
            left_count, left = self._stack.pop()
            for a, b in zip(left, value):
                a += b  # left + right, the tree's order
            count, value = left_count + count, left
        self._stack.append((count, value))

    def total_if_pushed_last(self, index: int, value: np.ndarray) -> np.ndarray:
        """Array `index` of the total were a leaf holding `value` there pushed now, with the
        same additions in the same order as `push` then `total` (so the same bits), leaving
        the accumulator as it is: a worker sends one parameter's block sum while backward
        still computes the last leaf's other arrays."""
        count, stack = 1, list(self._stack)
        while stack and stack[-1][0] == count:
            left_count, left = stack.pop()
            value = left[index] + value
            count += left_count
        for _, left in reversed(stack):
            value = left[index] + value
        return value

    def total(self) -> list[np.ndarray] | None:
        """The sum of every leaf pushed (partials of unequal size merge right to left)."""
        if not self._stack:
            return None
        _, value = self._stack[-1]
        for _, left in reversed(self._stack[:-1]):
            value = [a + b for a, b in zip(left, value)]
        return value
