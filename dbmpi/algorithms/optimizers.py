"""Update rules over flat float32 vectors: SGD, momentum, Nesterov, Adagrad, Adam and AdamW,
on the fused kernels.

The same objects serve the single-replica baseline (the whole vector) and each
parameter-server shard (its own slice): state such as Adagrad's accumulators lives with the
vector it updates and never travels. An update may be applied in chunks: `begin_update()`
once, then `step(part, grad, at)` per chunk; a chunked update equals the whole-vector one.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

from dbmpi import kernels

EVERYWHERE = slice(None)


class Optimizer(ABC):
    """Applies `step(params, grad)` in place; `state` holds the vectors a checkpoint must
    keep, `updates` the updates applied (the one scalar of state: Adam's bias correction).
    `step(params, grad, at, scale)` updates one part of the vector: `params` and `grad` are
    that part, `at` its place in the whole, which selects the state (a shard applies its
    update chunk by chunk: dbmpi.ps.shard); `scale` multiplies the learning rate of this
    update (a staleness-aware shard damps stale ones)."""

    name = "optimizer"

    def __init__(self, size: int, learning_rate: float):
        self.size = size
        self.learning_rate = learning_rate
        self.state: dict[str, np.ndarray] = {}
        self.updates = 0
        self._begun = False

    def begin_update(self) -> None:
        """Called once per update, before its chunks: the update's first `step` counts it."""
        self._begun = True

    def _count(self, at: slice) -> None:
        """Count this update at its first chunk (an update whose every chunk was dropped
        is not counted, as the shard's VERSION does not count it); a whole-vector step
        without begin_update() is one update."""
        if self._begun or at is EVERYWHERE:
            self.updates += 1
            self._begun = False

    @abstractmethod
    def step(self, params: np.ndarray, grad: np.ndarray, at: slice = EVERYWHERE, scale: float = 1.0) -> None:
        """Update `params` (the part `at` of the vector) in place from `grad`."""


class SGD(Optimizer):
    """params -= lr * grad."""

    name = "sgd"

    def step(self, params, grad, at=EVERYWHERE, scale=1.0):
        self._count(at)
        kernels.sgd_step(params, grad, self.learning_rate * scale)


class Momentum(Optimizer):
    """Heavy-ball momentum: v = mu * v + grad; params -= lr * v."""

    name = "momentum"

    def __init__(self, size, learning_rate, momentum=0.9):
        super().__init__(size, learning_rate)
        self.momentum = momentum
        self.state["velocity"] = np.zeros(size, dtype=np.float32)

    def step(self, params, grad, at=EVERYWHERE, scale=1.0):
        self._count(at)
        kernels.momentum_step(params, grad, self.state["velocity"][at], self.learning_rate * scale, self.momentum)


class Nesterov(Momentum):
    """Nesterov momentum (PyTorch's form): v = mu * v + grad; params -= lr * (grad + mu * v)."""

    name = "nesterov"

    def step(self, params, grad, at=EVERYWHERE, scale=1.0):
        self._count(at)
        kernels.nesterov_step(params, grad, self.state["velocity"][at], self.learning_rate * scale, self.momentum)


class Adagrad(Optimizer):
    """Per-parameter rate lr / sqrt(sum of squared gradients), as the paper's shards apply."""

    name = "adagrad"

    def __init__(self, size, learning_rate, eps=1e-8, initial=0.1):
        super().__init__(size, learning_rate)
        self.eps = eps
        self.state["accum"] = np.full(size, initial, dtype=np.float32)

    def step(self, params, grad, at=EVERYWHERE, scale=1.0):
        self._count(at)
        kernels.adagrad_step(params, grad, self.state["accum"][at], self.learning_rate * scale, self.eps)


class Adam(Optimizer):
    """Adam (PyTorch's formulation): moments m, v per parameter; the bias corrections use
    `updates`, the updates applied so far (t), which a checkpoint records per shard."""

    name = "adam"

    def __init__(self, size, learning_rate, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.0):
        super().__init__(size, learning_rate)
        self.beta1, self.beta2, self.eps, self.weight_decay = beta1, beta2, eps, weight_decay
        self.state["m"] = np.zeros(size, dtype=np.float32)
        self.state["v"] = np.zeros(size, dtype=np.float32)

    def step(self, params, grad, at=EVERYWHERE, scale=1.0):
        self._count(at)
        t = max(self.updates, 1)
        lr = self.learning_rate * scale
        step_size = lr / (1.0 - self.beta1 ** t)
        inv_sqrt_bc2 = 1.0 / math.sqrt(1.0 - self.beta2 ** t)
        kernels.adam_step(params, grad, self.state["m"][at], self.state["v"][at], step_size, self.beta1,
                          self.beta2, inv_sqrt_bc2, self.eps, 1.0 - lr * self.weight_decay)


class AdamW(Adam):
    """Adam with decoupled weight decay: params *= 1 - lr * weight_decay before the step."""

    name = "adamw"


def resumed_updates(counts: list[int] | None, slices: list[dict], lo: int, hi: int) -> int:
    """The update count (Adam's t) a shard over [lo, hi) resumes with: `counts` is the
    checkpoint's `optimizer_updates` (one per old shard), `slices` its slice records (shard,
    lo, hi). With the same shards it is the old shard's own count; a range that spans old
    shards takes the smallest count among them (the larger bias correction: smaller steps).
    A checkpoint without counts (format 1, or no optimizer state): 0."""
    if not counts:
        return 0
    overlapping = [counts[s["shard"]] for s in slices if s["lo"] < hi and lo < s["hi"]]
    return int(min(overlapping, default=0))


def resume_state(optimizer: Optimizer, ckpt, lo: int, hi: int) -> bool:
    """Load `optimizer`'s state for canonical range [lo, hi) from an open checkpoint: each
    of its vectors the checkpoint holds (`<name>/<key>`, read over this range only) and, with
    them, its update count (resumed_updates). True if any state was restored (a checkpoint
    of another optimizer, or of parameters only, leaves it fresh)."""
    held = set(ckpt.vectors())
    restored = False
    for key, value in optimizer.state.items():
        if f"{optimizer.name}/{key}" in held:
            ckpt.read_range(f"{optimizer.name}/{key}", lo, hi, out=value)
            restored = True
    if restored:
        optimizer.updates = resumed_updates((ckpt.state or {}).get("optimizer_updates"), ckpt.slices, lo, hi)
    return restored


def make_optimizer(train: dict, size: int) -> Optimizer:
    """The optimizer a validated [train] table asks for, over a vector of `size` values."""
    kind, lr = train["optimizer"], train["learning_rate"]
    if kind == "sgd":
        return SGD(size, lr)
    if kind in ("momentum", "nesterov"):
        return (Momentum if kind == "momentum" else Nesterov)(size, lr, train["momentum"])
    if kind == "adagrad":
        return Adagrad(size, lr, train["adagrad_eps"], train["adagrad_initial"])
    if kind in ("adam", "adamw"):
        decay = train["adamw_weight_decay"] if kind == "adamw" else 0.0
        return (Adam if kind == "adam" else AdamW)(size, lr, train["adam_beta1"], train["adam_beta2"],
                                                   train["adam_eps"], decay)
    raise ValueError(f"train.optimizer: unknown optimizer {kind!r}")
