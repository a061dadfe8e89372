"""RNN, LSTM, GRU and their cells: torch.nn's numbers, BPTT gradients, truncated BPTT."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from worker.backprop import ops
from worker.backprop.gradcheck import gradcheck
from worker.backprop.nn.layers import Linear
from worker.backprop.nn.recurrent import (
    GRU,
    LSTM,
    RNN,
    GRUCell,
    LSTMCell,
    RNNCell,
    detach_state,
)
from worker.backprop.optim import Adam
from worker.backprop.tensor import Tensor

RTOL, ATOL = 1e-10, 1e-12
SEQ, BATCH, INPUT, HIDDEN = 6, 3, 4, 5

# (our class, torch class, extra constructor arguments)
KINDS = {
    "rnn_tanh": (RNN, torch.nn.RNN, {"nonlinearity": "tanh"}),
    "rnn_relu": (RNN, torch.nn.RNN, {"nonlinearity": "relu"}),
    "lstm": (LSTM, torch.nn.LSTM, {}),
    "gru": (GRU, torch.nn.GRU, {}),
}


def close(ours, theirs) -> None:
    np.testing.assert_allclose(np.asarray(ours), theirs.detach().numpy(), rtol=RTOL, atol=ATOL)


def twin_modules(kind: str, **kwargs):
    """A torch module in float64 and ours with its weights."""
    ours_cls, torch_cls, extra = KINDS[kind]
    torch.manual_seed(0)
    theirs = torch_cls(INPUT, HIDDEN, **extra, **kwargs).double()
    ours = ours_cls(INPUT, HIDDEN, **extra, **kwargs, dtype=np.float64)
    ours.load_state_dict(theirs.state_dict())
    return ours, theirs


def run_and_compare(kind, num_layers, batch_first, with_state, bidirectional=False, bias=True):
    ours, theirs = twin_modules(kind, num_layers=num_layers, batch_first=batch_first,
                                bidirectional=bidirectional, bias=bias)
    rng = np.random.default_rng(1)
    directions = 2 if bidirectional else 1
    x = rng.standard_normal((BATCH, SEQ, INPUT) if batch_first else (SEQ, BATCH, INPUT))
    state_shape = (num_layers * directions, BATCH, HIDDEN)
    states = [rng.standard_normal(state_shape) for _ in range(2 if kind == "lstm" else 1)]

    x_ours, x_theirs = Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    s_ours = [Tensor(s, requires_grad=True) for s in states]
    s_theirs = [torch.tensor(s, requires_grad=True) for s in states]
    hx_ours = hx_theirs = None
    if with_state:
        hx_ours = tuple(s_ours) if kind == "lstm" else s_ours[0]
        hx_theirs = tuple(s_theirs) if kind == "lstm" else s_theirs[0]

    out_ours, final_ours = ours(x_ours, hx_ours)
    out_theirs, final_theirs = theirs(x_theirs, hx_theirs)
    finals_ours = final_ours if kind == "lstm" else (final_ours,)
    finals_theirs = final_theirs if kind == "lstm" else (final_theirs,)

    close(out_ours.data, out_theirs)
    for f_ours, f_theirs in zip(finals_ours, finals_theirs):
        close(f_ours.data, f_theirs)

    # A loss that reads every output and every final state, with distinct weights, so a
    # gradient routed to the wrong step, layer or gate cannot cancel out.
    weights = [rng.standard_normal(out_ours.shape)] + [
        rng.standard_normal(f.shape) for f in finals_ours
    ]
    loss_ours = sum((t * w).sum() for t, w in zip([out_ours, *finals_ours], weights))
    loss_theirs = sum((t * torch.tensor(w)).sum()
                      for t, w in zip([out_theirs, *finals_theirs], weights))
    loss_ours.backward()
    loss_theirs.backward()

    close(x_ours.grad, x_theirs.grad)
    if with_state:
        for a, b in zip(s_ours, s_theirs):
            close(a.grad, b.grad)
    named_theirs = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        close(p.grad, named_theirs[name].grad)


# --- torch.nn equivalence ---------------------------------------------------------------------


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "given_state"])
@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("num_layers", [1, 2])
@pytest.mark.parametrize("kind", list(KINDS))
def test_outputs_final_states_and_every_gradient_equal_torch(kind, num_layers, batch_first,
                                                              with_state):
    run_and_compare(kind, num_layers, batch_first, with_state)


@pytest.mark.parametrize("batch_first", [False, True], ids=["seq_first", "batch_first"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_bidirectional_two_layer_equals_torch(kind, batch_first):
    run_and_compare(kind, num_layers=2, batch_first=batch_first, with_state=True,
                    bidirectional=True)


@pytest.mark.parametrize("kind", list(KINDS))
def test_without_bias_equals_torch(kind):
    run_and_compare(kind, num_layers=2, batch_first=False, with_state=True, bias=False)


@pytest.mark.parametrize("kind", list(KINDS))
def test_unbatched_sequence_equals_torch(kind):
    ours, theirs = twin_modules(kind, num_layers=2)
    x = np.random.default_rng(2).standard_normal((SEQ, INPUT))
    out_ours, final_ours = ours(Tensor(x))
    out_theirs, final_theirs = theirs(torch.tensor(x))
    assert out_ours.shape == (SEQ, HIDDEN)
    close(out_ours.data, out_theirs)
    h_ours = final_ours[0] if kind == "lstm" else final_ours
    h_theirs = final_theirs[0] if kind == "lstm" else final_theirs
    assert h_ours.shape == (2, HIDDEN)
    close(h_ours.data, h_theirs)


@pytest.mark.parametrize("kind", list(KINDS))
def test_parameter_names_shapes_and_order_equal_torch(kind):
    ours_cls, torch_cls, extra = KINDS[kind]
    ours = ours_cls(INPUT, HIDDEN, num_layers=3, bidirectional=True, **extra)
    theirs = torch_cls(INPUT, HIDDEN, num_layers=3, bidirectional=True, **extra)
    assert [(k, v.shape) for k, v in ours.state_dict().items()] == [
        (k, tuple(v.shape)) for k, v in theirs.state_dict().items()
    ]


@pytest.mark.parametrize("kind", list(KINDS))
def test_initialisation_is_uniform_within_one_over_sqrt_hidden(kind):
    ours_cls, _, extra = KINDS[kind]
    hidden = 64
    module = ours_cls(8, hidden, num_layers=2, **extra, rng=np.random.default_rng(0))
    bound = 1 / math.sqrt(hidden)
    values = np.concatenate([p.data.ravel() for p in module.parameters()])
    assert values.dtype == np.float32
    assert np.abs(values).max() <= bound
    # U(-b, b) has standard deviation b / sqrt(3).
    assert abs(values.std() - bound / math.sqrt(3)) < 0.02 * bound


def test_dropout_between_layers_acts_in_training_only():
    x = Tensor(np.random.default_rng(14).standard_normal((SEQ, BATCH, INPUT)))
    plain = LSTM(INPUT, HIDDEN, num_layers=2, rng=np.random.default_rng(15))
    dropped = LSTM(INPUT, HIDDEN, num_layers=2, dropout=0.5, rng=np.random.default_rng(15))
    expected = plain(x)[0].data
    np.testing.assert_array_equal(dropped.eval()(x)[0].data, expected)
    assert not np.allclose(dropped.train()(x)[0].data, expected)


# --- cells -------------------------------------------------------------------------------------

CELLS = {
    "rnn_tanh": (RNNCell, torch.nn.RNNCell, {"nonlinearity": "tanh"}),
    "rnn_relu": (RNNCell, torch.nn.RNNCell, {"nonlinearity": "relu"}),
    "lstm": (LSTMCell, torch.nn.LSTMCell, {}),
    "gru": (GRUCell, torch.nn.GRUCell, {}),
}


@pytest.mark.parametrize("with_state", [False, True], ids=["zero_state", "given_state"])
@pytest.mark.parametrize("kind", list(CELLS))
def test_cell_step_and_gradients_equal_torch(kind, with_state):
    ours_cls, torch_cls, extra = CELLS[kind]
    torch.manual_seed(0)
    theirs = torch_cls(INPUT, HIDDEN, **extra).double()
    ours = ours_cls(INPUT, HIDDEN, **extra, dtype=np.float64)
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    rng = np.random.default_rng(3)
    x = rng.standard_normal((BATCH, INPUT))
    states = [rng.standard_normal((BATCH, HIDDEN)) for _ in range(2 if kind == "lstm" else 1)]
    x_ours, x_theirs = Tensor(x, requires_grad=True), torch.tensor(x, requires_grad=True)
    s_ours = [Tensor(s, requires_grad=True) for s in states]
    s_theirs = [torch.tensor(s, requires_grad=True) for s in states]
    hx_ours = hx_theirs = None
    if with_state:
        hx_ours = tuple(s_ours) if kind == "lstm" else s_ours[0]
        hx_theirs = tuple(s_theirs) if kind == "lstm" else s_theirs[0]
    out_ours = ours(x_ours, hx_ours)
    out_theirs = theirs(x_theirs, hx_theirs)
    outs_ours = out_ours if kind == "lstm" else (out_ours,)
    outs_theirs = out_theirs if kind == "lstm" else (out_theirs,)
    weights = [rng.standard_normal((BATCH, HIDDEN)) for _ in outs_ours]
    sum((o * w).sum() for o, w in zip(outs_ours, weights)).backward()
    sum((o * torch.tensor(w)).sum() for o, w in zip(outs_theirs, weights)).backward()
    for a, b in zip(outs_ours, outs_theirs):
        close(a.data, b)
    close(x_ours.grad, x_theirs.grad)
    if with_state:
        for a, b in zip(s_ours, s_theirs):
            close(a.grad, b.grad)
    named_theirs = dict(theirs.named_parameters())
    for name, p in ours.named_parameters():
        close(p.grad, named_theirs[name].grad)


def test_cell_accepts_unbatched_input():
    cell = LSTMCell(INPUT, HIDDEN)
    h, c = cell(Tensor(np.ones(INPUT, np.float32)))
    assert h.shape == c.shape == (HIDDEN,)


def test_unrolled_cell_equals_the_multi_step_module():
    torch.manual_seed(0)
    module = GRU(INPUT, HIDDEN, dtype=np.float64)
    cell = GRUCell(INPUT, HIDDEN, dtype=np.float64)
    cell.load_state_dict({k[:-3]: v for k, v in module.state_dict().items()})  # drop "_l0"
    x = Tensor(np.random.default_rng(4).standard_normal((SEQ, BATCH, INPUT)))
    output, h_n = module(x)
    h = None
    for t in range(SEQ):
        h = cell(x[t], h)
        np.testing.assert_array_equal(h.data, output.data[t])
    np.testing.assert_array_equal(h.data, h_n.data[0])


# --- backpropagation through time ----------------------------------------------------------


def test_lstm_gradients_pass_gradcheck():
    module = LSTM(2, 3, num_layers=2, dtype=np.float64, rng=np.random.default_rng(5))
    rng = np.random.default_rng(6)
    x = Tensor(rng.standard_normal((4, 2, 2)), requires_grad=True)
    h0 = Tensor(rng.standard_normal((2, 2, 3)), requires_grad=True)
    c0 = Tensor(rng.standard_normal((2, 2, 3)), requires_grad=True)
    params = list(module.parameters())

    def run(x, h0, c0, *weights):  # the weights are the module's own tensors, perturbed in place
        output, (h_n, c_n) = module(x, (h0, c0))
        return ops.concatenate([output.reshape(-1), h_n.reshape(-1), c_n.reshape(-1)])

    gradcheck(run, [x, h0, c0, *params], rtol=1e-6, atol=1e-9)


def test_long_sequence_backward_reaches_the_first_step():
    module = RNN(1, 4, dtype=np.float64, rng=np.random.default_rng(7))
    x = Tensor(np.random.default_rng(8).standard_normal((300, 2, 1)), requires_grad=True)
    output, _ = module(x)
    output[-1].sum().backward()
    assert x.grad.shape == x.shape
    assert np.all(x.grad[0] != 0)  # 300 steps deep, one graph (no recursion limit)


def test_detach_state_cuts_the_graph_at_the_window_boundary():
    module = LSTM(INPUT, HIDDEN, dtype=np.float64, rng=np.random.default_rng(9))
    rng = np.random.default_rng(10)
    first = Tensor(rng.standard_normal((SEQ, BATCH, INPUT)), requires_grad=True)
    second = Tensor(rng.standard_normal((SEQ, BATCH, INPUT)), requires_grad=True)

    _, state = module(first)
    carried = detach_state(state)
    assert isinstance(carried, tuple) and not any(s.requires_grad for s in carried)
    output, _ = module(second, carried)
    output.sum().backward()
    assert first.grad is None  # backward stopped at the boundary
    assert second.grad is not None
    truncated = {name: p.grad.copy() for name, p in module.named_parameters()}

    # The same gradient as a fresh run of the second window from the carried values.
    module.zero_grad()
    start = tuple(Tensor(s.data.copy()) for s in carried)
    module(second, start)[0].sum().backward()
    for name, p in module.named_parameters():
        np.testing.assert_array_equal(p.grad, truncated[name])

    # Without the detach the gradient does reach the first window.
    module.zero_grad()
    _, state = module(first)
    module(second, state)[0].sum().backward()
    assert first.grad is not None and np.abs(first.grad).max() > 0


def test_detach_state_accepts_a_tensor_a_tuple_and_none():
    h = Tensor(np.ones(3), requires_grad=True) * 2
    assert not detach_state(h).requires_grad
    assert detach_state(None) is None
    with pytest.raises(TypeError):
        detach_state("h")


def train_on_windows(carry_state: bool) -> list[float]:
    """Fit y_t = x_t + x_{t-1} + x_{t-2} over a stream of random bits with an LSTM, on windows
    of 5 steps; the state is either carried (detached) across windows or reset to zero."""
    rng = np.random.default_rng(11)
    batch, window, windows, hidden = 16, 5, 240, 16
    bits = rng.integers(0, 2, (window * windows + 2, batch)).astype(np.float32)
    target = bits[2:] + bits[1:-1] + bits[:-2]
    stream = bits[2:, :, None]

    lstm = LSTM(1, hidden, rng=np.random.default_rng(12))
    head = Linear(hidden, 1, rng=np.random.default_rng(13))
    optimizer = Adam(list(lstm.parameters()) + list(head.parameters()), lr=0.02)
    state = None
    losses = []
    for w in range(windows):
        steps = slice(w * window, (w + 1) * window)
        output, state = lstm(Tensor(stream[steps]), state if carry_state else None)
        error = head(output).reshape((window, batch)) - target[steps]
        loss = (error * error).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        state = detach_state(state)
        losses.append(loss.item())
    return losses


def test_windowed_training_with_carried_state_learns_a_sum_spanning_windows():
    losses = train_on_windows(carry_state=True)
    # Predicting the mean scores the target's variance, 0.75.
    assert np.mean(losses[:10]) > 0.4
    # Below what any model blind to earlier windows can reach (next test): the carried state
    # supplies the inputs that the first two targets of each window need.
    assert np.mean(losses[-20:]) < 0.05


def test_windowed_training_with_reset_state_cannot_see_across_windows():
    losses = train_on_windows(carry_state=False)
    # Step 0 of a window misses two bits (variance 0.5), step 1 one bit (0.25): the best
    # possible mean squared error over 5 steps is (0.5 + 0.25) / 5 = 0.15.
    assert np.mean(losses[-20:]) > 0.1


# --- errors -------------------------------------------------------------------------------


def test_wrong_input_size_is_a_clear_error():
    with pytest.raises(ValueError, match="input must be"):
        LSTM(INPUT, HIDDEN)(Tensor(np.zeros((SEQ, BATCH, INPUT + 1), np.float32)))


def test_wrong_initial_state_shape_is_a_clear_error():
    module = GRU(INPUT, HIDDEN, num_layers=2)
    with pytest.raises(ValueError, match=r"initial state must have shape \(2, 3, 5\)"):
        module(Tensor(np.zeros((SEQ, BATCH, INPUT), np.float32)),
               Tensor(np.zeros((1, BATCH, HIDDEN), np.float32)))


def test_lstm_needs_both_h0_and_c0():
    module = LSTM(INPUT, HIDDEN)
    with pytest.raises(ValueError, match=r"\(h_0, c_0\)"):
        module(Tensor(np.zeros((SEQ, BATCH, INPUT), np.float32)),
               Tensor(np.zeros((1, BATCH, HIDDEN), np.float32)))


def test_unknown_nonlinearity_is_rejected():
    with pytest.raises(ValueError, match="nonlinearity"):
        RNN(INPUT, HIDDEN, nonlinearity="sigmoid")
