import numpy as np
import pytest

from worker.backprop import nn
from worker.flat_parameters import ParameterLayout


def mlp():
    nn.init.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 7), nn.ReLU(), nn.Linear(7, 3))


def test_layout_follows_named_parameters_order_with_contiguous_offsets():
    layout = ParameterLayout.of(mlp())
    assert [s.name for s in layout.slots] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert [s.offset for s in layout.slots] == [0, 35, 42, 63]
    assert layout.size == 66 and layout.nbytes == 66 * 4


def test_bound_parameters_are_views_so_updates_to_the_vector_reach_the_model():
    model = mlp()
    layout = ParameterLayout.of(model)
    flat = layout.flatten(model)
    layout.bind(model, flat)
    flat[:] = 0
    assert np.all(model[0].weight.data == 0)
    assert np.shares_memory(model[2].bias.data, flat)


@pytest.mark.parametrize("shards", [1, 2, 3, 5])
def test_shards_are_contiguous_balanced_and_cover_the_vector(shards):
    layout = ParameterLayout.of(mlp())
    bounds = layout.shard_bounds(shards)
    assert bounds[0][0] == 0 and bounds[-1][1] == layout.size
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [hi - lo for lo, hi in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_aligned_shards_never_cut_a_parameter():
    layout = ParameterLayout.of(mlp())
    ends = {0} | {s.offset + s.size for s in layout.slots}
    for lo, hi in layout.shard_bounds(3, align_to_parameters=True):
        assert lo in ends and hi in ends


def test_aligned_shards_never_cut_inside_a_range_kept_together():
    layout = ParameterLayout.of(mlp())
    # Without the ranges, 2 shards cut at 35 (between 0.weight and 0.bias), nearest the middle.
    assert layout.shard_bounds(2, align_to_parameters=True) == [(0, 35), (35, 66)]
    layers = [(0, 42), (42, 66)]  # K-FAC's [weight, bias] of each Linear
    assert layout.shard_bounds(2, align_to_parameters=True, keep_together=layers) == [
        (0, 42), (42, 66)]


def test_slots_within_reports_partial_overlaps():
    layout = ParameterLayout.of(mlp())
    overlap = layout.slots_within(30, 45)
    assert [(s.name, lo, hi) for s, lo, hi in overlap] == [
        ("0.weight", 30, 35), ("0.bias", 35, 42), ("2.weight", 42, 45)]
