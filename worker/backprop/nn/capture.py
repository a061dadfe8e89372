"""Capturing what curvature statistics are made of: a layer's inputs and its output gradients.

K-FAC approximates a layer's Fisher block by two Kronecker factors, one from the layer's inputs
(A = E[a a^T]) and one from the gradients of the loss with respect to its outputs
(G = E[g g^T]). Neither is kept by a normal forward/backward, so a layer that supports
capturing (Linear, Conv2d) asks its `capture` attribute, when one is set, to record each call:

    with capture_layers([model.fc1, model.fc2]) as captures:
        loss = F.cross_entropy(model(x), y)
        loss.backward()
    captures[0].calls()   # [(input array, output-gradient array), ...] for fc1, in call order

The input is the array the forward already holds (no copy); the output gradient is handed over
by a `record_grad` op placed after the layer's output, the identity in both directions. A call
whose output needs no gradient (no_grad, eval) records nothing. Outside a capture, `capture` is
None and the layer pays one attribute test.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import numpy as np

from worker.backprop import ops
from worker.backprop.nn.module import Module
from worker.backprop.tensor import Tensor


class LayerCapture:
    """One layer's calls during a capture: each call's input and its output's gradient."""

    def __init__(self) -> None:
        self.inputs: list[np.ndarray] = []
        self.output_grads: list[np.ndarray | None] = []

    def record(self, x: Tensor, out: Tensor) -> Tensor:
        """Called by the layer's forward: keep x, and route out's gradient back here."""
        if not out.requires_grad:
            return out  # no backward will reach this call
        index = len(self.inputs)
        self.inputs.append(x.data if isinstance(x, Tensor) else np.asarray(x))
        self.output_grads.append(None)
        return ops.record_grad(out, partial(self._receive, index))

    def _receive(self, index: int, g: np.ndarray) -> None:
        # A second backward over a retained graph adds to the first, as .grad does.
        previous = self.output_grads[index]
        self.output_grads[index] = np.array(g) if previous is None else previous + g

    def calls(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(input, output gradient) of every call whose output received a gradient."""
        return [(x, g) for x, g in zip(self.inputs, self.output_grads) if g is not None]

    def clear(self) -> None:
        self.inputs.clear()
        self.output_grads.clear()


@contextmanager
def capture_layers(layers: Sequence[Module]) -> Iterator[list[LayerCapture]]:
    """Record the calls of `layers` (each with a `capture` attribute) until the block ends.

    Yields one LayerCapture per layer, in the given order; they stay readable after the block.
    """
    if len({id(layer) for layer in layers}) != len(layers):
        raise ValueError("capture_layers: a layer is listed more than once")
    captures = []
    for layer in layers:
        if not hasattr(layer, "capture"):
            raise TypeError(f"{type(layer).__name__} does not support capturing statistics")
        if layer.capture is not None:
            raise RuntimeError(f"{type(layer).__name__} is already being captured")
        captures.append(LayerCapture())
    try:
        for layer, capture in zip(layers, captures):
            layer.capture = capture
        yield captures
    finally:
        for layer in layers:
            layer.capture = None
