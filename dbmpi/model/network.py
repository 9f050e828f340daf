"""A Network: layers from a config, over one canonical flat float32 parameter vector.

The canonical vector concatenates every layer's tensors in layer order (W then b), each
stored output-unit-major. It does not depend on how the run is distributed, which is what
lets parameter-server shards own plain contiguous ranges of it and checkpoints store
logical tensors. Layers hold views into it, so updating the vector in place updates the
model; it is never reallocated.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dbmpi import config as configuration
from dbmpi.config import ConfigError
from dbmpi.model.layers import LAYER_TYPES, Layer, Output
from dbmpi.runtime.layout import require_memory


@dataclass(frozen=True)
class Tensor:
    """One parameter tensor's place in the canonical vector."""

    name: str  # "<layer>.<tensor>", e.g. "dense0.W"
    layer: int
    shape: tuple[int, ...]
    offset: int

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _normalise_input_shape(input_shape) -> tuple[int, ...]:
    shape = tuple(input_shape)
    return shape + (1,) if len(shape) == 2 else shape


class Network:
    """Layers, their parameters in one flat vector, and minibatch loss/gradient/prediction."""

    def __init__(self, model: dict, allocate: bool = True):
        """Build from a validated [model] table (see dbmpi.config). Without `allocate`, only
        the structure (layers, tensors, sizes), to describe or plan a model of any size."""
        self.config = model
        self.name = model.get("name", "model")
        self.seed = model.get("seed", 0)
        self.input_shape = _normalise_input_shape(model["input_shape"])
        self.layers: list[Layer] = []
        shape = self.input_shape
        for i, spec in enumerate(model["layers"]):
            layer = LAYER_TYPES[spec["type"]](spec, shape, f"model.layers[{i}]")
            self.layers.append(layer)
            shape = layer.output_shape
        self.output: Output = self.layers[-1]
        self.n_classes = self.output.units

        self.tensors: list[Tensor] = []
        offset = 0
        for index, layer in enumerate(self.layers):
            for tname, tshape in layer.tensors():
                self.tensors.append(Tensor(f"{layer.name}.{tname}", index, tuple(tshape), offset))
                offset += math.prod(tshape)
        self.n_params = offset
        if allocate:
            self._allocate()

    def _allocate(self) -> None:
        """The parameter and gradient vectors, bound to the layers and initialised; refused
        in one line when they cannot fit in this machine's memory."""
        require_memory(self.memory_bytes(), f"model: {self.n_params:,} parameters (values and gradient, float32)")
        self.params = np.zeros(self.n_params, dtype=np.float32)
        self.grad = np.zeros(self.n_params, dtype=np.float32)
        for index, layer in enumerate(self.layers):
            mine = [t for t in self.tensors if t.layer == index]
            layer.bind(
                {t.name.split(".")[-1]: self.view(t, self.params) for t in mine},
                {t.name.split(".")[-1]: self.view(t, self.grad) for t in mine},
            )
        self.init_params()

    @classmethod
    def from_toml(cls, path: str | Path, overrides: list[str] | None = None) -> Network:
        return cls(configuration.load(path, overrides, require_train=False)["model"])

    @classmethod
    def from_string(cls, text: str) -> Network:
        raw = configuration.parse_toml(text)
        return cls(configuration.validate(raw, require_train=False)["model"])

    # Parameters ---------------------------------------------------------------------------
    def memory_bytes(self) -> int:
        """Bytes of the parameter and gradient vectors (float32)."""
        return 2 * 4 * self.n_params

    @staticmethod
    def view(tensor: Tensor, flat: np.ndarray) -> np.ndarray:
        """The tensor's view (shaped) into a flat vector laid out canonically."""
        return flat[tensor.offset:tensor.offset + tensor.size].reshape(tensor.shape)

    def named_params(self) -> dict[str, np.ndarray]:
        return {t.name: self.view(t, self.params) for t in self.tensors}

    def init_params(self, seed: int | None = None) -> None:
        """Deterministic initialisation: layer i draws from Generator(PCG64([seed, i])), so a
        layer's initial values depend only on the seed and its place, on every rank."""
        seed = self.seed if seed is None else seed
        for index, layer in enumerate(self.layers):
            if layer.has_params:
                layer.init(np.random.default_rng([seed, index]))

    # Passes -------------------------------------------------------------------------------
    def _check_batch(self, x, labels=None):
        x = np.asarray(x)
        if x.ndim < 2:
            raise ValueError(f"x: expected a batch of shape (N, {self.input_shape}), got {x.shape}")
        n = x.shape[0]
        if x.shape[1:] != self.input_shape:
            # Same number of values per example (flat <-> image): a reshape, not a guess.
            if math.prod(x.shape[1:]) != math.prod(self.input_shape):
                raise ValueError(f"x: expected examples of shape {self.input_shape}, got {x.shape[1:]}")
            x = x.reshape((n,) + self.input_shape)
        x = np.ascontiguousarray(x, dtype=np.float32)
        if labels is not None:
            labels = np.ascontiguousarray(labels, dtype=np.int32)
            if labels.shape != (n,):
                raise ValueError(f"labels: expected shape ({n},), got {labels.shape}")
        return x, labels

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits (N, classes) of a batch; the returned array is reused by the next call."""
        x, _ = self._check_batch(x)
        for layer in self.layers:
            x = layer.forward(x)
        return x

    def _backward(self, lr: float | None) -> None:
        g = self.output.glogits
        for index in range(len(self.layers) - 1, -1, -1):
            layer = self.layers[index]
            need_gx = index > 0 and any(below.has_params for below in self.layers[:index])
            g = layer.backward(g, need_gx, lr)
            if g is None:
                break

    def loss_and_grad(self, x: np.ndarray, labels: np.ndarray) -> float:
        """Mean loss of the minibatch; its gradient is left in self.grad."""
        x, labels = self._check_batch(x, labels)
        self.forward(x)
        loss = self.output.loss(labels, want_grad=True)
        self._backward(None)
        return loss

    def sgd_step(self, x: np.ndarray, labels: np.ndarray, lr: float) -> float:
        """One plain SGD step with the update fused into the weight-gradient GEMMs
        (params -= lr * grad without materialising grad); returns the minibatch loss."""
        x, labels = self._check_batch(x, labels)
        self.forward(x)
        loss = self.output.loss(labels, want_grad=True)
        self._backward(lr)
        return loss

    def loss(self, x: np.ndarray, labels: np.ndarray) -> float:
        x, labels = self._check_batch(x, labels)
        self.forward(x)
        return self.output.loss(labels, want_grad=False)

    def predict(self, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
        """Predicted class of each example (int32)."""
        out = np.empty(len(x), dtype=np.int32)
        for start in range(0, len(x), batch_size):
            out[start:start + batch_size] = self.forward(x[start:start + batch_size]).argmax(axis=1)
        return out

    def evaluate(self, x: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> tuple[float, float]:
        """(mean loss, accuracy) over a dataset, in batches."""
        total, correct, n = 0.0, 0, len(x)
        if n == 0:
            raise ValueError("x: cannot evaluate on an empty set")
        for start in range(0, n, batch_size):
            xb, yb = self._check_batch(x[start:start + batch_size], labels[start:start + batch_size])
            logits = self.forward(xb)
            total += self.output.loss(yb, want_grad=False, scale=1.0)
            correct += int(np.count_nonzero(logits.argmax(axis=1) == yb))
        return total / n, correct / n

    # Description --------------------------------------------------------------------------
    def flops_per_example(self) -> int:
        return sum(layer.flops_per_example() for layer in self.layers)

    def summary(self) -> str:
        rows = [f"model {self.name}: input {self.input_shape}, {self.n_params:,} parameters "
                f"({self.n_params * 4 / 2**20:.1f} MiB float32)"]
        rows.append(f"  {'#':>2}  {'layer':<12} {'type':<9} {'output':<16} {'params':>12}  detail")
        for i, layer in enumerate(self.layers):
            detail = {
                "dense": lambda ly: ly.activation,
                "local": lambda ly: f"{ly.kernel}x{ly.kernel}/{ly.stride} {ly.activation}",
                "l2pool": lambda ly: f"{ly.size}x{ly.size}/{ly.stride}",
                "lcn": lambda ly: f"{ly.size}x{ly.size}",
                "softmax": lambda ly: "cross-entropy",
                "logistic": lambda ly: "one-vs-all",
            }[layer.kind](layer)
            rows.append(f"  {i:>2}  {layer.name:<12} {layer.kind:<9} {str(layer.output_shape):<16} "
                        f"{layer.n_params:>12,}  {detail}")
        return "\n".join(rows)


__all__ = ["ConfigError", "Network", "Tensor"]
