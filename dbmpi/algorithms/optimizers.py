"""Update rules over flat float32 vectors: SGD, momentum and Adagrad, on the fused kernels.

The same objects serve the single-replica baseline (the whole vector) and, later, each
parameter-server shard (its own slice): state such as Adagrad's accumulators lives with the
vector it updates and never travels.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from dbmpi import kernels

EVERYWHERE = slice(None)


class Optimizer(ABC):
    """Applies `step(params, grad)` in place; `state` holds what a checkpoint must keep.
    `step(params, grad, at)` updates one part of the vector: `params` and `grad` are that
    part, `at` its place in the whole, which selects the state (a shard applies its
    update chunk by chunk: dbmpi.ps.shard)."""

    name = "optimizer"

    def __init__(self, size: int, learning_rate: float):
        self.size = size
        self.learning_rate = learning_rate
        self.state: dict[str, np.ndarray] = {}

    def begin_update(self) -> None:  # noqa: B027 (a hook; SGD, momentum, Adagrad need none)
        """Called once before the parts of one update are stepped (a shard's chunks)."""

    @abstractmethod
    def step(self, params: np.ndarray, grad: np.ndarray, at: slice = EVERYWHERE, scale: float = 1.0) -> None:
        """Update `params` (the part `at` of the vector) in place from `grad`; `scale`
        multiplies this update's learning rate (a shard's staleness-aware step)."""


class SGD(Optimizer):
    """params -= lr * grad."""

    name = "sgd"

    def step(self, params, grad, at=EVERYWHERE, scale=1.0):
        kernels.sgd_step(params, grad, self.learning_rate * scale)


class Momentum(Optimizer):
    """Heavy-ball momentum: v = mu * v + grad; params -= lr * v."""

    name = "momentum"

    def __init__(self, size, learning_rate, momentum=0.9):
        super().__init__(size, learning_rate)
        self.momentum = momentum
        self.state["velocity"] = np.zeros(size, dtype=np.float32)

    def step(self, params, grad, at=EVERYWHERE, scale=1.0):
        kernels.momentum_step(params, grad, self.state["velocity"][at], self.learning_rate * scale, self.momentum)


class Adagrad(Optimizer):
    """Per-parameter rate lr / sqrt(sum of squared gradients), as the paper's shards apply."""

    name = "adagrad"

    def __init__(self, size, learning_rate, eps=1e-8, initial=0.1):
        super().__init__(size, learning_rate)
        self.eps = eps
        self.state["accum"] = np.full(size, initial, dtype=np.float32)

    def step(self, params, grad, at=EVERYWHERE, scale=1.0):
        kernels.adagrad_step(params, grad, self.state["accum"][at], self.learning_rate * scale, self.eps)


def make_optimizer(train: dict, size: int) -> Optimizer:
    """The optimizer a validated [train] table asks for, over a vector of `size` values."""
    kind, lr = train["optimizer"], train["learning_rate"]
    if kind == "sgd":
        return SGD(size, lr)
    if kind == "momentum":
        return Momentum(size, lr, train["momentum"])
    if kind == "adagrad":
        return Adagrad(size, lr, train["adagrad_eps"], train["adagrad_initial"])
    raise ValueError(f"train.optimizer: unknown optimizer {kind!r}")
