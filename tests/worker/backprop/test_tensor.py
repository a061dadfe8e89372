"""The Tensor contract: dtypes, graph recording, the backward sweep and its errors.

What a user of `Tensor`, `backward()` and `grad()` may rely on, stated the way PyTorch states
it wherever the engine follows PyTorch.
"""

from __future__ import annotations

import sys
import weakref

import numpy as np
import pytest

from worker.backprop import ops
from worker.backprop.tensor import Tensor, grad, is_grad_enabled, no_grad


def leaf(values, dtype=np.float64) -> Tensor:
    return Tensor(np.asarray(values, dtype=dtype), requires_grad=True)


# --- construction and dtypes -------------------------------------------------------------


@pytest.mark.parametrize("data", [[1.0, 2.0], 1.5, [[1, 2.5]], [0.5]], ids=repr)
def test_python_floats_and_lists_default_to_float32(data):
    assert Tensor(data).dtype == np.float32
    assert Tensor(data, requires_grad=True).dtype == np.float32


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64, np.int32])
def test_an_explicit_dtype_is_honoured(dtype):
    assert Tensor([1, 2], dtype=dtype).dtype == dtype
    assert Tensor(np.ones(2, dtype=np.float64), dtype=dtype).dtype == dtype
    assert Tensor(2.0, dtype=dtype).dtype == dtype


def test_float64_arrays_stay_float64_through_forward_and_backward():
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((4, 3)), requires_grad=True)
    weight = Tensor(rng.standard_normal((5, 3)), requires_grad=True)
    bias = Tensor(rng.standard_normal(5), requires_grad=True)
    assert x.dtype == weight.dtype == bias.dtype == np.float64

    hidden = ops.gelu(ops.linear(x, weight, bias))
    normalized = (hidden - hidden.mean(axis=1, keepdims=True)) / ops.sqrt(
        ops.var(hidden, axis=1, keepdims=True) + 1e-5)
    logits = ops.softmax(normalized * 2.0 + 1, axis=-1).log() + ops.tanh(normalized) ** 2
    loss = ops.cross_entropy(logits, np.array([0, 4, 2, 1]), label_smoothing=0.1)
    for intermediate in (hidden, normalized, logits, loss):
        assert intermediate.dtype == np.float64
    loss.backward()
    assert x.grad.dtype == weight.grad.dtype == bias.grad.dtype == np.float64


def test_float32_tensors_stay_float32_through_forward_and_backward():
    rng = np.random.default_rng(1)
    x = Tensor(rng.standard_normal((4, 3)).tolist(), requires_grad=True)  # a list: float32
    weight = Tensor(rng.standard_normal((2, 3)).astype(np.float32), requires_grad=True)
    loss = (ops.sigmoid(x @ weight.T) * 0.5 + 1.0).mean()
    assert loss.dtype == np.float32
    loss.backward()
    assert x.grad.dtype == weight.grad.dtype == np.float32


def test_requires_grad_on_an_integer_tensor_raises():
    with pytest.raises(TypeError, match="floating"):
        Tensor([1, 2, 3], requires_grad=True)
    with pytest.raises(TypeError, match="int"):
        Tensor(np.arange(3), requires_grad=True)


# --- plain properties ----------------------------------------------------------------------


def test_shape_dtype_transpose_and_item():
    x = Tensor(np.arange(6.0).reshape(2, 3))
    assert x.shape == (2, 3)
    assert x.dtype == np.float64
    assert x.T.shape == (3, 2)
    np.testing.assert_array_equal(x.T.data, x.data.T)
    assert Tensor([[2.5]]).item() == 2.5
    assert isinstance(Tensor(3.0).item(), float)


def test_detach_shares_the_data_but_leaves_the_graph():
    x = leaf([1.0, 2.0])
    y = x * 3.0
    detached = y.detach()
    assert detached.requires_grad is False
    assert detached.is_leaf
    assert np.shares_memory(detached.data, y.data)
    (detached * x).sum().backward()
    np.testing.assert_array_equal(x.grad, [3.0, 6.0])  # y was a constant, not 3x


def test_transpose_gradient_flows_back_through_T():
    x = leaf(np.arange(6.0).reshape(2, 3))
    (x.T * np.arange(6.0).reshape(3, 2)).sum().backward()
    np.testing.assert_array_equal(x.grad, np.arange(6.0).reshape(3, 2).T)


# --- recording --------------------------------------------------------------------------------


def test_no_grad_records_nothing():
    x = leaf([1.0, 2.0])
    with no_grad():
        assert not is_grad_enabled()
        y = ops.tanh(x * 2.0).sum()
    assert is_grad_enabled()
    assert y.requires_grad is False
    assert y.is_leaf
    with pytest.raises(RuntimeError, match="does not require gradients"):
        y.backward()
    assert x.grad is None


def test_no_grad_is_restored_after_an_exception():
    with pytest.raises(ZeroDivisionError), no_grad():
        raise ZeroDivisionError
    assert is_grad_enabled()
    assert (leaf([1.0]) * 2.0).requires_grad


def test_operations_on_constants_only_record_nothing():
    y = Tensor([1.0, 2.0]) * Tensor([3.0, 4.0])
    assert y.requires_grad is False
    assert y.is_leaf


# --- the backward sweep -------------------------------------------------------------------


def test_a_tensor_used_three_times_accumulates_all_three_gradients():
    x = leaf([1.0, -2.0])
    y = x * x * x + x  # x appears four times on three paths: 3x^2 + 1
    y.sum().backward()
    np.testing.assert_allclose(x.grad, 3 * x.data**2 + 1)
    z = leaf([0.5, 4.0])
    (z + z + z).sum().backward()
    np.testing.assert_array_equal(z.grad, [3.0, 3.0])


def test_a_shared_intermediate_sums_the_gradients_of_all_its_consumers():
    x = leaf([0.3, -0.2])
    h = ops.tanh(x)
    loss = (h * 2.0).sum() + (h * h).sum() + ops.exp(h).sum()
    loss.backward()
    dh = 2.0 + 2 * h.data + np.exp(h.data)
    np.testing.assert_allclose(x.grad, dh * (1 - h.data**2), rtol=1e-12)


def test_gradients_accumulate_across_two_backward_calls_like_pytorch():
    x = leaf([1.0, 2.0])
    (x * x).sum().backward()
    (x * 3.0).sum().backward()
    np.testing.assert_array_equal(x.grad, 2 * x.data + 3.0)
    x.zero_grad()
    assert x.grad is None


def test_backward_on_a_non_scalar_without_grad_asks_for_a_grad_argument():
    y = leaf([1.0, 2.0]) * 2.0
    with pytest.raises(RuntimeError, match=r"grad.*argument") as error:
        y.backward()
    assert "(2,)" in str(error.value)


def test_backward_with_an_explicit_grad_is_a_vector_jacobian_product():
    x = leaf([1.0, 2.0, 3.0])
    (x * x).backward(np.array([1.0, 0.0, -1.0]))
    np.testing.assert_array_equal(x.grad, [2.0, 0.0, -6.0])


def test_backward_rejects_a_grad_of_the_wrong_shape():
    y = leaf([1.0, 2.0]) * 2.0
    with pytest.raises(ValueError, match=r"\(3,\).*\(2,\)"):
        y.backward(np.ones(3))


def test_a_second_backward_over_a_freed_graph_raises_and_mentions_retain_graph():
    x = leaf([1.0, 2.0])
    loss = ops.tanh(x * x).sum()
    loss.backward()
    with pytest.raises(RuntimeError, match="retain_graph"):
        loss.backward()


def test_retain_graph_allows_a_second_backward():
    x = leaf([1.0, 2.0])
    loss = ops.tanh(x * x).sum()
    loss.backward(retain_graph=True)
    first = x.grad.copy()
    loss.backward()
    np.testing.assert_allclose(x.grad, 2 * first)


def test_a_graph_5000_nodes_deep_backpropagates_without_recursion_error():
    x = leaf([1.0])
    y = x
    for _ in range(5000):  # an unrolled recurrence, much deeper than the recursion limit
        y = y * 1.0001 + 0.0
    assert 2 * 5000 > sys.getrecursionlimit()
    y.sum().backward()
    np.testing.assert_allclose(x.grad, [1.0001**5000], rtol=1e-12)
    del y  # freeing the chain must not recurse either


def test_grad_of_a_deep_graph_without_recursion_error():
    x = leaf([2.0])
    y = x
    for _ in range(5000):
        y = ops.tanh(y) + y * 0.0 + 1.0
    (g,) = grad(y.sum(), [x])
    assert np.isfinite(g).all()


def test_activations_are_released_during_backward_unless_the_graph_is_retained():
    for retain_graph in (False, True):
        x = leaf([0.1, 0.2])
        hidden = ops.tanh(x)
        released = weakref.ref(hidden)
        loss = (hidden * 2.0).sum()
        del hidden  # only the graph holds the activation now
        assert released() is not None
        loss.backward(retain_graph=retain_graph)
        assert (released() is None) is not retain_graph


def test_grad_of_an_output_that_records_no_graph_raises():
    with pytest.raises(RuntimeError, match="does not require gradients"):
        grad(Tensor([1.0, 2.0]).sum(), [Tensor([1.0])])


# --- gradients are owned by their leaf ----------------------------------------------------


def test_the_two_leaves_of_an_addition_get_gradients_that_are_not_the_same_array():
    a, b = leaf([1.0, 2.0]), leaf([3.0, 4.0])
    (a + b).sum().backward()
    assert a.grad is not b.grad
    assert not np.shares_memory(a.grad, b.grad)
    a.grad *= 10.0  # what an optimizer or gradient clipping does in place
    np.testing.assert_array_equal(b.grad, [1.0, 1.0])


@pytest.mark.parametrize(
    "build",
    [
        lambda x: (x + 0.0).sum(),
        lambda x: x.reshape(3, 2).sum(),
        lambda x: x.T.sum(),
        lambda x: ops.broadcast_to(x, (4, 2, 3)).sum(),
        lambda x: x.mean(),
        lambda x: ops.cast(x, np.float64).sum(),
        lambda x: ops.concatenate([x, x], axis=0).sum(),
    ],
    ids=["add", "reshape", "transpose", "broadcast_to", "mean", "cast", "concatenate"],
)
def test_a_leaf_gradient_is_a_writable_array_of_its_own(build):
    x = leaf(np.ones((2, 3)))
    build(x).backward()
    assert isinstance(x.grad, np.ndarray)
    assert x.grad.flags.writeable
    x.grad *= 2.0  # in place, as optimizers do


def test_a_leaf_gradient_does_not_alias_the_grad_passed_to_backward():
    """PyTorch clones a caller's grad before storing it; scaling x.grad in place must not
    change the caller's array."""
    x = leaf([1.0, 2.0])
    upstream = np.array([1.0, 1.0])
    (x + 0.0).backward(upstream)
    x.grad *= 5.0
    np.testing.assert_array_equal(upstream, [1.0, 1.0])


def test_the_gradient_of_a_zero_dimensional_leaf_is_an_ndarray():
    x = Tensor(3.0, requires_grad=True)
    (x * 2.0).backward()
    assert isinstance(x.grad, np.ndarray)
    assert x.grad.shape == ()
    assert x.grad.dtype == np.float32
    assert x.grad == 2.0


# --- shape errors name the op and both shapes -----------------------------------------------


def _message(call) -> str:
    with pytest.raises(ValueError) as error:
        call()
    return str(error.value)


@pytest.mark.parametrize(
    ("op_name", "call", "shapes"),
    [
        ("matmul", lambda: ops.matmul(leaf(np.ones((2, 3))), leaf(np.ones((4, 5)))),
         [(2, 3), (4, 5)]),
        ("matmul", lambda: ops.matmul(leaf(np.ones((2, 3, 4))), leaf(np.ones((3, 4, 5)))),
         [(2, 3, 4), (3, 4, 5)]),
        ("linear", lambda: ops.linear(leaf(np.ones((2, 3))), leaf(np.ones((4, 5)))),
         [(2, 3), (4, 5)]),
        ("reshape", lambda: leaf(np.ones((2, 3))).reshape(4, 2), [(2, 3), (4, 2)]),
        ("concatenate",
         lambda: ops.concatenate([leaf(np.ones((2, 3))), leaf(np.ones((3, 2)))], axis=1),
         [(2, 3), (3, 2)]),
        ("stack", lambda: ops.stack([leaf(np.ones((2, 3))), leaf(np.ones((3, 2)))]),
         [(2, 3), (3, 2)]),
    ],
    ids=["matmul", "matmul_batch_axes", "linear", "reshape", "concatenate", "stack"],
)
def test_a_shape_mismatch_error_names_the_op_and_both_shapes(op_name, call, shapes):
    message = _message(call)
    assert op_name in message
    for shape in shapes:
        assert str(shape) in message


def test_cross_entropy_with_a_target_out_of_range_names_the_op_and_the_class_count():
    logits = leaf(np.zeros((2, 3)))
    message = _message(lambda: ops.cross_entropy(logits, np.array([0, 3])))
    assert "cross_entropy" in message
    assert "3" in message and "[0, 3)" in message
    message = _message(lambda: ops.cross_entropy(logits, np.array([-1, 0])))
    assert "-1" in message


def test_cross_entropy_with_a_target_of_the_wrong_shape_names_both_shapes():
    message = _message(lambda: ops.cross_entropy(leaf(np.zeros((2, 3))), np.array([0, 1, 2])))
    assert "cross_entropy" in message and "(2,)" in message and "(3,)" in message


# --- grad() and second order ----------------------------------------------------------------


def test_grad_returns_gradients_without_touching_dot_grad():
    x, unused = leaf([1.0, 2.0]), leaf([5.0])
    (gx, gu) = grad((x * x).sum(), [x, unused])
    np.testing.assert_array_equal(gx, [2.0, 4.0])
    np.testing.assert_array_equal(gu, [0.0])
    assert x.grad is None and unused.grad is None


def test_grad_of_an_intermediate_is_the_gradient_reaching_it():
    x = leaf([0.5, -1.0])
    h = x * 3.0
    (gh, gx) = grad((h * h).sum(), [h, x])
    np.testing.assert_allclose(gh, 2 * h.data)
    np.testing.assert_allclose(gx, 2 * h.data * 3.0)


def _f_tanh_squared(x: Tensor, weight: np.ndarray) -> Tensor:
    """f(x) = (sum tanh(W x))^2."""
    return ops.tanh(ops.matmul(Tensor(weight), x)).sum() ** 2


def test_grad_with_create_graph_gives_a_hessian_vector_product_equal_to_finite_differences():
    rng = np.random.default_rng(2)
    weight, x0, v = rng.standard_normal((3, 4)), rng.standard_normal(4), rng.standard_normal(4)

    x = leaf(x0)
    (g,) = grad(_f_tanh_squared(x, weight), [x], create_graph=True)
    assert isinstance(g, Tensor) and g.requires_grad
    (hessian_v,) = grad((g * v).sum(), [x])

    # An explicit Hessian, column by column, from central differences of the exact gradient.
    def exact_gradient(point: np.ndarray) -> np.ndarray:
        p = leaf(point)
        return grad(_f_tanh_squared(p, weight), [p])[0]

    eps = 1e-5
    hessian = np.stack([
        (exact_gradient(x0 + eps * e) - exact_gradient(x0 - eps * e)) / (2 * eps)
        for e in np.eye(4)
    ], axis=1)
    np.testing.assert_allclose(hessian, hessian.T, atol=1e-8)  # a Hessian is symmetric
    np.testing.assert_allclose(hessian_v, hessian @ v, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(g.data, exact_gradient(x0), rtol=1e-12)


def test_backward_with_create_graph_leaves_a_differentiable_gradient():
    x = leaf([1.5, -0.5])
    (x * x * x).sum().backward(create_graph=True)
    assert isinstance(x.grad, Tensor)  # recorded, like PyTorch's grad with a grad_fn
    np.testing.assert_allclose(x.grad.data, 3 * x.data**2)
    (second,) = grad(x.grad.sum(), [x])
    np.testing.assert_allclose(second, 6 * x.data)


# --- post-accumulate-grad hooks (a worker sends a layer's gradient from here) -------------


def test_a_post_accumulate_grad_hook_sees_the_final_gradient_last_layer_first():
    from worker.backprop import nn

    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 4), nn.ReLU(),
                          nn.Linear(4, 3))
    seen: list[tuple[str, np.ndarray]] = []
    for name, parameter in model.named_parameters():
        parameter.register_post_accumulate_grad_hook(
            lambda tensor, name=name: seen.append((name, tensor.grad.copy())))
    model(Tensor(np.random.default_rng(0).standard_normal((2, 6)))).sum().backward()

    # Each parameter once, the layer nearest the loss first: while its hook runs, the
    # layers below it have not been differentiated yet.
    assert [name for name, _ in seen] == ["4.weight", "4.bias", "2.weight", "2.bias",
                                          "0.weight", "0.bias"]
    final = dict(model.named_parameters())
    for name, value in seen:
        np.testing.assert_array_equal(value, final[name].grad)


def test_a_hooked_leaf_used_twice_gets_both_contributions_before_its_hook():
    x = leaf([1.0, 2.0])
    seen = []
    x.register_post_accumulate_grad_hook(lambda tensor: seen.append(tensor.grad.copy()))
    ((x * 3.0) + (x * x)).sum().backward()  # d/dx = 3 + 2x
    assert len(seen) == 1
    np.testing.assert_array_equal(seen[0], [5.0, 7.0])


def test_a_post_accumulate_grad_hook_is_for_leaves_only():
    y = leaf([1.0]) * 2.0
    with pytest.raises(RuntimeError, match="leaf"):
        y.register_post_accumulate_grad_hook(lambda tensor: None)
