import numpy as np
import pytest

from scheduler.sampler import EpochSampler, cut_batch


def test_every_sample_is_used_exactly_once_per_epoch_including_the_short_last_batch():
    sampler = EpochSampler(num_samples=1000, batch_size=64, micro_batches=4, seed=7)
    for epoch in range(3):
        used = np.concatenate([shard for step in sampler.epoch(epoch)
                               for shard in step.micro_batches])
        assert np.array_equal(np.sort(used), np.arange(1000))
    assert sampler.steps_per_epoch == 16  # 15 full batches and one of 40


def test_epochs_are_shuffled_differently_but_reproducibly():
    a = EpochSampler(100, 10, 2, seed=1)
    b = EpochSampler(100, 10, 2, seed=1)
    assert np.array_equal(a.permutation(0), b.permutation(0))
    assert not np.array_equal(a.permutation(0), a.permutation(1))
    assert not np.array_equal(a.permutation(0), EpochSampler(100, 10, 2, seed=2).permutation(0))


def test_a_batch_is_cut_into_micro_batches_differing_by_at_most_one_sample():
    step = EpochSampler(100, 30, 4, seed=0).epoch(0)[0]
    assert [len(s) for s in step.micro_batches] == [8, 8, 7, 7]
    assert step.size == 30


def test_a_batch_smaller_than_the_micro_batch_count_leaves_empty_shards():
    last = EpochSampler(9, 8, 4, seed=0).epoch(0)[-1]
    assert [len(s) for s in last.micro_batches] == [1, 0, 0, 0]


def test_no_shuffle_keeps_the_data_order():
    steps = EpochSampler(6, 4, 1, seed=0, shuffle=False).epoch(0)
    assert [s.micro_batches[0].tolist() for s in steps] == [[0, 1, 2, 3], [4, 5]]


@pytest.mark.parametrize("bad", [dict(batch_size=0), dict(micro_batches=0)])
def test_nonpositive_sizes_are_rejected(bad):
    with pytest.raises(ValueError):
        EpochSampler(**{"num_samples": 10, "batch_size": 2, "micro_batches": 1, "seed": 0, **bad})


def test_a_batch_too_short_for_micro_batches_of_two_is_cut_into_fewer_when_asked():
    # A batch norm job (min 2 samples per micro-batch): the last batch of 6 is cut into 3.
    last = EpochSampler(30, 8, 4, seed=0, min_micro_batch_samples=2).epoch(0)[-1]
    assert [len(s) for s in last.micro_batches] == [2, 2, 2, 0]
    assert [len(s) for s in cut_batch(np.arange(5), 4, min_samples=2)] == [3, 2, 0, 0]
    assert [len(s) for s in cut_batch(np.arange(9), 4, min_samples=2)] == [3, 2, 2, 2]


def test_the_minimum_of_one_cuts_every_batch_as_it_always_was():
    for size in range(1, 20):
        batch = np.arange(100, 100 + size)
        expected = np.array_split(batch, 4)
        assert all(np.array_equal(a, b) for a, b in zip(cut_batch(batch, 4), expected,
                                                        strict=True))
