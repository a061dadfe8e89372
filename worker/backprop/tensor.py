"""The Tensor and the reverse-mode sweep: how a graph is recorded and how gradients flow back.

A Tensor wraps an ndarray. Every differentiable operation is an `Op` from the table in `ops.py`;
applying it to tensors that require gradients records a `Node` holding the op, its inputs and
its output array. `Tensor.backward()` walks those nodes once in reverse topological order,
calling each op's vector-Jacobian products (the chain rule, one node at a time) and summing the
contributions of every path into each input ("fan-out accumulates").

Memory: a node drops what it saved as soon as it has sent gradients to its inputs, so
activations are released during the backward sweep, not after it (unless retain_graph=True).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np

DEFAULT_DTYPE = np.float32

# Whether new operations record a graph. A plain module flag, as in micrograd: Ray actors run
# one training step at a time, and a thread-local would cost a lookup on every op.
_grad_enabled = True


@contextmanager
def no_grad() -> Iterator[None]:
    """Run operations without recording a graph (evaluation, optimizer updates)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, False
    try:
        yield
    finally:
        _grad_enabled = previous


@contextmanager
def enable_grad() -> Iterator[None]:
    """Record operations again inside a no_grad region (checkpointing's recompute)."""
    global _grad_enabled
    previous, _grad_enabled = _grad_enabled, True
    try:
        yield
    finally:
        _grad_enabled = previous


def is_grad_enabled() -> bool:
    return _grad_enabled


@dataclass(frozen=True, eq=False)
class Op:
    """One differentiable primitive: a NumPy forward and one VJP per differentiable input.

    `vjps[i](g, ans, *inputs, **params)` returns the gradient for input i given the output's
    gradient `g`. The same rule runs on ndarrays (first order) and on Tensors (create_graph=True,
    for second order), so a rule uses only operators and the dual functions in `ops.py`.
    `broadcasts` marks ops whose inputs may be broadcast: their gradients are summed back to
    each input's shape by `unbroadcast`, the one place where broadcasting is undone.
    `variadic` marks ops taking a list of tensors (concatenate, stack): vjps[0] serves them all
    and receives the input's position as the keyword `index`.
    """

    name: str
    forward: Callable[..., Any]  # an ndarray, or a NumPy scalar from a full reduction (sum)
    vjps: tuple[Callable[..., Any] | None, ...]
    broadcasts: bool = False
    variadic: bool = False


class Node:
    """What backward needs from one recorded operation; emptied once it has been used."""

    __slots__ = ("op", "parents", "inputs", "ans", "params")

    def __init__(self, op: Op, parents, inputs, ans, params):
        self.op = op
        self.parents = parents  # the input Tensors (None for constants)
        self.inputs = inputs  # the input arrays the VJPs read
        self.ans = ans  # the output array
        self.params = params  # non-differentiable keyword arguments (axis, shape, ...)

    def release(self) -> None:
        self.parents = self.inputs = self.ans = None


class Tensor:
    """An ndarray that remembers how it was computed, so gradients can flow back to its inputs.

    >>> x = Tensor([1.0, 2.0], requires_grad=True)
    >>> (x * x).sum().backward()
    >>> x.grad
    array([2., 4.], dtype=float32)
    """

    __slots__ = ("data", "grad", "requires_grad", "_node", "_grad_hooks", "__weakref__")
    __array_priority__ = 1000  # so `ndarray + Tensor` defers to Tensor.__radd__

    def __init__(self, data: Any, requires_grad: bool = False, dtype: Any = None):
        if isinstance(data, Tensor):
            data = data.data
        if dtype is not None:
            array = np.asarray(data, dtype=dtype)
        elif isinstance(data, np.ndarray):
            array = data
        else:
            array = np.asarray(data)
            if array.dtype.kind in "fc" or array.dtype == np.float64:
                array = array.astype(DEFAULT_DTYPE)
        if requires_grad and array.dtype.kind != "f":
            raise TypeError(f"only floating-point tensors can require gradients, got {array.dtype}")
        self.data: np.ndarray = array
        self.grad: np.ndarray | None = None
        self.requires_grad = requires_grad
        self._node: Node | None = None
        self._grad_hooks: list[Callable[[Tensor], None]] | None = None

    # --- plain properties -------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        return self.data.shape

    @property
    def dtype(self) -> np.dtype:
        return self.data.dtype

    @property
    def ndim(self) -> int:
        return self.data.ndim

    @property
    def size(self) -> int:
        return self.data.size

    @property
    def is_leaf(self) -> bool:
        return self._node is None

    def __len__(self) -> int:
        return len(self.data)

    def __repr__(self) -> str:
        suffix = ", requires_grad=True" if self.requires_grad else ""
        return f"Tensor({np.array2string(self.data, precision=4)}{suffix})"

    def numpy(self) -> np.ndarray:
        return self.data

    def item(self) -> float:
        return self.data.item()

    def tolist(self) -> Any:
        return self.data.tolist()

    def detach(self) -> Tensor:
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def astype(self, dtype: Any) -> Tensor:
        from worker.backprop import ops

        return ops.apply(ops.CAST, self, dtype=np.dtype(dtype))

    def requires_grad_(self, flag: bool = True) -> Tensor:
        if not self.is_leaf:
            raise RuntimeError("requires_grad can only be changed on leaf tensors")
        self.requires_grad = flag
        return self

    def zero_grad(self) -> None:
        self.grad = None

    # --- the backward sweep -----------------------------------------------------------------

    def register_post_accumulate_grad_hook(self, hook: Callable[[Tensor], None]) -> None:
        """Call `hook(self)` in every backward sweep once this leaf's `.grad` holds all of the
        sweep's contributions, while the sweep goes on to the tensors it still has to visit
        (as in PyTorch). A data-parallel worker starts sending a layer's gradient from here
        while backward computes the layers below."""
        if self._node is not None:
            raise RuntimeError("post-accumulate-grad hooks are for leaf tensors only")
        if self._grad_hooks is None:
            self._grad_hooks = []
        self._grad_hooks.append(hook)

    def backward(
        self, grad: Any = None, retain_graph: bool = False, create_graph: bool = False
    ) -> None:
        """Accumulate d(self)/d(leaf) into every leaf's `.grad` that requires gradients.

        `grad` is the gradient of some scalar with respect to this tensor; it may be omitted
        only when this tensor holds a single value. With create_graph=True the gradients are
        themselves recorded Tensors, so they can be differentiated again (second order).
        """
        if not self.requires_grad:
            raise RuntimeError("backward() on a tensor that does not require gradients")
        if grad is None:
            if self.data.size != 1:
                raise RuntimeError(
                    f"backward() needs a `grad` argument for a non-scalar tensor of shape "
                    f"{self.shape}; pass the gradient of the final scalar with respect to it"
                )
            grad = np.ones_like(self.data)
        else:
            # A copy: the leaves may keep this array as their .grad and scale it in place.
            grad = np.array(grad.data if isinstance(grad, Tensor) else grad, dtype=self.dtype)
            if grad.shape != self.shape:
                raise ValueError(
                    f"backward(): grad has shape {grad.shape} but the tensor has {self.shape}"
                )
        _backward_sweep(self, grad, retain_graph or create_graph, create_graph)

    # --- operators: thin calls into the op table --------------------------------------------

    def __add__(self, other): return _ops().add(self, other)  # noqa: E704
    def __radd__(self, other): return _ops().add(other, self)  # noqa: E704
    def __sub__(self, other): return _ops().sub(self, other)  # noqa: E704
    def __rsub__(self, other): return _ops().sub(other, self)  # noqa: E704
    def __mul__(self, other): return _ops().mul(self, other)  # noqa: E704
    def __rmul__(self, other): return _ops().mul(other, self)  # noqa: E704
    def __truediv__(self, other): return _ops().div(self, other)  # noqa: E704
    def __rtruediv__(self, other): return _ops().div(other, self)  # noqa: E704
    def __pow__(self, other): return _ops().power(self, other)  # noqa: E704
    def __rpow__(self, other): return _ops().power(other, self)  # noqa: E704
    def __matmul__(self, other): return _ops().matmul(self, other)  # noqa: E704
    def __rmatmul__(self, other): return _ops().matmul(other, self)  # noqa: E704
    def __neg__(self): return _ops().neg(self)  # noqa: E704
    def __abs__(self): return _ops().abs(self)  # noqa: E704
    def __getitem__(self, index): return _ops().getitem(self, index)  # noqa: E704

    # Comparisons give constant boolean tensors (no gradient flows through a comparison).
    def __gt__(self, other): return Tensor(self.data > _data(other))  # noqa: E704
    def __ge__(self, other): return Tensor(self.data >= _data(other))  # noqa: E704
    def __lt__(self, other): return Tensor(self.data < _data(other))  # noqa: E704
    def __le__(self, other): return Tensor(self.data <= _data(other))  # noqa: E704

    __hash__ = object.__hash__  # tensors are graph nodes: identity, not value, equality

    @property
    def T(self) -> Tensor:
        return _ops().transpose(self)

    def transpose(self, *axes: int) -> Tensor:
        return _ops().transpose(self, axes[0] if len(axes) == 1 else (axes or None))

    def reshape(self, *shape: Any) -> Tensor:
        return _ops().reshape(self, shape[0] if len(shape) == 1 else shape)

    def flatten(self, start_dim: int = 0) -> Tensor:
        return _ops().reshape(self, self.shape[:start_dim] + (-1,))

    def sum(self, axis=None, keepdims: bool = False) -> Tensor:
        return _ops().sum(self, axis, keepdims)

    def mean(self, axis=None, keepdims: bool = False) -> Tensor:
        return _ops().mean(self, axis, keepdims)

    def max(self, axis=None, keepdims: bool = False) -> Tensor:
        return _ops().max(self, axis, keepdims)

    def exp(self) -> Tensor: return _ops().exp(self)  # noqa: E704
    def log(self) -> Tensor: return _ops().log(self)  # noqa: E704
    def sqrt(self) -> Tensor: return _ops().sqrt(self)  # noqa: E704
    def tanh(self) -> Tensor: return _ops().tanh(self)  # noqa: E704
    def sigmoid(self) -> Tensor: return _ops().sigmoid(self)  # noqa: E704
    def relu(self) -> Tensor: return _ops().relu(self)  # noqa: E704

    def clip(self, min=None, max=None) -> Tensor:  # noqa: A002 - NumPy's names
        return _ops().clip(self, min, max)


def _data(x: Any) -> Any:
    return x.data if isinstance(x, Tensor) else x


def _ops():
    # ops.py imports this module; the operators look it up lazily to keep the cycle harmless.
    from worker.backprop import ops

    return ops


# --- the sweep ---------------------------------------------------------------------------------


def _topological_order(root: Tensor) -> list[Tensor]:
    """Every tensor the root depends on that requires gradients, inputs before outputs.

    Iterative DFS: an unrolled recurrent network is thousands of nodes deep, deeper than
    Python's recursion limit.
    """
    order: list[Tensor] = []
    visited: set[int] = set()
    stack: list[tuple[Tensor, bool]] = [(root, False)]
    while stack:
        tensor, expanded = stack.pop()
        if expanded:
            order.append(tensor)
            continue
        if id(tensor) in visited:
            continue
        visited.add(id(tensor))
        stack.append((tensor, True))
        node = tensor._node
        if node is None:
            continue
        if node.parents is None:
            raise RuntimeError(
                "backward through a graph that was already freed: a second backward() over the "
                "same operations needs retain_graph=True on the first one"
            )
        for parent in node.parents:
            if parent is not None and parent.requires_grad and id(parent) not in visited:
                stack.append((parent, False))
    return order


def grad(
    output: Tensor,
    inputs: Sequence[Tensor],
    grad_output: Any = None,
    retain_graph: bool = False,
    create_graph: bool = False,
) -> list[Any]:
    """d(output)/d(input) for each input, returned instead of accumulated into `.grad`.

    Like torch.autograd.grad. With create_graph=True the results are Tensors recorded in the
    graph, so `grad(sum(g * v), x)` gives a Hessian-vector product.
    """
    if not output.requires_grad:
        raise RuntimeError("grad(): the output does not require gradients (no graph was recorded)")
    if grad_output is None:
        if output.size != 1:
            raise RuntimeError(f"grad() needs grad_output for an output of shape {output.shape}")
        grad_output = np.ones_like(output.data)
    grad_output = _data(grad_output)
    captured: dict[int, Any] = {id(t): None for t in inputs}
    _backward_sweep(output, grad_output, retain_graph or create_graph, create_graph, captured)
    results = []
    for tensor in inputs:
        value = captured[id(tensor)]
        if value is None:
            value = np.zeros_like(tensor.data)
            value = Tensor(value) if create_graph else value
        results.append(value)
    return results


def _backward_sweep(
    root: Tensor,
    grad: np.ndarray,
    retain_graph: bool,
    create_graph: bool,
    captured: dict[int, Any] | None = None,
) -> None:
    order = _topological_order(root)
    # Hooked leaves are finished as soon as their last contribution is in, rather than when
    # the order reaches them (for an MLP that is after the whole sweep).
    awaited = _hooked_leaf_uses(order) if captured is None else {}
    pending: dict[int, Any] = {id(root): Tensor(grad) if create_graph else grad}
    given_to_leaves: set[int] = set()
    previous, global_grad_enabled = _grad_enabled, create_graph
    _set_grad_enabled(global_grad_enabled)
    try:
        while order:
            tensor = order.pop()  # drop our reference so activations free as we go
            g = pending.pop(id(tensor), None)
            if g is None:
                continue
            node = tensor._node
            if captured is not None:
                if id(tensor) in captured:
                    captured[id(tensor)] = g
                if node is None:
                    continue
            elif node is None:
                _accumulate_into_leaf(tensor, g, given_to_leaves, create_graph)
                continue
            for index, parent in enumerate(node.parents):
                if parent is None or not parent.requires_grad:
                    continue
                parent_grad = _vjp(node, index, g, create_graph)
                key = id(parent)
                if key in pending:
                    # Out of place: the earlier contribution may be an array another input
                    # also holds (add passes g to both sides unchanged).
                    pending[key] = pending[key] + parent_grad
                else:
                    pending[key] = parent_grad
                if key in awaited:
                    awaited[key] -= 1
                    if awaited[key] == 0:  # when the order reaches it, it has nothing pending
                        _accumulate_into_leaf(parent, pending.pop(key), given_to_leaves,
                                              create_graph)
            if not retain_graph:
                node.release()
    finally:
        _set_grad_enabled(previous)


def _hooked_leaf_uses(order: list[Tensor]) -> dict[int, int]:
    """For each leaf with hooks: how many inputs of the sweep's nodes it is."""
    uses: dict[int, int] = {}
    for tensor in order:
        node = tensor._node
        if node is None:
            continue
        for parent in node.parents:
            if (parent is not None and parent._grad_hooks and parent._node is None
                    and parent.requires_grad):
                uses[id(parent)] = uses.get(id(parent), 0) + 1
    return uses


def _set_grad_enabled(flag: bool) -> None:
    global _grad_enabled
    _grad_enabled = flag


def _vjp(node: Node, index: int, g: Any, create_graph: bool) -> Any:
    op = node.op
    rule = op.vjps[0] if op.variadic else op.vjps[index]
    if rule is None:
        raise RuntimeError(f"{op.name} is not differentiable with respect to input {index}")
    params = dict(node.params, index=index) if op.variadic else node.params
    if create_graph:
        # Rules are evaluated on Tensors so the gradient is itself differentiable. The output is
        # recomputed from the input Tensors (not read from the node) so that rules which use the
        # output (tanh: g * (1 - ans**2)) stay connected to the inputs.
        from worker.backprop import ops

        inputs = [p if p is not None else a for p, a in zip(node.parents, node.inputs)]
        if op.variadic:
            inputs = [x if isinstance(x, Tensor) else Tensor(x) for x in inputs]
            result = rule(g, ops.apply(op, inputs, **node.params), inputs, **params)
        else:
            result = rule(g, ops.apply(op, *inputs, **node.params), *inputs, **params)
    elif op.variadic:
        result = rule(g, node.ans, node.inputs, **params)
    else:
        result = rule(g, node.ans, *node.inputs, **params)
    parent = node.parents[index]
    if op.broadcasts and result.shape != parent.shape:
        result = unbroadcast(result, parent.shape)
    if not create_graph and result.dtype != parent.dtype:
        # A gradient has its input's dtype (as in torch), so a float16 branch of a mixed graph
        # is backpropagated in float16 and a float32 model never drifts into float64.
        result = result.astype(parent.dtype)
    return result


def _accumulate_into_leaf(leaf: Tensor, g: Any, given: set[int], create_graph: bool) -> None:
    """The sweep visits a leaf once, after every tensor computed from it: `g` is its whole
    gradient, so its hooks may run now."""
    _add_into_leaf(leaf, g, given, create_graph)
    for hook in leaf._grad_hooks or ():
        hook(leaf)


def _add_into_leaf(leaf: Tensor, g: Any, given: set[int], create_graph: bool) -> None:
    if create_graph:
        leaf.grad = g if leaf.grad is None else leaf.grad + g
        return
    if not isinstance(g, np.ndarray):  # arithmetic on 0-d arrays returns NumPy scalars
        g = np.array(g)
    if g.dtype != leaf.dtype:
        g = g.astype(leaf.dtype)
    if leaf.grad is None:
        # A leaf must own its gradient: optimizers and clipping scale grads in place, so a view
        # of another array, or an array already given to another leaf, is copied.
        if g.base is not None or not g.flags.writeable or id(g) in given:
            g = g.copy()
        given.add(id(g))
        leaf.grad = g
    else:
        leaf.grad = np.asarray(leaf.grad + g)


def unbroadcast(grad: Any, shape: Sequence[int]) -> Any:
    """Sum `grad` down to `shape`, undoing NumPy broadcasting (the one place this is done)."""
    extra = grad.ndim - len(shape)
    axes = tuple(range(extra)) + tuple(
        extra + i for i, n in enumerate(shape) if n == 1 and grad.shape[extra + i] != 1
    )
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    if extra or grad.shape != tuple(shape):
        grad = grad.reshape(shape)
    return grad
