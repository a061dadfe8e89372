"""End-to-end learning with the engine alone: the losses go down and the tasks are solved."""

import time

import numpy as np
import pytest
from sklearn.datasets import load_digits

from worker.backprop import Tensor, nn, optim
from worker.backprop.nn import functional as F


def train_classifier(model, x, y, *, epochs, batch_size, lr, seed=0):
    rng = np.random.default_rng(seed)
    adam = optim.Adam(model.parameters(), lr=lr)
    for _ in range(epochs):
        model.train()
        order = rng.permutation(len(x))
        for start in range(0, len(x), batch_size):
            batch = order[start:start + batch_size]
            adam.zero_grad()
            F.cross_entropy(model(Tensor(x[batch])), y[batch]).backward()
            adam.step()
    return model


def accuracy(model, x, y) -> float:
    model.eval()
    return float((model(Tensor(x)).data.argmax(axis=1) == y).mean())


def two_spirals(n_per_class: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    t = np.sqrt(rng.uniform(0.05, 1, n_per_class)) * 3 * np.pi
    arm = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / (3 * np.pi)
    x = np.concatenate([arm, -arm]) + rng.normal(0, 0.01, (2 * n_per_class, 2))
    y = np.concatenate([np.zeros(n_per_class), np.ones(n_per_class)]).astype(np.int64)
    return x.astype(np.float32), y


@pytest.mark.slow
def test_mlp_reaches_96_percent_validation_accuracy_on_digits_with_adam_within_a_minute():
    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    split = int(0.8 * len(x))
    train, val = order[:split], order[split:]
    nn.init.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10))
    start = time.perf_counter()
    train_classifier(model, x[train], y[train], epochs=30, batch_size=64, lr=1e-3)
    elapsed = time.perf_counter() - start
    assert accuracy(model, x[val], y[val]) >= 0.96
    assert elapsed < 60


def test_xor_is_learned_by_a_tanh_network():
    x = np.array([[0, 0], [0, 1], [1, 0], [1, 1]], dtype=np.float32)
    y = np.array([0, 1, 1, 0])
    nn.init.manual_seed(1)
    model = nn.Sequential(nn.Linear(2, 8), nn.Tanh(), nn.Linear(8, 2))
    train_classifier(model, x, y, epochs=300, batch_size=4, lr=0.05)
    assert accuracy(model, x, y) == 1.0


def test_two_spirals_are_separated_by_a_relu_network():
    x, y = two_spirals(200)
    nn.init.manual_seed(2)
    model = nn.Sequential(nn.Linear(2, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 2))
    train_classifier(model, x, y, epochs=150, batch_size=40, lr=0.01)
    assert accuracy(model, x, y) >= 0.97


def test_regression_loss_decreases_with_mse_and_sgd_momentum():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((256, 4)).astype(np.float32)
    target = (np.sin(x[:, :1]) + x[:, 1:2] * x[:, 2:3]).astype(np.float32)
    nn.init.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 32), nn.Tanh(), nn.Linear(32, 1))
    sgd = optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(300):
        sgd.zero_grad()
        loss = F.mse_loss(model(Tensor(x)), target)
        loss.backward()
        sgd.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]
