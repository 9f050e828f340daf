"""A Network: layers from a config, over one canonical flat float32 parameter vector.

The canonical vector concatenates every layer's tensors in layer order (W then b), each
stored output-unit-major. It does not depend on how the run is distributed, which is what
lets parameter-server shards own plain contiguous ranges of it and checkpoints store
logical tensors. Layers hold views into it, so updating the vector in place updates the
model; it is never reallocated.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from dbmpi import config as configuration
from dbmpi.config import ConfigError
from dbmpi.model.layers import LAYER_TYPES, Layer, Output
from dbmpi.model.protocol import Tensor, evaluate_in_batches, predict_in_batches
from dbmpi.runtime.layout import require_memory

# Values drawn per step of initial_values (8 MiB of float64 scratch).
INIT_CHUNK = 1 << 20


def _fill_uniform(stream: np.random.PCG64, skip: int, limit: float, out: np.ndarray,
                  scratch: np.ndarray) -> None:
    """out[:] = values skip, skip + 1, ... of Generator(stream).uniform(-limit, limit),
    rounded to float32: numpy's uniform is low + (high - low) * random(), one draw each."""
    stream.advance(skip)
    generator = np.random.Generator(stream)
    low, scale = -limit, limit - (-limit)
    for start in range(0, out.size, scratch.size):
        part = scratch[:min(scratch.size, out.size - start)]
        generator.random(out=part)
        np.multiply(part, scale, out=part)
        np.add(part, low, out=part)
        out[start:start + part.size] = part


def _normalise_input_shape(input_shape) -> tuple[int, ...]:
    shape = tuple(input_shape)
    return shape + (1,) if len(shape) == 2 else shape


class Network:
    """Layers, their parameters in one flat vector, and minibatch loss/gradient/prediction:
    the built-in implementation of the model protocol (dbmpi.model.protocol.Model), and the
    only one dbmpi can split across partitions."""

    partitionable = True

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
        self.output_kind = self.output.kind  # "softmax" or "logistic"

        self.tensors: list[Tensor] = []
        offset = 0
        for index, layer in enumerate(self.layers):
            for tname, tshape in layer.tensors():
                self.tensors.append(Tensor(f"{layer.name}.{tname}", index, tuple(tshape), offset))
                offset += math.prod(tshape)
        self.n_params = offset
        self.allocated = False
        if allocate:
            self.allocate()

    def allocate(self, initialise: bool = True) -> Network:
        """The parameter and gradient vectors, bound to the layers and (unless told not to)
        initialised; refused in one line when they cannot fit in this machine's memory. For
        the roles that run the whole model (dbmpi.runtime.memory); a no-op once done."""
        if self.allocated:
            return self
        require_memory(self.memory_bytes(), f"model: {self.n_params:,} parameters (values and gradient, float32)")
        self.params = np.zeros(self.n_params, dtype=np.float32)
        self.grad = np.zeros(self.n_params, dtype=np.float32)
        for index, layer in enumerate(self.layers):
            mine = [t for t in self.tensors if t.layer == index]
            layer.bind(
                {t.name.split(".")[-1]: self.view(t, self.params) for t in mine},
                {t.name.split(".")[-1]: self.view(t, self.grad) for t in mine},
            )
        self.allocated = True
        if initialise:
            self.init_params()
        return self

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
        """Set the allocated parameters to their initial values (initial_values)."""
        self.initial_values(0, self.n_params, self.params, seed)

    def initial_values(self, lo: int, hi: int, out: np.ndarray | None = None,
                       seed: int | None = None) -> np.ndarray:
        """The initial values of the canonical range [lo, hi) (any range: it may straddle
        tensors and layers), written into `out` (float32, hi - lo values) or a new array.

        Layer i draws its W from Generator(PCG64([seed, i])), one float64 per value in
        storage order, scaled to (-limit, limit) and rounded to float32; its b is zero. So
        a layer's values depend only on the seed and its place, and value k of W is the
        stream advanced by k: a shard or partition initialises its own range directly,
        bit-identical to the whole vector's, in chunks of INIT_CHUNK values (no
        full-size temporary)."""
        seed = self.seed if seed is None else seed
        if not 0 <= lo <= hi <= self.n_params:
            raise ValueError(f"range [{lo}, {hi}) is outside the {self.n_params} parameters")
        out = np.empty(hi - lo, np.float32) if out is None else out
        if out.shape != (hi - lo,) or out.dtype != np.float32:
            raise ValueError(f"out: expected float32 of shape ({hi - lo},), got {out.dtype} {out.shape}")
        scratch = np.empty(min(INIT_CHUNK, hi - lo), np.float64)
        for tensor in self.tensors:
            a, b = max(lo, tensor.offset), min(hi, tensor.offset + tensor.size)
            if a >= b:
                continue
            limit = self.layers[tensor.layer].init_limit(tensor.name.split(".")[-1])
            if limit is None:
                out[a - lo:b - lo] = 0.0
            else:
                _fill_uniform(np.random.PCG64([seed, tensor.layer]), a - tensor.offset, limit,
                              out[a - lo:b - lo], scratch)
        return out

    def activation_bytes(self, batch: int, training: bool = True) -> int:
        """Bytes of the layers' work buffers for a batch of `batch` examples: a training
        step's (forward and backward) or an evaluation's (forward and loss)."""
        values = sum(layer.buffer_values(training, self._needs_input_gradient(index))
                     for index, layer in enumerate(self.layers))
        return 4 * batch * values

    def _needs_input_gradient(self, index: int) -> bool:
        """Whether backward computes layer `index`'s input gradient (a layer below has
        parameters)."""
        return index > 0 and any(below.has_params for below in self.layers[:index])

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
            g = layer.backward(g, self._needs_input_gradient(index), lr)
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
        return predict_in_batches(self.forward, x, batch_size)

    def evaluate(self, x: np.ndarray, labels: np.ndarray, batch_size: int = 1000) -> tuple[float, float]:
        """(mean loss, accuracy) over a dataset, in batches."""
        return evaluate_in_batches(self._score_batch, x, labels, batch_size)

    def _score_batch(self, x: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
        """(loss sum, correct predictions) of one batch."""
        x, labels = self._check_batch(x, labels)
        right = int(np.count_nonzero(self.forward(x).argmax(axis=1) == labels))
        return self.output.loss(labels, want_grad=False, scale=1.0), right

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
