"""Run NumPy work on independent blocks of a batch in parallel threads.

BLAS spreads each large matrix product over the cores, but NumPy runs everything else on one
core where PyTorch spreads it too. NumPy releases the GIL inside ufuncs, reductions, einsum and
matmul, so threads working on disjoint blocks of the same arrays run in parallel. Whether that
pays depends on the work: the transformer's attention ran faster on two threads alone (forward
2.2 -> 1.7 ms) but slower inside a training step, where BLAS's workers still spin after the
preceding matrix product, and bandwidth-bound passes (LayerNorm, relu's mask) were slower in
both; those ops stay on one thread. Measure before using it.

Blocks are fixed by the data (`blocks_of`), never by the thread count, and a block is computed
exactly as it would be on its own, so results are bitwise the same for any number of threads:
one thread runs the same blocks one after another.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

BLOCKS = 4  # enough for the few cores a worker has; each block still a few hundred KiB

_THREAD_NAME = "backprop-block"
_pool: ThreadPoolExecutor | None = None
_pool_lock = threading.Lock()


def thread_count() -> int:
    """As many threads as BLAS is told to use (OPENBLAS_NUM_THREADS, OMP_NUM_THREADS), else
    one per core: the same cores, taken in turns by matrix products and the work between."""
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        value = os.environ.get(name, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return os.cpu_count() or 1


def blocks_of(count: int) -> list[slice]:
    """range(count) cut into at most BLOCKS consecutive slices of (nearly) equal size."""
    size = -(-count // BLOCKS) if count else 1
    return [slice(start, min(start + size, count)) for start in range(0, count, size)]


def run_blocks(work: Callable[[slice], None], count: int) -> None:
    """work(block) for every block of range(count), on up to thread_count() threads; returns
    when all are done and re-raises the first error."""
    blocks = blocks_of(count)
    nested = threading.current_thread().name.startswith(_THREAD_NAME)  # would wait on itself
    if len(blocks) <= 1 or thread_count() <= 1 or nested:
        for block in blocks:
            work(block)
        return
    for _ in _executor().map(work, blocks):
        pass


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None:
            _pool = ThreadPoolExecutor(thread_count(), thread_name_prefix=_THREAD_NAME)
        return _pool
