"""Recomputation (rematerialisation, PyTorch's "gradient recomputing"): trade compute for
activation memory. Named `recompute` here because a "checkpoint" in chainrule is a job snapshot.

Backward needs the activations of the forward pass, and storing all of them is what fills
memory in deep networks. `recompute(fn, *inputs)` runs `fn` without recording a graph, keeps
only its inputs (and output), and when the backward sweep reaches it runs `fn` again with
recording on and backpropagates through that fresh graph. Each recomputed segment thus costs
one extra forward, and only one segment's activations are alive at a time during backward.

    h = recompute(block, x)                      # block's activations are not stored
    y = recompute_sequential(model, 4, x)        # a Sequential in 4 segments, like torch

Gradients are those of the un-recomputed run: the recompute runs the same NumPy operations on
the same arrays (with the engine's random generator rewound, so dropout draws the same mask).
Parameters used inside `fn` but not passed as inputs (a Module's weights) receive their
gradients from a nested backward over the recomputed graph, as in torch's reentrant
checkpoint; they get them even when no input requires gradients. One consequence, shared with
torch's reentrant variant: `grad()` (gradients returned, not accumulated) over a recomputed
region still accumulates into those parameters' `.grad`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from worker.backprop import ops
from worker.backprop import tensor as _tensor
from worker.backprop.nn import init
from worker.backprop.tensor import Op, Tensor, enable_grad, no_grad


@contextmanager
def _rng_state(state: dict | None) -> Iterator[None]:
    """Run with the engine's generator at `state`, then put it back where it was."""
    if state is None:
        yield
        return
    generator = init.default_generator()
    current = generator.bit_generator.state
    generator.bit_generator.state = state
    try:
        yield
    finally:
        generator.bit_generator.state = current


class _Segment:
    """One recomputed call: what is needed to rerun it, and the input gradients of the last
    rerun, handed out one by one as the sweep asks for each input's gradient."""

    __slots__ = ("fn", "args", "positions", "needs_grad", "rng_state", "pending")

    def __init__(self, fn, args, positions, needs_grad, rng_state):
        self.fn = fn
        self.args = args  # fn's arguments, with None where a tensor input goes
        self.positions = positions  # where in args each tensor input goes (-1: sentinel)
        self.needs_grad = needs_grad  # per tensor input: does its parent require gradients
        self.rng_state = rng_state
        self.pending: dict[int, np.ndarray] = {}

    def call(self, tensors: Sequence[Tensor]) -> Tensor:
        args = list(self.args)
        for position, t in zip(self.positions, tensors):
            if position >= 0:
                args[position] = t
        with _rng_state(self.rng_state):
            out = self.fn(*args)
        if not isinstance(out, Tensor):
            raise TypeError(f"recompute: fn must return a Tensor, got {type(out).__name__}")
        return out

    def recompute_and_backward(self, g: np.ndarray, arrays: Sequence[np.ndarray]) -> None:
        """Rerun fn with recording on, backpropagate g through it, keep the input gradients.

        The nested backward accumulates into the `.grad` of parameters used inside fn; the
        input gradients are returned to the outer sweep through `pending`.
        """
        leaves = [Tensor(a, requires_grad=need) for a, need in zip(arrays, self.needs_grad)]
        with enable_grad():
            out = self.call(leaves)
        if out.requires_grad:
            out.backward(g)
        for index, (leaf, need) in enumerate(zip(leaves, self.needs_grad)):
            if need:
                self.pending[index] = leaf.grad if leaf.grad is not None else np.zeros_like(
                    leaf.data)


def _recompute_forward(arrays: list[np.ndarray], segment: _Segment) -> np.ndarray:
    with no_grad():
        return segment.call([Tensor(a) for a in arrays]).data


def _recompute_vjp(g, ans, arrays, segment: _Segment, index: int = 0):
    # d(fn)/d(input_i) from one recompute shared by all inputs: the sweep asks for the
    # inputs' gradients one after another with the same g, so the first request reruns fn.
    if isinstance(g, Tensor):
        raise NotImplementedError(
            "recompute does not support create_graph=True (second derivatives); "
            "call fn without recompute for higher-order gradients"
        )
    if index not in segment.pending:
        segment.pending.clear()
        segment.recompute_and_backward(g, arrays)
    return segment.pending.pop(index)


RECOMPUTE = Op("recompute", _recompute_forward, (_recompute_vjp,), variadic=True)


def recompute(fn: Callable[..., Tensor], *inputs: Any, preserve_rng_state: bool = True) -> Tensor:
    """fn(*inputs), storing none of fn's intermediate activations for backward.

    `inputs` may mix Tensors and other values; fn must return one Tensor. With
    preserve_rng_state the engine's generator (nn.init.manual_seed) is rewound for the
    recompute, so random ops inside fn (dropout) draw the same values twice.
    """
    if not _tensor.is_grad_enabled():
        return fn(*inputs)
    tensor_positions = [i for i, x in enumerate(inputs) if isinstance(x, Tensor)]
    tensors = [inputs[i] for i in tensor_positions]
    args = [None if isinstance(x, Tensor) else x for x in inputs]
    if not any(t.requires_grad for t in tensors):
        # Parameters inside fn may still need gradients, so the op must be recorded: an empty
        # tensor that requires gradients makes it so (its own gradient is empty and unused).
        tensor_positions.append(-1)
        tensors.append(Tensor(np.zeros(0), requires_grad=True))
    rng_state = init.default_generator().bit_generator.state if preserve_rng_state else None
    segment = _Segment(fn, args, tensor_positions, [t.requires_grad for t in tensors], rng_state)
    return ops.apply(RECOMPUTE, tensors, segment=segment)


def recompute_sequential(modules: Any, segments: int, input: Tensor,
                          preserve_rng_state: bool = True) -> Tensor:
    """Run a Sequential (or a list of callables) in `segments` pieces, recomputing all but the
    last, as torch.utils.checkpoint.checkpoint_sequential does.

    With n layers each recomputed piece has n // segments of them; the last piece, run
    normally, takes the rest (its activations are needed right away by backward anyway).
    """
    layers = list(modules)
    if segments < 1:
        raise ValueError(f"recompute_sequential: segments must be at least 1, got {segments}")
    if segments > len(layers):
        raise ValueError(
            f"recompute_sequential: {segments} segments for only {len(layers)} layers"
        )
    size = len(layers) // segments

    def run(start: int, stop: int) -> Callable[[Tensor], Tensor]:
        def forward(x: Tensor) -> Tensor:
            for layer in layers[start:stop]:
                x = layer(x)
            return x
        return forward

    x, stop = input, 0
    for start in range(0, size * (segments - 1), size):
        stop = start + size
        x = recompute(run(start, stop), x, preserve_rng_state=preserve_rng_state)
    return run(stop, len(layers))(x)
