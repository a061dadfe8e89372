"""Gradient compression's math, both ends, against a NumPy reference written from the papers:
PowerSGD (Vogels et al. 2019) and top-k, each with error feedback. No Ray: the workers' and
shards' ends are called as the compressed object-store step calls them."""

from __future__ import annotations

import numpy as np
import pytest

from worker.backprop import nn
from worker.compression import (
    ErrorFeedback,
    PowerSGDPlan,
    PowerSGDShard,
    PowerSGDWorker,
    TopKShard,
    low_rank_product,
    low_rank_squared_norm,
    message_bytes,
    orthogonalise,
    topk_count,
    topk_decompress,
    topk_index_dtype,
    topk_messages,
    topk_reply,
    topk_select,
)
from worker.flat_parameters import ParameterLayout
from worker.tree_sum import TreeSum

RANK = 2


def model_layout() -> ParameterLayout:
    # 0.weight 12x6 (compressed at rank 2: (12 + 6) x 2 < 72), 0.bias, 1.weight 3x12, 1.bias
    # (3x12 at rank 2: 30 < 36, compressed), and a 2x2 matrix that would not shrink.
    model = nn.Sequential(nn.Linear(6, 12), nn.Linear(12, 3), nn.Linear(3, 2), nn.Linear(2, 2))
    return ParameterLayout.of(model)


def reference_orthogonalise(p: np.ndarray) -> np.ndarray:
    """Q of the QR decomposition with a positive diagonal of R: Gram-Schmidt's result."""
    q, r = np.linalg.qr(p)
    return q * np.sign(np.diag(r))


def powersgd_step(plan, bounds, workers, shards, gradients, warm_q):
    """One step through both ends: the step gradient as worker 0 rebuilds it from the shards'
    replies, the next warm Q, the workers' messages, the replies and the shards' norms."""
    firsts = [worker.first(b, g, warm_q, bounds) for b, (worker, g) in
              enumerate(zip(workers, gradients))]
    p_hat = {}
    for k, shard in enumerate(shards):
        p_hat.update(shard.reduce_first([first[k] for first in firsts]))
    seconds = [worker.second(b, p_hat, bounds) for b, worker in enumerate(workers)]
    replies, next_q, norms = [], {}, []
    for k, shard in enumerate(shards):
        owned, shard_norms = shard.reduce_second([second[k] for second in seconds])
        replies.append((shard.dense_total.copy(), owned))
        next_q.update(owned)
        norms.append(shard_norms)
    gradient = workers[0].decompress(np.full(plan.size, np.nan), replies, bounds)
    return gradient, next_q, firsts, seconds, replies, norms


@pytest.fixture
def setting():
    layout = model_layout()
    plan = PowerSGDPlan.of(layout, RANK)
    # Two shards cut inside 0.weight, so both receive and sum its factors.
    bounds = [(0, 40), (40, layout.size)]
    memories = [ErrorFeedback(layout.size, "float64") for _ in range(2)]
    workers = [PowerSGDWorker(plan, memory, plan.initial_q(0, "float64"))
               for memory in memories]
    # Each worker object computes one block here (block b on worker b).
    shards = [PowerSGDShard(plan, layout, bound, 2, "float64") for bound in bounds]
    return layout, plan, bounds, memories, workers, shards


def test_only_matrices_whose_factors_are_smaller_are_compressed(setting):
    layout, plan, bounds, *_ = setting
    assert [m.name for m in plan.matrices] == ["0.weight", "1.weight"]
    assert [(m.rows, m.columns) for m in plan.matrices] == [(12, 6), (3, 12)]
    bias = next(slot for slot in layout.slots if slot.name == "0.bias")
    # Shard 1's dense runs: 0.bias, and everything from 2.weight on (a 3x2 and 2x2 matrix
    # and vectors that would not shrink).
    assert plan.dense_runs(*bounds[1]) == [(bias.offset, bias.offset + 12),
                                          (plan.matrices[1].offset + 36, layout.size)]
    assert plan.dense_runs(*bounds[0]) == []


def test_one_powersgd_step_equals_the_numpy_reference_and_so_do_the_shards_norms(setting):
    layout, plan, bounds, memories, workers, shards = setting
    rng = np.random.default_rng(0)
    gradients = [rng.standard_normal(layout.size) for _ in range(2)]
    warm_q = plan.initial_q(seed=3, dtype="float64")
    gradient, next_q, _, _, _, norms = powersgd_step(plan, bounds, workers, shards, gradients,
                                                     warm_q)

    expected = gradients[0] + gradients[1]  # dense entries: the plain sum
    for matrix in plan.matrices:
        def block(flat, m=matrix):
            return flat[m.offset:m.offset + m.size].reshape(m.rows, m.columns)
        m0, m1 = block(gradients[0]), block(gradients[1])
        q = warm_q[matrix.index]
        p_hat = reference_orthogonalise(m0 @ q + m1 @ q)
        q_sum = m0.T @ p_hat + m1.T @ p_hat
        block(expected)[...] = p_hat @ q_sum.T
        np.testing.assert_allclose(next_q[matrix.index], q_sum, rtol=1e-12, atol=1e-12)
        # Each worker keeps what its own message left out.
        for memory, mine in zip(memories, (m0, m1)):
            np.testing.assert_allclose(block(memory.error(memories.index(memory))),
                                       mine - p_hat @ (mine.T @ p_hat).T, atol=1e-12)
    np.testing.assert_allclose(gradient, expected, rtol=1e-12, atol=1e-12)
    # The shards' norms by parameter add up to the step gradient's, though no shard formed
    # P^ Q^T (0.weight spans both shards: the one holding its first entry reports it).
    by_parameter: dict[str, float] = {}
    for shard_norms in norms:
        for name, value in shard_norms.items():
            by_parameter[name] = by_parameter.get(name, 0.0) + value
    views = layout.views(expected)
    assert by_parameter.keys() == {slot.name for slot in layout.slots}
    for name, value in by_parameter.items():
        np.testing.assert_allclose(value, np.sum(views[name] ** 2), rtol=1e-12)


def test_every_worker_rebuilds_the_same_bits_from_the_shards_compressed_replies(setting):
    layout, plan, bounds, memories, workers, shards = setting
    rng = np.random.default_rng(5)
    gradients = [rng.standard_normal(layout.size) for _ in range(2)]
    gradient, next_q, _, _, replies, _ = powersgd_step(plan, bounds, workers, shards, gradients,
                                                       plan.initial_q(1, "float64"))
    # The replies: each shard's dense runs and the Q of the matrices it answers for; P^ the
    # workers already have from round 2. Far fewer values than the parameters.
    values = sum(dense.size + sum(q.size for q in owned.values()) for dense, owned in replies)
    assert values < layout.size / 2
    # Each worker steps its own copy of the parameters with what it rebuilds: the same bits.
    assert np.array_equal(workers[1].decompress(np.empty(layout.size), replies, bounds),
                          gradient)
    for worker in workers:  # Q is the next step's warm start
        assert all(np.array_equal(worker.warm_q[i], q) for i, q in next_q.items())


def test_the_low_rank_product_and_its_norm_match_numpy():
    rng = np.random.default_rng(6)
    p, q = rng.standard_normal((9, 3)), rng.standard_normal((5, 3))
    whole = low_rank_product(p, q, np.empty((9, 5)))
    np.testing.assert_allclose(whole, p @ q.T, rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(low_rank_squared_norm(p, q), np.sum(whole ** 2), rtol=1e-12)


def test_top_k_replies_hold_the_summed_nonzeros_and_rebuild_the_gradient_exactly():
    rng = np.random.default_rng(7)
    memories = [ErrorFeedback(50, "float64") for _ in range(2)]
    bounds = [(0, 20), (20, 50)]
    messages = [topk_messages(m, b, rng.standard_normal(50), bounds, 0.1)
                for b, m in enumerate(memories)]
    totals = []
    for k, (lo, hi) in enumerate(bounds):
        parts = TopKShard(2, hi - lo, "float64").dense_parts([message[k] for message in messages])
        totals.append(TreeSum(2, hi - lo, "float64").sum(parts).copy())
    replies = [topk_reply(total) for total in totals]
    # At most both blocks' pairs (2 + 2 in the first slice, 3 + 3 in the second).
    assert all(0 < len(indices) <= cap for (indices, _), cap in zip(replies, [4, 6]))
    assert all(indices.dtype == np.int32 for indices, _ in replies)
    rebuilt = topk_decompress(np.full(50, np.nan), replies, bounds)
    assert np.array_equal(rebuilt, np.concatenate(totals))


def test_powersgd_error_feedback_delays_but_never_loses_a_gradient(setting):
    layout, plan, bounds, memories, workers, shards = setting
    rng = np.random.default_rng(1)
    warm_q = plan.initial_q(seed=0, dtype="float64")
    sent = np.zeros(layout.size)
    computed = np.zeros(layout.size)
    for _ in range(5):
        gradients = [rng.standard_normal(layout.size) for _ in range(2)]
        computed += gradients[0] + gradients[1]
        gradient, warm_q, *_ = powersgd_step(plan, bounds, workers, shards, gradients, warm_q)
        sent += gradient
        kept = memories[0].error(0) + memories[1].error(1)
        np.testing.assert_allclose(sent + kept, computed, atol=1e-10)
    assert np.abs(kept).max() > 0.1  # there was something to carry


def test_a_worker_sends_rows_plus_columns_times_rank_per_matrix_per_shard_it_touches(setting):
    layout, plan, bounds, memories, workers, shards = setting
    gradients = [np.ones(layout.size), np.ones(layout.size)]
    _, _, firsts, seconds, *_ = powersgd_step(plan, bounds, workers, shards, gradients,
                                          plan.initial_q(0, "float64"))
    dense = sum(hi - lo for k in range(2) for lo, hi in plan.dense_runs(*bounds[k]))
    # 0.weight touches both shards; 1.weight only shard 1.
    factors = 2 * (12 + 6) * RANK + (3 + 12) * RANK
    assert message_bytes(firsts[0]) + message_bytes(seconds[0]) == (dense + factors) * 8


def test_gram_schmidt_matches_qr_and_leaves_a_zero_matrix_zero():
    p = np.random.default_rng(2).standard_normal((7, 3))
    np.testing.assert_allclose(orthogonalise(p.copy()), reference_orthogonalise(p), atol=1e-12)
    assert not np.isnan(orthogonalise(np.zeros((4, 2)))).any()


def test_top_k_sends_the_largest_entries_of_each_slice_and_keeps_the_rest():
    memory = ErrorFeedback(10, "float64")
    gradient = np.array([0.1, -5.0, 0.2, 3.0, 0.0, 1.0, -1.0, 0.5, 2.0, -0.3])
    bounds = [(0, 5), (5, 10)]
    messages = topk_messages(memory, 0, gradient, bounds, ratio=0.3)  # ceil(1.5) = 2 each
    (first_indices, first_values), (second_indices, second_values) = messages
    assert list(first_indices) == [1, 3] and list(first_values) == [-5.0, 3.0]
    # Indices within the slice; |-1.0| ties 1.0 and the lower index wins.
    assert list(second_indices) == [0, 3] and list(second_values) == [1.0, 2.0]
    np.testing.assert_array_equal(memory.error(0), [0.1, 0, 0.2, 0, 0, 0, -1.0, 0.5, 0, -0.3])
    # The next step sends the kept -1.0 (index 1 of the second slice) as the largest there.
    (_, _), (indices, values) = topk_messages(memory, 0, np.zeros(10), bounds, ratio=0.2)
    assert list(indices) == [1] and list(values) == [-1.0]


def test_top_k_shard_sums_the_blocks_scattered_messages_in_the_tree_order():
    rng = np.random.default_rng(4)
    memories = [ErrorFeedback(50, "float64") for _ in range(4)]
    gradients = [rng.standard_normal(50) for _ in range(4)]
    bounds = [(0, 20), (20, 50)]
    messages = [topk_messages(m, b, g, bounds, 0.1) for b, (m, g) in
                enumerate(zip(memories, gradients))]
    shard = TopKShard(4, 30, "float64")
    parts = shard.dense_parts([message[1] for message in messages])
    expected_parts = []
    for gradient in gradients:
        part = gradient[20:50]
        dense = np.zeros(30)
        largest = np.argsort(-np.abs(part))[:3]
        dense[largest] = part[largest]
        expected_parts.append(dense)
    total = TreeSum(4, 30, "float64").sum(parts)
    assert np.array_equal(total, (expected_parts[0] + expected_parts[1])
                          + (expected_parts[2] + expected_parts[3]))


def test_top_k_count_is_the_ratio_rounded_up_and_at_least_one():
    assert topk_count(1000, 0.01) == 10 and topk_count(1001, 0.01) == 11
    assert topk_count(5, 0.01) == 1 and topk_count(5, 1.0) == 5
    assert list(topk_select(np.array([1.0, -1.0, 1.0]), 2)) == [0, 1]


def test_top_k_indices_are_32_bit_while_a_slice_s_indices_fit_and_64_bit_beyond():
    # Both ends of a message derive the dtype from the slice's size: it is not sent.
    assert topk_index_dtype(2**31 - 1) == np.int32 and topk_index_dtype(2**31) == np.int64
