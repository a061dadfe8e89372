import numpy as np
import pytest

from worker.tree_sum import TreeAccumulator, TreeSum, tree_sum_into


def gradients(count, size=1000, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(size).astype(np.float32) * 10 ** rng.uniform(-3, 3)
            for _ in range(count)]


@pytest.mark.parametrize("workers", [1, 2, 4, 8])
def test_blocks_summed_by_any_power_of_two_worker_count_give_bitwise_the_same_total(workers):
    leaves = gradients(8)
    reference = tree_sum_into(np.empty(1000, np.float32), [g.copy() for g in leaves])
    block_sums = []
    per_block = len(leaves) // workers
    for b in range(workers):
        accumulator = TreeAccumulator()
        for leaf in leaves[b * per_block:(b + 1) * per_block]:
            accumulator.push([leaf.copy()])
        block_sums.append(accumulator.total()[0])
    total = tree_sum_into(np.empty(1000, np.float32), block_sums)
    assert np.array_equal(total, reference)


def test_the_tree_order_differs_from_a_left_to_right_sum_in_the_last_bits():
    # Why the order is fixed: float addition is not associative.
    leaves = gradients(8, seed=3)
    tree = tree_sum_into(np.empty(1000, np.float32), [g.copy() for g in leaves])
    running = leaves[0].copy()
    for leaf in leaves[1:]:
        running += leaf
    assert not np.array_equal(tree, running)
    np.testing.assert_allclose(tree, running, rtol=1e-4, atol=1e-3)


def test_accumulator_handles_counts_that_are_not_powers_of_two():
    leaves = gradients(5)
    accumulator = TreeAccumulator()
    for leaf in leaves:
        accumulator.push([leaf.copy(), leaf[:10].copy()])
    total = accumulator.total()
    np.testing.assert_allclose(total[0], np.sum(leaves, axis=0), rtol=1e-5, atol=1e-3)
    assert total[1].shape == (10,)


def test_empty_inputs():
    assert TreeAccumulator().total() is None
    out = np.ones(3)
    assert np.array_equal(tree_sum_into(out, []), np.zeros(3))


def pairwise_tree(parts):
    """The tree spelt out: adjacent pairs added level by level, an odd one out carried up."""
    level = list(parts)
    while len(level) > 1:
        carried = [level[-1]] if len(level) % 2 else []
        level = [level[i] + level[i + 1] for i in range(0, len(level) - 1, 2)] + carried
    return level[0]


@pytest.mark.parametrize("count", [1, 2, 3, 4, 5, 7, 8])
def test_a_tree_sum_only_reads_its_parts_and_gives_the_pairwise_tree_bits(count):
    # A parameter-server shard sums the workers' blocks with one: a block it wrote into could
    # be changed under it by a late or recomputed write.
    parts = gradients(count, seed=count)
    for part in parts:
        part.flags.writeable = False  # a write would raise
    tree = TreeSum(count, 1000, np.float32)
    total = tree.sum(parts)
    assert np.array_equal(total, pairwise_tree(parts))
    assert not any(np.shares_memory(total, part) for part in parts)


def test_a_tree_sum_reuses_its_buffers_from_step_to_step():
    tree = TreeSum(4, 1000, np.float32)
    buffers = [id(buffer) for buffer in tree.buffers]
    first = tree.sum(gradients(4, seed=1))
    second = tree.sum(gradients(4, seed=2))
    assert first is second is tree.total
    assert [id(buffer) for buffer in tree.buffers] == buffers
    with pytest.raises(ValueError, match="got 6"):
        tree.sum(gradients(6))


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7, 8])
def test_the_total_with_a_last_leaf_is_known_per_array_before_the_leaf_is_pushed(count):
    rng = np.random.default_rng(count)
    leaves = [[rng.standard_normal(5).astype(np.float32) * 10.0 ** rng.integers(-3, 4),
               rng.standard_normal(3).astype(np.float32)] for _ in range(count)]
    accumulator = TreeAccumulator()
    for leaf in leaves[:-1]:
        accumulator.push([a.copy() for a in leaf])
    early = [accumulator.total_if_pushed_last(i, leaves[-1][i].copy()) for i in range(2)]
    accumulator.push([a.copy() for a in leaves[-1]])
    total = accumulator.total()
    assert total is not None
    for i in range(2):
        assert early[i].tobytes() == total[i].tobytes()
