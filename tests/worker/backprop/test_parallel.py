"""Work split into blocks over threads gives the same bits as on one thread."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from worker.backprop import nn, parallel
from worker.backprop.tensor import Tensor


@pytest.mark.parametrize("count, sizes", [
    (32, [8, 8, 8, 8]), (10, [3, 3, 3, 1]), (3, [1, 1, 1]), (1, [1]), (0, []),
])
def test_blocks_cover_every_item_once_in_order_and_depend_only_on_the_count(count, sizes):
    blocks = parallel.blocks_of(count)

    assert [b.stop - b.start for b in blocks] == sizes
    assert [i for b in blocks for i in range(b.start, b.stop)] == list(range(count))


def test_run_blocks_runs_every_block_and_re_raises_an_error(monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    done = []
    parallel.run_blocks(lambda block: done.append(block.start), 10)
    assert sorted(done) == [0, 3, 6, 9]

    def fail(block):
        raise ValueError(f"block {block.start}")

    with pytest.raises(ValueError, match="block"):
        parallel.run_blocks(fail, 10)


def test_run_blocks_inside_a_block_runs_serially_instead_of_waiting_on_itself(monkeypatch):
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")
    inner = []

    def outer(block):
        parallel.run_blocks(lambda b: inner.append((block.start, b.start)), 4)

    runner = threading.Thread(target=parallel.run_blocks, args=(outer, 8), daemon=True)
    runner.start()  # every pool thread busy in an outer block
    runner.join(timeout=10)

    assert not runner.is_alive(), "nested run_blocks waited on its own pool"
    assert sorted(inner) == [(o, i) for o in (0, 2, 4, 6) for i in range(4)]


def train_step(threads: str, monkeypatch) -> list[np.ndarray]:
    """A convolution's output, input gradient and parameter gradients (its kernels run on
    blocks of the batch)."""
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", threads)
    rng = np.random.default_rng(0)
    layer = nn.Conv2d(3, 5, 3, padding=1, rng=rng)
    x = Tensor(rng.standard_normal((9, 3, 6, 6)).astype(np.float32), requires_grad=True)
    out = layer(x)
    out.backward(rng.standard_normal(out.shape).astype(np.float32))
    return [out.data, x.grad] + [p.grad for p in layer.parameters()]


def test_a_convolution_step_gives_the_same_bits_on_one_thread_and_on_two(monkeypatch):
    one, two = train_step("1", monkeypatch), train_step("2", monkeypatch)

    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)
