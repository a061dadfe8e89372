"""The reference article's worked example, number for number.

From ../shared/reference/backpropagation-article.txt, "Example: numeric walk-through (small
network)":

    x = [1.0] (scalar) W1 = [[0.5], [-0.3]] (2x1) b1 = [0.0, 0.0] φ = tanh
    W2 = [0.4, -0.2] (1x2) b2 = 0.0 Loss = 0.5*(ŷ - y)^2 with y = 0.0

    Forward: z1 = W1x + b1 = [0.5, -0.3] a1 = tanh(z1) ≈ [0.4621, -0.2913]
    ŷ = W2·a1 + b2 ... ≈ 0.1848 + 0.0583 = 0.2431 Loss = 0.5(0.2431)^2 ≈ 0.0296

    Backward: dLoss/dŷ = ŷ - y = 0.2431 For output layer (no activation): δ2 = 0.2431
    Grad W2 = δ2 * a1 ... ≈ [0.1123, -0.0708]
    dL/da1 = W2^T * δ2 = [0.4, -0.2]0.2431 = [0.0972, -0.0486]
    δ1 = dL/da1 ∘ φ'(z1), where φ'(z) = 1 - tanh^2(z)
    φ'(z1) ≈ [1 - 0.4621^2, 1 - (-0.2913)^2] = [0.7863, 0.9152]
    δ1 ≈ [0.0972*0.7863, -0.0486*0.9152] = [0.0764, -0.0445]
    Grad W1 = δ1 * x = δ1 (since x=1.0) → [0.0764, -0.0445]

Every quoted number is checked within 1e-4 of the engine's, except φ'(z1)[0]: the article
rounds 1 - 0.4621^2 = 0.78646 down to 0.7863, so that one is held to 2e-4. Intermediate
quantities (δ2, dL/da1, δ1, φ'(z1)) are observed with `grad()` on the intermediate tensors.
"""

from __future__ import annotations

import numpy as np
import pytest

from worker.backprop import ops
from worker.backprop.tensor import Tensor, grad

ARTICLE_TOLERANCE = 1e-4


class ArticleNetwork:
    """The article's 1-2-1 network, its forward pass kept open for inspection."""

    def __init__(self, dtype):
        def parameter(values):
            return Tensor(np.asarray(values, dtype=dtype), requires_grad=True)

        self.x = Tensor(np.asarray([[1.0]], dtype=dtype))  # one sample, one feature
        self.y = 0.0
        self.w1, self.b1 = parameter([[0.5], [-0.3]]), parameter([0.0, 0.0])
        self.w2, self.b2 = parameter([[0.4, -0.2]]), parameter([0.0])
        self.z1 = ops.linear(self.x, self.w1, self.b1)
        self.a1 = ops.tanh(self.z1)
        self.y_hat = ops.linear(self.a1, self.w2, self.b2)
        self.loss = 0.5 * ((self.y_hat - self.y) ** 2).sum()


@pytest.fixture(params=[np.float64, np.float32], ids=["float64", "float32"])
def net(request) -> ArticleNetwork:
    return ArticleNetwork(request.param)


def close(actual, expected, tolerance=ARTICLE_TOLERANCE):
    np.testing.assert_allclose(np.ravel(actual), np.ravel(expected), rtol=0, atol=tolerance)


def test_forward_pass_matches_the_article(net):
    close(net.z1.data, [0.5, -0.3])
    close(net.a1.data, [0.4621, -0.2913])
    close(net.y_hat.data, 0.2431)
    close(net.loss.data, 0.0296)


def test_parameter_gradients_match_the_article(net):
    net.loss.backward()
    close(net.w2.grad, [0.1123, -0.0708])  # δ2 a1
    close(net.w1.grad, [[0.0764], [-0.0445]])  # δ1 x, with x = 1
    close(net.b2.grad, 0.2431)  # a bias's gradient is its layer's δ
    close(net.b1.grad, [0.0764, -0.0445])


def test_intermediate_gradients_match_the_article(net):
    delta2, d_a1, delta1 = grad(net.loss, [net.y_hat, net.a1, net.z1], retain_graph=True)
    close(delta2, 0.2431)  # dLoss/dŷ = ŷ - y
    close(d_a1, [0.0972, -0.0486])  # W2^T δ2
    close(delta1, [0.0764, -0.0445])  # dL/da1 ∘ φ'(z1)


def test_tanh_derivative_at_the_hidden_preactivations_matches_the_article(net):
    # tanh acts elementwise, so d(sum a1)/dz1 is the diagonal of its Jacobian: φ'(z1).
    (phi_prime,) = grad(net.a1.sum(), [net.z1])
    close(phi_prime, [0.7863, 0.9152], tolerance=2e-4)
    close(phi_prime, 1 - net.a1.data**2, tolerance=1e-6)


def test_the_backward_pass_is_the_articles_chain_rule_in_full_precision():
    """The same recurrences in float64 NumPy, without rounding: the engine agrees to 1e-12."""
    net = ArticleNetwork(np.float64)
    net.loss.backward()
    z1 = np.array([0.5, -0.3])
    a1 = np.tanh(z1)
    delta2 = 0.4 * a1[0] - 0.2 * a1[1]
    delta1 = np.array([0.4, -0.2]) * delta2 * (1 - a1**2)
    np.testing.assert_allclose(net.w2.grad.ravel(), delta2 * a1, rtol=1e-12)
    np.testing.assert_allclose(net.w1.grad.ravel(), delta1, rtol=1e-12)
