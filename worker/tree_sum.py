"""Summing gradients in a fixed order, whatever the number of workers.

Floating-point addition is not associative, so the order of a sum decides its last bits. The
gradients of the M micro-shards of a step are always added as the same balanced binary tree
over micro-shard indices: ((g0 + g1) + (g2 + g3)) + ... A worker that holds an aligned block of
micro-shards computes that block's subtree; the parameter-server shard adds the blocks' subtrees
by the tree's upper levels. When M and the worker count N are powers of two, every N gives
bitwise the same sum.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def tree_sum_into(out: np.ndarray, parts: Sequence[np.ndarray]) -> np.ndarray:
    """out = the pairwise tree sum of parts (the left half's sum plus the right half's).

    `out` may be one of the parts; the parts may be overwritten (they are scratch after a sum).
    """
    if not parts:
        out[...] = 0
        return out
    if len(parts) == 1:
        if parts[0] is not out:
            np.copyto(out, parts[0])
        return out
    level = list(parts)
    while len(level) > 1:
        merged = []
        for i in range(0, len(level) - 1, 2):
            left, right = level[i], level[i + 1]
            target = out if len(level) == 2 else left
            if not target.flags.writeable:
                target = np.empty_like(left)
            np.add(left, right, out=target)
            merged.append(target)
        if len(level) % 2:
            merged.append(level[-1])
        level = merged
    if level[0] is not out:
        np.copyto(out, level[0])
    return out


class TreeAccumulator:
    """The same pairwise tree, built as leaves arrive, holding only log2(M) partial sums.

    A leaf is one micro-shard's gradient as a list of arrays (one per parameter). Leaves are
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

    def total(self) -> list[np.ndarray] | None:
        """The sum of every leaf pushed (partials of unequal size merge right to left)."""
        if not self._stack:
            return None
        _, value = self._stack[-1]
        for _, left in reversed(self._stack[:-1]):
            value = [a + b for a, b in zip(left, value)]
        return value
