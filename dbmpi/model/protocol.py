"""What a replica needs of a model: the model protocol, and a base class that implements
everything in it but the model's own math.

A model owns one flat float32 parameter vector `params` and one gradient vector `grad` of
the same length, cut into named tensors (`tensors`: name, shape, offset) in a canonical
order that does not depend on how the run is distributed. The parameter-server shards own
contiguous ranges of that vector, checkpoints store its tensors by name, and a fetch writes
straight into `params`: a model must read its parameters from that vector (views, not
copies) and leave `loss_and_grad`'s gradient in `grad`.

`Network` (the TOML layer lists) implements the protocol, so does the PyTorch adapter
(dbmpi.model.torch_adapter) and so can a user's own class: subclass `FlatModel` and write
`loss_and_grad` and `forward` (and, for your own initialisation, `initial_values`).
Downpour (one partition per replica), Sandblaster and single-replica SGD train any of them
unchanged; only `Network` can be split across partitions (model parallelism).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from dbmpi.runtime.layout import require_memory


@dataclass(frozen=True)
class Tensor:
    """One parameter tensor's place in the canonical vector."""

    name: str  # "<layer>.<tensor>", e.g. "dense0.W", or a torch parameter's name, "conv1.weight"
    layer: int  # the layer it belongs to (Network), or its own index among the tensors
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def tensors_of(shapes) -> list[Tensor]:
    """Tensors laid out one after another in the order given: (name, shape) pairs."""
    out, offset = [], 0
    for index, (name, shape) in enumerate(shapes):
        out.append(Tensor(name, index, tuple(int(d) for d in shape), offset))
        offset += math.prod(shape)
    return out


@runtime_checkable
class Model(Protocol):
    """The model protocol (see the module docstring). Attributes:

    - `name`, `seed`: for summaries and checkpoints; `seed` picks the initial values.
    - `input_shape`: one example's shape as the data file stores it, (H, W, C) or (D,).
    - `n_classes`: outputs (logits) per example; `output_kind`: "softmax" (cross-entropy
      over the classes) or "logistic" (one-vs-all), how the logits become probabilities.
    - `n_params`, `tensors`: the flat vector's length and its named tensors.
    - `partitionable`: whether dbmpi can split it across the ranks of a replica (Network).
    - `allocated`, `params`, `grad`: the two flat float32 vectors, once `allocate()` ran.
    """

    name: str
    seed: int
    input_shape: tuple[int, ...]
    n_classes: int
    output_kind: str
    n_params: int
    tensors: list[Tensor]
    partitionable: bool
    allocated: bool
    params: np.ndarray
    grad: np.ndarray

    def allocate(self, initialise: bool = True) -> Model:
        """Make `params` and `grad` (and, unless told not to, set the initial values); the
        model reads its parameters from `params` from then on. A no-op once done."""

    def initial_values(self, lo: int, hi: int, out: np.ndarray | None = None,
                       seed: int | None = None) -> np.ndarray:
        """The initial values of the canonical range [lo, hi): the same on every rank for
        the same seed (each parameter-server shard draws its own range)."""

    def loss_and_grad(self, x: np.ndarray, labels: np.ndarray) -> float:
        """Mean loss of the minibatch; its gradient is written into `grad` (overwritten,
        not added to)."""

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, n_classes) of a batch, for evaluation (no gradient)."""

    def loss(self, x: np.ndarray, labels: np.ndarray) -> float:
        """Mean loss of a batch, no gradient."""

    def evaluate(self, x: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> tuple[float, float]:
        """(mean loss, accuracy) over a data set, in batches."""

    def predict(self, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """The predicted class of every example (int32)."""

    def memory_bytes(self) -> int:
        """Bytes of `params` and `grad`."""

    def activation_bytes(self, batch: int, training: bool = True) -> int:
        """Bytes of the work buffers of a step (training) or an evaluation of `batch` examples."""

    def summary(self) -> str:
        """A few lines that describe the model (what `dbmpi model` prints)."""


def predict_in_batches(forward, x: np.ndarray, batch_size: int) -> np.ndarray:
    """The argmax class (int32) of `forward`'s logits over `x`, a batch at a time."""
    out = np.empty(len(x), dtype=np.int32)
    for start in range(0, len(x), batch_size):
        out[start:start + batch_size] = forward(x[start:start + batch_size]).argmax(axis=1)
    return out


def evaluate_in_batches(score_batch, x: np.ndarray, labels: np.ndarray, batch_size: int) -> tuple[float, float]:
    """(mean loss, accuracy) over a data set: `score_batch(xb, yb)` gives a batch's (loss
    sum, correct predictions)."""
    n = len(x)
    if n == 0:
        raise ValueError("x: cannot evaluate on an empty set")
    total, correct = 0.0, 0
    for start in range(0, n, batch_size):
        loss_sum, right = score_batch(x[start:start + batch_size], labels[start:start + batch_size])
        total += loss_sum
        correct += right
    return total / n, correct / n


def softmax_cross_entropy(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example cross-entropy of softmax(logits) (float64), for FlatModel.evaluate."""
    z = logits.astype(np.float64)
    z -= z.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(z).sum(axis=1))
    return log_norm - z[np.arange(len(labels)), labels]


class FlatModel:
    """A base for models that are not TOML layer lists: everything in the protocol except
    `loss_and_grad` and `forward`, given `tensors` (tensors_of), `input_shape` and
    `n_classes`. Initial values default to zeros; override `initial_values` (or
    `init_params`) for others, and `bind` to attach views of the flat vectors to your
    model's own structures when they are made."""

    name = "model"
    seed = 0
    output_kind = "softmax"
    partitionable = False

    def __init__(self, tensors: list[Tensor], input_shape, n_classes: int, *, name: str = "model",
                 seed: int = 0):
        self.tensors = list(tensors)
        self.n_params = sum(t.size for t in self.tensors)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.n_classes = int(n_classes)
        self.name, self.seed = name, seed
        self.allocated = False

    # Parameters -------------------------------------------------------------------------
    def allocate(self, initialise: bool = True):
        if self.allocated:
            return self
        require_memory(self.memory_bytes(), f"model: {self.n_params:,} parameters (values and gradient, float32)")
        self.params = np.zeros(self.n_params, np.float32)
        self.grad = np.zeros(self.n_params, np.float32)
        self.bind(self.params, self.grad)
        self.allocated = True
        if initialise:
            self.init_params()
        return self

    def bind(self, params: np.ndarray, grad: np.ndarray) -> None:
        """Called once by allocate with the two flat vectors: attach your views here."""

    def init_params(self, seed: int | None = None) -> None:
        self.initial_values(0, self.n_params, self.params, seed)

    def initial_values(self, lo: int, hi: int, out: np.ndarray | None = None,
                       seed: int | None = None) -> np.ndarray:
        out = np.empty(hi - lo, np.float32) if out is None else out
        out[:] = 0.0
        return out

    @staticmethod
    def view(tensor: Tensor, flat: np.ndarray) -> np.ndarray:
        """The tensor's view (shaped) into a flat vector laid out canonically."""
        return flat[tensor.offset:tensor.offset + tensor.size].reshape(tensor.shape)

    def named_params(self) -> dict[str, np.ndarray]:
        return {t.name: self.view(t, self.params) for t in self.tensors}

    def memory_bytes(self) -> int:
        return 2 * 4 * self.n_params

    def activation_bytes(self, batch: int, training: bool = True) -> int:
        """Unknown in general: the logits only (override for a better figure)."""
        return 4 * batch * self.n_classes * (2 if training else 1)

    # Passes -----------------------------------------------------------------------------
    # The model's own math: what a subclass writes (a structure-only subclass, for planning or
    # describing a model, may leave them out).
    def loss_and_grad(self, x: np.ndarray, labels: np.ndarray) -> float:
        """Mean loss of the minibatch; write (not add) its gradient into `grad`."""
        raise NotImplementedError(f"{type(self).__name__}.loss_and_grad: a FlatModel subclass writes it "
                                  "(docs/API.md)")

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, n_classes) of a batch, no gradient."""
        raise NotImplementedError(f"{type(self).__name__}.forward: a FlatModel subclass writes it (docs/API.md)")

    def loss(self, x: np.ndarray, labels: np.ndarray) -> float:
        return float(softmax_cross_entropy(self.forward(x), np.asarray(labels)).mean())

    def predict(self, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        return predict_in_batches(self.forward, x, batch_size)

    def evaluate(self, x: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> tuple[float, float]:
        return evaluate_in_batches(self._score_batch, x, labels, batch_size)

    def _score_batch(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        labels = np.asarray(labels)
        logits = self.forward(x)
        right = int(np.count_nonzero(logits.argmax(axis=1) == labels))
        return float(softmax_cross_entropy(logits, labels).sum()), right

    # Description ------------------------------------------------------------------------
    def summary(self) -> str:
        rows = [f"model {self.name} ({type(self).__name__}): input {self.input_shape}, {self.n_classes} classes, "
                f"{self.n_params:,} parameters ({self.n_params * 4 / 2**20:.1f} MiB float32) in "
                f"{len(self.tensors)} tensors"]
        rows += [f"  {t.name:<28} {str(t.shape):<20} {t.size:>12,}" for t in self.tensors]
        return "\n".join(rows)


__all__ = ["FlatModel", "Model", "Tensor", "evaluate_in_batches", "predict_in_batches", "softmax_cross_entropy",
           "tensors_of"]
