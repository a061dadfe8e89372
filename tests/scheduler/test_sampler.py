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


# --- the data cursor a checkpoint keeps ---------------------------------------------------------


def test_a_cursor_counts_the_samples_of_its_epoch_used_and_a_resume_starts_after_them():
    sampler = EpochSampler(1000, 64, 4, seed=7)
    cursor = sampler.cursor(2, 5)
    assert (cursor.epoch, cursor.samples_used, cursor.training_samples) == (2, 320, 1000)
    assert sampler.position(cursor) == (2, 5)
    assert sampler.cursor(0, 16).samples_used == 1000  # the short last batch counts its 40
    assert EpochSampler(1000, 64, 4, seed=7, row_groups=(500, 500)).cursor(0, 1).order \
        == "row_group_lanes(4)"


@pytest.mark.parametrize("other, named", [
    (EpochSampler(999, 64, 4, seed=7), "this job's data has 999"),
    (EpochSampler(1000, 64, 4, seed=8), "with seed 8"),
    (EpochSampler(1000, 64, 4, seed=7, shuffle=False), "drawn by file_order"),
    (EpochSampler(1000, 64, 4, seed=7, row_groups=(400, 600)), "row_group_lanes(4)"),
])
def test_a_cursor_in_another_order_is_refused_rather_than_replayed(other, named):
    with pytest.raises(ValueError, match="resuming would use samples twice or never") as refused:
        other.position(EpochSampler(1000, 64, 4, seed=7).cursor(1, 3))
    assert named in str(refused.value)


def test_a_cursor_inside_a_batch_is_refused():
    cursor = EpochSampler(1000, 64, 4, seed=7).cursor(1, 3)
    with pytest.raises(ValueError, match="not at the end of a batch of 50"):
        EpochSampler(1000, 50, 4, seed=7).position(cursor)
