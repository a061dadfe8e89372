"""Recurrent layers (RNN, LSTM, GRU and their single-step cells) and backpropagation through time.

Backpropagation through time (BPTT) needs no code of its own: the forward pass unrolls the
recurrence into an ordinary graph of ops (linear, sigmoid, tanh, slices, stack), one copy of
the cell per time step, and the engine's backward sweep runs through it like through any deep
network. Gradients that pass through many steps are multiplied by many Jacobians, which is why
they vanish or explode on long sequences; the LSTM and GRU gates give them an additive path.

Parameters follow torch.nn exactly: `weight_ih_l{k}` (gates * hidden, input), `weight_hh_l{k}`
(gates * hidden, hidden), `bias_ih_l{k}`, `bias_hh_l{k}` (gates * hidden), a `_reverse` suffix
for the backward direction, gate order (i, f, g, o) for the LSTM and (r, z, n) for the GRU, and
the same U(-1/sqrt(hidden), 1/sqrt(hidden)) initialisation, so a torch state_dict loads as is.

For speed the input projection x W_ih^T + b_ih of a layer is one matrix product over the whole
sequence; only the hidden projection h W_hh^T + b_hh runs inside the loop over time.

Truncated BPTT: train on windows of a long sequence and carry the final state of one window
into the next, cut from the graph with `detach_state`, so each backward stops at its window's
start while the forward still sees the whole history:

    state = None
    for window in windows:                     # (window_length, batch, features) each
        output, state = lstm(window, state)
        loss = loss_fn(head(output), targets)
        loss.backward(); optimizer.step(); optimizer.zero_grad()
        state = detach_state(state)            # keep the values, drop the graph behind them
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from worker.backprop import ops
from worker.backprop.nn import functional as F
from worker.backprop.nn import init
from worker.backprop.nn.module import Module, Parameter
from worker.backprop.tensor import DEFAULT_DTYPE, Tensor

State = Tensor | tuple[Tensor, ...]


def detach_state(state: Any) -> Any:
    """The same values cut from the graph: a Tensor, or a (nested) tuple of them (LSTM's (h, c)).

    Truncated BPTT's one line: a backward through the next window stops here.
    """
    if state is None:
        return None
    if isinstance(state, Tensor):
        return state.detach()
    if isinstance(state, (tuple, list)):
        return tuple(detach_state(s) for s in state)
    raise TypeError(f"detach_state: expected a Tensor or a tuple of Tensors, got {type(state)}")


# --- one time step of each cell --------------------------------------------------------------
# `xp` is the input projection x W_ih^T + b_ih, computed before the loop over time.


def _rnn_step(xp: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None,
              nonlinearity: str) -> Tensor:
    # h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)
    pre = xp + ops.linear(h, w_hh, b_hh)
    return ops.tanh(pre) if nonlinearity == "tanh" else ops.relu(pre)


def _lstm_step(xp: Tensor, h: Tensor, c: Tensor, w_hh: Tensor,
               b_hh: Tensor | None) -> tuple[Tensor, Tensor]:
    # i, f, o = sigmoid(.), g = tanh(.);  c' = f c + i g;  h' = o tanh(c')
    gates = xp + ops.linear(h, w_hh, b_hh)
    n = h.shape[-1]
    i = ops.sigmoid(gates[..., :n])
    f = ops.sigmoid(gates[..., n:2 * n])
    g = ops.tanh(gates[..., 2 * n:3 * n])
    o = ops.sigmoid(gates[..., 3 * n:])
    c = f * c + i * g
    return o * ops.tanh(c), c


def _gru_step(xp: Tensor, h: Tensor, w_hh: Tensor, b_hh: Tensor | None) -> Tensor:
    # r, z = sigmoid(.);  n = tanh(W_in x + b_in + r (W_hn h + b_hn));  h' = (1 - z) n + z h
    hp = ops.linear(h, w_hh, b_hh)
    n = h.shape[-1]
    rz = ops.sigmoid(xp[..., :2 * n] + hp[..., :2 * n])
    r, z = rz[..., :n], rz[..., n:]
    candidate = ops.tanh(xp[..., 2 * n:] + r * hp[..., 2 * n:])
    return (1 - z) * candidate + z * h


# Slices taken directly from a (T, ...) tensor up to this length; longer ones are halved first.
_DIRECT_SLICES = 8


def _time_steps(x: Tensor) -> list[Tensor]:
    """[x[0], x[1], ...] for a (T, ...) tensor, cheap to backpropagate for any T.

    A slice's gradient is a zero array of the whole input's shape with the slice filled in, so
    T slices of one (T, ...) tensor would cost O(T^2) in backward; halving first costs
    O(T log T) and gives bitwise the same gradient (the extra terms are exact zeros).
    """
    length = x.shape[0]
    if length <= _DIRECT_SLICES:
        return [x[t] for t in range(length)]
    middle = length // 2
    return _time_steps(x[:middle]) + _time_steps(x[middle:])


# --- multi-layer recurrent modules ---------------------------------------------------------


class _Recurrent(Module):
    """The shared unrolling of RNN, LSTM and GRU over layers, directions and time."""

    _gates = 1  # gate blocks stacked in each weight's first axis
    _state_size = 1  # tensors in the recurrent state: h, or (h, c) for the LSTM

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, dtype: Any = None,
                 rng: np.random.Generator | None = None):
        super().__init__()
        name = type(self).__name__
        if input_size <= 0 or hidden_size <= 0:
            raise ValueError(f"{name}: input_size and hidden_size must be positive, "
                             f"got {input_size} and {hidden_size}")
        if num_layers < 1:
            raise ValueError(f"{name}: num_layers must be at least 1, got {num_layers}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"{name}: dropout must be in [0, 1], got {dropout}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, dropout
        self.bidirectional = bidirectional
        self.rng = rng  # for dropout between layers; None: the engine's generator
        directions = 2 if bidirectional else 1
        dtype = dtype or DEFAULT_DTYPE
        rows = self._gates * hidden_size
        # Registration order is torch's (layer, direction, w_ih, w_hh, b_ih, b_hh), and so is
        # the order in which the generator fills them.
        for layer in range(num_layers):
            layer_input = input_size if layer == 0 else hidden_size * directions
            for direction in range(directions):
                suffix = f"_l{layer}" + ("_reverse" if direction else "")
                setattr(self, "weight_ih" + suffix, Parameter(np.empty((rows, layer_input), dtype)))
                setattr(self, "weight_hh" + suffix, Parameter(np.empty((rows, hidden_size), dtype)))
                if bias:
                    setattr(self, "bias_ih" + suffix, Parameter(np.empty(rows, dtype)))
                    setattr(self, "bias_hh" + suffix, Parameter(np.empty(rows, dtype)))
        bound = 1.0 / math.sqrt(hidden_size)
        for parameter in self.parameters():
            init.uniform_(parameter, -bound, bound, rng)

    # Subclasses define one time step on a state tuple.
    def _step(self, xp: Tensor, state: tuple[Tensor, ...], w_hh: Tensor,
              b_hh: Tensor | None) -> tuple[Tensor, ...]:
        raise NotImplementedError

    def _weights(self, layer: int, direction: int) -> tuple[Tensor, Tensor, Any, Any]:
        suffix = f"_l{layer}" + ("_reverse" if direction else "")
        if self.bias:
            return (getattr(self, "weight_ih" + suffix), getattr(self, "weight_hh" + suffix),
                    getattr(self, "bias_ih" + suffix), getattr(self, "bias_hh" + suffix))
        return getattr(self, "weight_ih" + suffix), getattr(self, "weight_hh" + suffix), None, None

    def forward(self, input: Tensor, hx: Any = None) -> tuple[Tensor, Any]:
        """(output, h_n), or (output, (h_n, c_n)) for the LSTM, as torch.nn returns them.

        input: (T, B, input_size), (B, T, input_size) when batch_first, or unbatched (T, input).
        hx: initial state(s) of shape (num_layers * directions, B, hidden), zeros when None.
        output: the last layer's h at every step, (T, B, directions * hidden) (batch_first:
        (B, T, ...)); h_n, c_n: the final state of every layer and direction.
        """
        x, batched = self._check_input(input)
        if batched and self.batch_first:
            x = x.transpose(1, 0, 2)
        elif not batched:
            x = x.reshape((x.shape[0], 1, x.shape[1]))
        states = self._initial_states(hx, x.shape[1], x.dtype, batched)

        directions = 2 if self.bidirectional else 1
        final: list[tuple[Tensor, ...]] = []
        for layer in range(self.num_layers):
            if layer > 0 and self.dropout > 0 and self.training:
                x = F.dropout(x, self.dropout, True, self.rng)
            outputs = []
            for direction in range(directions):
                w_ih, w_hh, b_ih, b_hh = self._weights(layer, direction)
                steps = _time_steps(ops.linear(x, w_ih, b_ih))  # the input part, all steps
                if direction:
                    steps.reverse()
                state = states[layer * directions + direction]
                hs = []
                for xp in steps:
                    state = self._step(xp, state, w_hh, b_hh)
                    hs.append(state[0])
                if direction:
                    hs.reverse()
                outputs.append(ops.stack(hs))
                final.append(state)
            x = outputs[0] if directions == 1 else ops.concatenate(outputs, axis=-1)

        if not batched:
            x = x.reshape((x.shape[0], x.shape[2]))
        elif self.batch_first:
            x = x.transpose(1, 0, 2)
        finals = tuple(ops.stack([s[k] for s in final]) for k in range(self._state_size))
        if not batched:
            finals = tuple(f.reshape((f.shape[0], f.shape[2])) for f in finals)
        return x, (finals[0] if self._state_size == 1 else finals)

    def _check_input(self, input: Tensor) -> tuple[Tensor, bool]:
        name = type(self).__name__
        if not isinstance(input, Tensor):
            input = Tensor(input)
        if input.ndim not in (2, 3) or input.shape[-1] != self.input_size:
            raise ValueError(
                f"{name}: input must be (seq, batch, {self.input_size}), (batch, seq, "
                f"{self.input_size}) with batch_first, or unbatched (seq, {self.input_size}); "
                f"got shape {input.shape}"
            )
        if input.shape[0] == 0 or (input.ndim == 3 and input.shape[1] == 0):
            raise ValueError(f"{name}: empty input of shape {input.shape}")
        return input, input.ndim == 3

    def _initial_states(self, hx: Any, batch: int, dtype: np.dtype,
                        batched: bool) -> list[tuple[Tensor, ...]]:
        """One state tuple per (layer, direction), each tensor (B, hidden)."""
        name = type(self).__name__
        count = self.num_layers * (2 if self.bidirectional else 1)
        if hx is None:
            zeros = Tensor(np.zeros((batch, self.hidden_size), dtype))
            return [(zeros,) * self._state_size for _ in range(count)]
        parts = (hx,) if isinstance(hx, Tensor) else tuple(hx)
        if len(parts) != self._state_size:
            what = "a tuple (h_0, c_0)" if self._state_size == 2 else "a Tensor h_0"
            raise ValueError(f"{name}: initial state must be {what}, got {len(parts)} item(s)")
        expected = (count, batch, self.hidden_size) if batched else (count, self.hidden_size)
        tensors = []
        for part in parts:
            part = part if isinstance(part, Tensor) else Tensor(part)
            if part.shape != expected:
                raise ValueError(
                    f"{name}: initial state must have shape {expected}, got {part.shape}"
                )
            tensors.append(part if batched else part.reshape((count, 1, self.hidden_size)))
        return [tuple(t[k] for t in tensors) for k in range(count)]

    def extra_repr(self) -> str:
        text = f"{self.input_size}, {self.hidden_size}"
        if self.num_layers != 1:
            text += f", num_layers={self.num_layers}"
        if not self.bias:
            text += ", bias=False"
        if self.batch_first:
            text += ", batch_first=True"
        if self.dropout:
            text += f", dropout={self.dropout}"
        if self.bidirectional:
            text += ", bidirectional=True"
        return text


class RNN(_Recurrent):
    """Elman RNN: h_t = act(x_t W_ih^T + b_ih + h_{t-1} W_hh^T + b_hh), act tanh or relu."""

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 nonlinearity: str = "tanh", bias: bool = True, batch_first: bool = False,
                 dropout: float = 0.0, bidirectional: bool = False, dtype: Any = None,
                 rng: np.random.Generator | None = None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"RNN: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}")
        super().__init__(input_size, hidden_size, num_layers, bias, batch_first, dropout,
                         bidirectional, dtype, rng)
        self.nonlinearity = nonlinearity

    def _step(self, xp, state, w_hh, b_hh):
        return (_rnn_step(xp, state[0], w_hh, b_hh, self.nonlinearity),)

    def extra_repr(self) -> str:
        extra = ", nonlinearity='relu'" if self.nonlinearity == "relu" else ""
        return super().extra_repr() + extra


class LSTM(_Recurrent):
    """Long short-term memory (Hochreiter & Schmidhuber, 1997), torch's gate order i, f, g, o.

    The cell state c is updated additively (c' = f c + i g), so its gradient passes through time
    scaled by the forget gate instead of by a weight matrix: the vanishing-gradient remedy.
    """

    _gates = 4
    _state_size = 2

    def _step(self, xp, state, w_hh, b_hh):
        return _lstm_step(xp, state[0], state[1], w_hh, b_hh)


class GRU(_Recurrent):
    """Gated recurrent unit (Cho et al., 2014), torch's gate order r, z, n and formula
    n = tanh(W_in x + b_in + r * (W_hn h + b_hn)), h' = (1 - z) * n + z * h."""

    _gates = 3

    def _step(self, xp, state, w_hh, b_hh):
        return (_gru_step(xp, state[0], w_hh, b_hh),)


# --- single-step cells -----------------------------------------------------------------------


class _Cell(Module):
    _gates = 1
    _state_size = 1

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, dtype: Any = None,
                 rng: np.random.Generator | None = None):
        super().__init__()
        if input_size <= 0 or hidden_size <= 0:
            raise ValueError(f"{type(self).__name__}: input_size and hidden_size must be "
                             f"positive, got {input_size} and {hidden_size}")
        self.input_size, self.hidden_size, self.bias = input_size, hidden_size, bias
        dtype = dtype or DEFAULT_DTYPE
        rows = self._gates * hidden_size
        self.weight_ih = Parameter(np.empty((rows, input_size), dtype))
        self.weight_hh = Parameter(np.empty((rows, hidden_size), dtype))
        self.bias_ih = Parameter(np.empty(rows, dtype)) if bias else None
        self.bias_hh = Parameter(np.empty(rows, dtype)) if bias else None
        bound = 1.0 / math.sqrt(hidden_size)
        for parameter in self.parameters():
            init.uniform_(parameter, -bound, bound, rng)

    def _prepare(self, input: Tensor, hx: Any) -> tuple[Tensor, tuple[Tensor, ...], bool]:
        """The input projection and the state tuple, with unbatched (features,) input made a
        batch of one."""
        name = type(self).__name__
        if not isinstance(input, Tensor):
            input = Tensor(input)
        if input.ndim not in (1, 2) or input.shape[-1] != self.input_size:
            raise ValueError(f"{name}: input must be (batch, {self.input_size}) or "
                             f"({self.input_size},), got shape {input.shape}")
        batched = input.ndim == 2
        x = input if batched else input.reshape((1, self.input_size))
        size = self._state_size
        if hx is None:
            zeros = Tensor(np.zeros((x.shape[0], self.hidden_size), x.dtype))
            return ops.linear(x, self.weight_ih, self.bias_ih), (zeros,) * size, batched
        parts = (hx,) if isinstance(hx, Tensor) else tuple(hx)
        if len(parts) != size:
            raise ValueError(f"{name}: state must have {size} tensor(s), got {len(parts)}")
        expected = (x.shape[0], self.hidden_size) if batched else (self.hidden_size,)
        state = []
        for part in parts:
            part = part if isinstance(part, Tensor) else Tensor(part)
            if part.shape != expected:
                raise ValueError(f"{name}: state must have shape {expected}, got {part.shape}")
            state.append(part if batched else part.reshape((1, self.hidden_size)))
        return ops.linear(x, self.weight_ih, self.bias_ih), tuple(state), batched

    @staticmethod
    def _unbatch(t: Tensor, batched: bool) -> Tensor:
        return t if batched else t.reshape((t.shape[-1],))

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}" + ("" if self.bias else ", bias=False")


class RNNCell(_Cell):
    """One step of RNN: h' = act(x W_ih^T + b_ih + h W_hh^T + b_hh)."""

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True,
                 nonlinearity: str = "tanh", dtype: Any = None,
                 rng: np.random.Generator | None = None):
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(
                f"RNNCell: nonlinearity must be 'tanh' or 'relu', got {nonlinearity!r}"
            )
        super().__init__(input_size, hidden_size, bias, dtype, rng)
        self.nonlinearity = nonlinearity

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        xp, (h,), batched = self._prepare(input, hx)
        h = _rnn_step(xp, h, self.weight_hh, self.bias_hh, self.nonlinearity)
        return self._unbatch(h, batched)


class LSTMCell(_Cell):
    """One step of LSTM: (h', c') from x and (h, c)."""

    _gates = 4
    _state_size = 2

    def forward(self, input: Tensor, hx: Any = None) -> tuple[Tensor, Tensor]:
        xp, (h, c), batched = self._prepare(input, hx)
        h, c = _lstm_step(xp, h, c, self.weight_hh, self.bias_hh)
        return self._unbatch(h, batched), self._unbatch(c, batched)


class GRUCell(_Cell):
    """One step of GRU: h' from x and h."""

    _gates = 3

    def forward(self, input: Tensor, hx: Tensor | None = None) -> Tensor:
        xp, (h,), batched = self._prepare(input, hx)
        h = _gru_step(xp, h, self.weight_hh, self.bias_hh)
        return self._unbatch(h, batched)
