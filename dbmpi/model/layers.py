"""Layers: shapes, parameter tensors and forward/backward passes on the compiled kernels.

Each layer knows its input and output shape per example ((units,) for dense layers,
(rows, cols, maps) for spatial ones), the parameter tensors it owns, stored
output-unit-major so a block of output units is a contiguous range of each tensor, and the
work buffers it reuses between minibatches of the same size.
"""
from __future__ import annotations

import math
from abc import ABC, abstractmethod

import numpy as np

from dbmpi import kernels
from dbmpi.config import ConfigError


class Layer(ABC):
    """Base class. Subclasses set output_shape, tensors(), forward() and backward()."""

    kind = "layer"
    has_params = False

    def __init__(self, spec: dict, input_shape: tuple[int, ...], where: str):
        self.spec = spec
        self.name = spec["name"]
        self.input_shape = tuple(input_shape)
        self.where = where
        self.output_shape: tuple[int, ...] = ()
        self.params: dict[str, np.ndarray] = {}
        self.grads: dict[str, np.ndarray] = {}
        self._batch = -1
        self._buffers: dict[str, np.ndarray] = {}

    # Parameters ---------------------------------------------------------------------------
    def tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """(tensor name, shape) of each parameter tensor, in canonical order."""
        return []

    def bind(self, params: dict[str, np.ndarray], grads: dict[str, np.ndarray]) -> None:
        """Attach views of the network's flat parameter and gradient vectors."""
        self.params, self.grads = params, grads

    def init_limit(self, tensor: str) -> float | None:
        """How tensor `tensor` starts: uniform on (-limit, limit), drawn in storage order
        from the layer's own random stream starting at its first value (a layer draws for
        one tensor only, its W), or None: zeros. dbmpi.model.network fills any range."""
        return None

    @property
    def n_params(self) -> int:
        return sum(math.prod(s) for _, s in self.tensors())

    def flops_per_example(self) -> int:
        """Multiply-adds x 2 of the forward pass for one example (backward is about twice)."""
        return 0

    def buffer_values(self, training: bool, need_gx: bool) -> int:
        """float32 values per example of the work buffers the passes keep (_buffer): the
        output, and with training and need_gx the input gradient (dbmpi.runtime.memory)."""
        return math.prod(self.output_shape) + (math.prod(self.input_shape) if training and need_gx else 0)

    # Buffers ------------------------------------------------------------------------------
    def _buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        buf = self._buffers.get(name)
        if buf is None or buf.shape != shape:
            buf = np.empty(shape, dtype=np.float32)
            self._buffers[name] = buf
        return buf

    # Passes -------------------------------------------------------------------------------
    @abstractmethod
    def forward(self, x: np.ndarray) -> np.ndarray:
        """The layer's output for a batch (a reused buffer)."""

    @abstractmethod
    def backward(self, gy: np.ndarray, need_gx: bool, lr: float | None = None) -> np.ndarray | None:
        """Return dL/dx (when need_gx) and write parameter gradients into self.grads; with
        lr given, apply `param -= lr * grad` in place instead (fused SGD)."""


def _uniform_limit(fan_in: int, fan_out: int, activation: str) -> float:
    # He for ReLU, Glorot otherwise: keeps activations' variance stable through depth.
    return math.sqrt(6.0 / fan_in) if activation == "relu" else math.sqrt(6.0 / (fan_in + fan_out))


class Dense(Layer):
    """Fully connected: y = f(x @ W.T + b), W (units, inputs). Flattens spatial input."""

    kind = "dense"
    has_params = True

    def __init__(self, spec, input_shape, where):
        super().__init__(spec, input_shape, where)
        self.units = spec["units"]
        self.activation = spec.get("activation", "identity")
        self.n_in = math.prod(self.input_shape)
        self.output_shape = (self.units,)

    def tensors(self):
        return [("W", (self.units, self.n_in)), ("b", (self.units,))]

    def init_limit(self, tensor):
        return _uniform_limit(self.n_in, self.units, self.activation) if tensor == "W" else None

    def flops_per_example(self):
        return 2 * self.units * self.n_in

    def forward(self, x):
        n = x.shape[0]
        self.x = x.reshape(n, self.n_in)
        self.y = self._buffer("y", (n, self.units))
        kernels.dense_forward(self.x, self.params["W"], self.params["b"], self.y, self.activation)
        return self.y

    def backward(self, gy, need_gx, lr=None):
        n = gy.shape[0]
        gx = self._buffer("gx", (n, self.n_in)) if need_gx else None
        if lr is None:
            gw, gb, scale, acc = self.grads["W"], self.grads["b"], 1.0, False
        else:
            gw, gb, scale, acc = self.params["W"], self.params["b"], -lr, True
        kernels.dense_backward(self.x, self.params["W"], self.y, gy, gy, gw, gb, gx,
                               self.activation, scale, acc)
        return None if gx is None else gx.reshape((n,) + self.input_shape)


class LocallyConnected(Layer):
    """Locally connected 2-D: every output position has its own k x k x C filters (no sharing).

    W is (out_rows, out_cols, filters, k*k*C) and b (out_rows, out_cols, filters), so the
    parameters of a block of output rows are contiguous.
    """

    kind = "local"
    has_params = True

    def __init__(self, spec, input_shape, where):
        super().__init__(spec, input_shape, where)
        if len(self.input_shape) != 3:
            raise ConfigError(f"{where}: a local layer needs (rows, cols, maps) input, got {self.input_shape}")
        rows, cols, maps = self.input_shape
        self.kernel, self.stride, self.filters = spec["kernel"], spec["stride"], spec["filters"]
        self.activation = spec["activation"]
        if self.kernel > rows or self.kernel > cols:
            raise ConfigError(f"{where}.kernel: {self.kernel} is larger than the input {rows} x {cols}")
        out_rows = (rows - self.kernel) // self.stride + 1
        out_cols = (cols - self.kernel) // self.stride + 1
        self.patch = self.kernel * self.kernel * maps
        self.output_shape = (out_rows, out_cols, self.filters)

    def tensors(self):
        r, c, f = self.output_shape
        return [("W", (r, c, f, self.patch)), ("b", (r, c, f))]

    def init_limit(self, tensor):
        return _uniform_limit(self.patch, self.filters, self.activation) if tensor == "W" else None

    def flops_per_example(self):
        r, c, f = self.output_shape
        return 2 * r * c * f * self.patch

    def forward(self, x):
        return self.forward_rows(x, 0, self.output_shape[0])

    def forward_rows(self, x, r0: int, r1: int):
        """Output rows [r0, r1) of forward(x) into self.y, the other rows left alone: model
        parallelism computes the rows its own input covers while the halo rows travel."""
        self.x = x
        self.y = self._buffer("y", (x.shape[0],) + self.output_shape)
        kernels.local_forward(x, self.params["W"], self.params["b"], self.y,
                              self.kernel, self.stride, self.activation, r0, r1)
        return self.y

    def _param_targets(self, lr):
        """(gW, gb, scale, accumulate): the gradients, or with lr the parameters (fused SGD)."""
        if lr is None:
            return self.grads["W"], self.grads["b"], 1.0, False
        return self.params["W"], self.params["b"], -lr, True

    def backward(self, gy, need_gx, lr=None):
        gx = self._buffer("gx", self.x.shape) if need_gx else None
        gw, gb, scale, acc = self._param_targets(lr)
        kernels.local_backward(self.x, self.params["W"], self.y, gy, gy, gw, gb, gx,
                               self.kernel, self.stride, self.activation, scale, acc)
        return gx

    def backward_input(self, gy):
        """backward(gy, True)'s first half: returns dL/dx and leaves dL/dz in gy, so that the
        input gradient can travel while backward_params(gy) computes the rest."""
        gx = self._buffer("gx", self.x.shape)
        kernels.local_backward(self.x, self.params["W"], self.y, gy, gy, self.grads["W"],
                               self.grads["b"], gx, self.kernel, self.stride, self.activation,
                               params=False)
        return gx

    def backward_params(self, gz, lr=None):
        """backward's second half: the parameter gradients (with lr, the fused SGD update)
        from the dL/dz that backward_input left."""
        gw, gb, scale, acc = self._param_targets(lr)
        kernels.local_backward(self.x, self.params["W"], self.y, gz, gz, gw, gb, None,
                               self.kernel, self.stride, "identity", scale, acc)


class L2Pool(Layer):
    """L2 pooling per map: sqrt(eps + sum of squares) over a size x size window."""

    kind = "l2pool"

    def __init__(self, spec, input_shape, where):
        super().__init__(spec, input_shape, where)
        if len(self.input_shape) != 3:
            raise ConfigError(f"{where}: an l2pool layer needs (rows, cols, maps) input, got {self.input_shape}")
        rows, cols, maps = self.input_shape
        self.size, self.stride, self.eps = spec["size"], spec["stride"], spec["eps"]
        if self.size > rows or self.size > cols:
            raise ConfigError(f"{where}.size: {self.size} is larger than the input {rows} x {cols}")
        self.output_shape = ((rows - self.size) // self.stride + 1, (cols - self.size) // self.stride + 1, maps)

    def flops_per_example(self):
        return 2 * math.prod(self.output_shape) * self.size * self.size

    def forward(self, x):
        return self.forward_rows(x, 0, self.output_shape[0])

    def forward_rows(self, x, r0: int, r1: int):
        """Output rows [r0, r1) of forward(x) into self.y, the other rows left alone (model
        parallelism computes first the rows its peers need)."""
        self.x = x
        self.y = self._buffer("y", (x.shape[0],) + self.output_shape)
        kernels.l2pool_forward(x, self.y, self.size, self.stride, self.eps, r0, r1)
        return self.y

    def backward(self, gy, need_gx, lr=None):
        if not need_gx:
            return None
        gx = self._buffer("gx", self.x.shape)
        kernels.l2pool_backward(self.x, self.y, gy, gx, self.size, self.stride)
        return gx


class LocalContrastNorm(Layer):
    """Local contrast normalization across maps over a size x size window (same shape out)."""

    kind = "lcn"

    def __init__(self, spec, input_shape, where):
        super().__init__(spec, input_shape, where)
        if len(self.input_shape) != 3:
            raise ConfigError(f"{where}: an lcn layer needs (rows, cols, maps) input, got {self.input_shape}")
        self.size, self.eps = spec["size"], spec["eps"]
        self.output_shape = self.input_shape

    def flops_per_example(self):
        return 10 * math.prod(self.output_shape)

    def buffer_values(self, training, need_gx):
        rows, cols, _ = self.output_shape  # y and gx (the base's), v, the per-position d
        return super().buffer_values(training, need_gx) + math.prod(self.output_shape) + rows * cols

    def forward(self, x):
        n = x.shape[0]
        self.y = self._buffer("y", (n,) + self.output_shape)
        self.v = self._buffer("v", (n,) + self.output_shape)
        self.d = self._buffer("d", (n,) + self.output_shape[:2])
        kernels.lcn_forward(x, self.y, self.v, self.d, self.size, self.eps)
        return self.y

    def backward(self, gy, need_gx, lr=None):
        if not need_gx:
            return None
        gx = self._buffer("gx", gy.shape)
        kernels.lcn_backward(self.v, self.d, gy, gx, self.size)
        return gx


class Output(Dense):
    """Output layer: a dense layer to class scores (logits) and its fused loss."""

    def __init__(self, spec, input_shape, where):
        super().__init__({**spec, "activation": "identity"}, input_shape, where)

    def buffer_values(self, training, need_gx):
        # logits, probabilities and, training, their gradient
        return super().buffer_values(training, need_gx) + self.units * (2 if training else 1)

    def loss(self, labels: np.ndarray, want_grad: bool, scale: float | None = None):
        """Loss of the last forward's logits; with want_grad, dL/dlogits in self.glogits."""
        n = self.y.shape[0]
        self.probs = self._buffer("probs", (n, self.units))
        self.glogits = self._buffer("glogits", (n, self.units)) if want_grad else None
        return self.loss_kernel(self.y, labels, self.probs, self.glogits, scale)


class Softmax(Output):
    """Softmax over the classes with cross-entropy loss."""

    kind = "softmax"
    loss_kernel = staticmethod(kernels.softmax_xent_loss)


class Logistic(Output):
    """One-vs-all logistic outputs (the paper's ImageNet classifier) with binary cross-entropy."""

    kind = "logistic"
    loss_kernel = staticmethod(kernels.logistic_ova_loss)


LAYER_TYPES: dict[str, type[Layer]] = {
    cls.kind: cls for cls in (Dense, LocallyConnected, L2Pool, LocalContrastNorm, Softmax, Logistic)
}
