"""Frozen layers (`trainable: false`): the plan knows them, the built model computes no gradient
for them, the parameter layout marks their slots, and a parameter-server shard never changes
them nor their optimizer state, whatever the rule (weight decay and momentum included) and
wherever a shard boundary cuts."""

from __future__ import annotations

import numpy as np
import pytest

from chainrule.spec_file import SpecError, load_job_spec
from worker.backprop import Tensor, optim, tensor
from worker.flat_parameters import ParameterLayout
from worker.model_builder import Loss, build_model, plan_model
from worker.parameter_server import ParameterServerShard, ShardSetup
from worker.resolved_job import DataShape, resolve

FROZEN_MLP = """
name: frozen
model: {layers: [
  {linear: {out_features: 6}, trainable: false}, {relu: {}},
  {residual: {layers: [{linear: {out_features: 6}, trainable: false}, {relu: {}},
                       {linear: {out_features: 6}}]}},
  {linear: {out_features: 3}}]}
loss: cross_entropy
data: {dataset: "sklearn:iris", batch_size: 8, epochs: 1}
"""
IRIS = DataShape(150, 0, (4,), False, "classification", 3, ())


def _spec(text: str = FROZEN_MLP):
    return load_job_spec(text)


def test_the_plan_marks_frozen_layers_and_counts_frozen_parameters_nested_ones_included():
    plan = plan_model(_spec().model, (4,), "float32")
    assert [layer.trainable for layer in plan.layers] == [False, True, True, True]
    assert [layer.frozen_parameters for layer in plan.layers] == [30, 0, 42, 0]
    assert plan.frozen_parameters == 72 and plan.parameters == 30 + 84 + 21


def test_trainable_false_on_a_layer_without_parameters_names_that_field():
    spec = _spec(FROZEN_MLP.replace("{relu: {}},\n  {residual", "{relu: {}, trainable: false},\n"
                                                                "  {residual"))
    with pytest.raises(SpecError) as info:
        plan_model(spec.model, (4,), "float32")
    assert info.value.field_path == "model.layers[1].trainable"
    assert "relu has no parameters to freeze" in info.value.message


def test_a_model_whose_every_layer_is_frozen_is_refused_by_resolve():
    spec = _spec(FROZEN_MLP.replace("{linear: {out_features: 6}}]", "{linear: {out_features: 6},"
                                    " trainable: false}]").replace(
        "{linear: {out_features: 3}}]", "{linear: {out_features: 3}, trainable: false}]"))
    with pytest.raises(SpecError) as info:
        resolve(spec, IRIS)
    assert info.value.field_path == "model.layers"
    assert "nothing would train" in info.value.message


def test_a_frozen_layer_computes_no_weight_gradient(monkeypatch):
    model = build_model(_spec().model, (4,), np.float64, seed=0)
    frozen = [model[0].weight, model[0].bias, model[2].block[0].weight, model[2].block[0].bias]
    assert [p.requires_grad for p in frozen] == [False] * 4
    differentiated = []
    real_vjp = tensor._vjp

    def recording_vjp(node, index, g, create_graph):
        differentiated.append(node.parents[index])
        return real_vjp(node, index, g, create_graph)

    monkeypatch.setattr(tensor, "_vjp", recording_vjp)
    x = np.random.default_rng(0).standard_normal((5, 4))
    Loss("cross_entropy", "sum")(model(Tensor(x)), np.array([0, 1, 2, 0, 1])).backward()
    assert differentiated, "backward ran no rule at all"
    assert not any(parent is p for parent in differentiated for p in frozen)
    assert all(p.grad is None for p in frozen)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_the_layout_marks_frozen_slots_and_the_trainable_runs_between_them():
    model = build_model(_spec().model, (4,), np.float32, seed=0)
    layout = ParameterLayout.of(model)
    assert [(slot.name, slot.trainable) for slot in layout.slots] == [
        ("0.weight", False), ("0.bias", False),
        ("2.block.0.weight", False), ("2.block.0.bias", False),
        ("2.block.2.weight", True), ("2.block.2.bias", True),
        ("3.weight", True), ("3.bias", True)]
    assert layout.trainable_runs(0, layout.size) == [(72, layout.size)]
    assert layout.trainable_runs(10, 80) == [(72, 80)]
    assert layout.trainable_runs(0, 50) == []


@pytest.mark.parametrize("rule, hyper", [
    ("adamw", optim.functional.AdamWHyper(lr=0.1, weight_decay=0.5)),
    ("sgd", optim.functional.SGDHyper(lr=0.1, momentum=0.9, weight_decay=0.5)),
    ("adafactor", optim.functional.AdafactorHyper(lr=0.1, weight_decay=0.5)),
])
@pytest.mark.parametrize("shards", [1, 3])
def test_a_shard_never_changes_a_frozen_parameter_nor_its_optimizer_state(rule, hyper, shards):
    model = build_model(_spec().model, (4,), np.float64, seed=0)
    layout = ParameterLayout.of(model)
    start = layout.flatten(model)
    frozen = np.zeros(layout.size, dtype=bool)
    for slot in layout.slots:
        frozen[slot.offset:slot.offset + slot.size] = not slot.trainable
    gradient = np.random.default_rng(1).standard_normal(layout.size)  # even where frozen
    elementwise = optim.RULES[rule].elementwise
    updated, states = np.empty_like(start), {}
    for k, (lo, hi) in enumerate(layout.shard_bounds(shards, align_to_parameters=not elementwise)):
        shard = ParameterServerShard(ShardSetup(k, (lo, hi), layout, None, 1, rule, hyper),
                                     owns_process=False)
        shard.load_parameters(start[lo:hi])
        for _ in range(3):
            shard.reduce([gradient[lo:hi]])
            shard.apply(hyper.lr)
        updated[lo:hi] = shard.parameters
        states[k] = shard.state()[1]
    assert np.array_equal(updated[frozen], start[frozen])
    assert np.all(updated[~frozen] != start[~frozen])
    if elementwise:  # the slice-wide state: untouched where frozen
        for k, (lo, hi) in enumerate(layout.shard_bounds(shards)):
            for value in states[k].values():
                assert not np.any(value[frozen[lo:hi]])
    else:  # per-parameter state: none for a frozen parameter
        names = {key.split("/")[0] for state in states.values() for key in state}
        assert names == {slot.name for slot in layout.slots if slot.trainable}


def test_nothing_frozen_leaves_a_shard_one_piece_over_its_whole_slice():
    model = build_model(_spec(FROZEN_MLP.replace(", trainable: false", "")).model, (4,),
                        np.float32, seed=0)
    layout = ParameterLayout.of(model)
    shard = ParameterServerShard(ShardSetup(0, (5, 100), layout, None, 1, "adam",
                                            optim.functional.AdamHyper()), owns_process=False)
    assert [local for _, local, _ in shard.pieces] == [slice(0, 95)]
