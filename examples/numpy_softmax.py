"""A user's own model in plain numpy: softmax regression, or with `hidden` > 0 one ReLU
hidden layer before the softmax. It subclasses dbmpi.model.FlatModel, so Downpour,
Sandblaster and SGD train it like a built-in network (docs/API.md, "A model of your own").

    [model]
    input_shape = [8, 8, 1]
    python = "../examples/numpy_softmax.py:make_model"   # relative to the config file
    [model.args]
    hidden = 32
    seed = 0

What FlatModel asks of a subclass: the tensors (name, shape) of the flat vector, views of
`params` and `grad` attached in `bind`, the gradient written (not added) into `grad` by
`loss_and_grad`, logits from `forward`, and initial values that depend only on the seed,
so that every rank (and every parameter-server shard) computes the same ones.
"""
import math

import numpy as np

from dbmpi.model import FlatModel, tensors_of


class NumpySoftmax(FlatModel):
    """logits = relu(x W1^T + b1) W2^T + b2 (or x W^T + b without a hidden layer)."""

    def __init__(self, input_shape, classes: int, hidden: int = 0, seed: int = 0):
        self.n_inputs = math.prod(input_shape)
        widths = [self.n_inputs] + ([hidden] if hidden else []) + [classes]
        self.layer_names = ["hidden", "out"] if hidden else ["out"]
        shapes = []
        for name, fan_in, fan_out in zip(self.layer_names, widths[:-1], widths[1:], strict=True):
            shapes += [(f"{name}.W", (fan_out, fan_in)), (f"{name}.b", (fan_out,))]
        super().__init__(tensors_of(shapes), input_shape, classes, name="numpy-softmax", seed=seed)

    def bind(self, params, grad):
        """Keep (W, b) views of both flat vectors per layer: no copies, so a fetch from
        the shards (which writes `params` in place) is what the next step reads."""
        views = {t.name: (self.view(t, params), self.view(t, grad)) for t in self.tensors}
        self.weights = [(views[f"{n}.W"][0], views[f"{n}.b"][0]) for n in self.layer_names]
        self.grads = [(views[f"{n}.W"][1], views[f"{n}.b"][1]) for n in self.layer_names]

    def initial_values(self, lo, hi, out=None, seed=None):
        """Glorot-uniform weights, zero biases: the whole vector from the seed alone, then
        the range [lo, hi) of it (a small model can afford to draw it all)."""
        rng = np.random.default_rng(self.seed if seed is None else seed)
        full = np.zeros(self.n_params, np.float32)
        for t in self.tensors:
            if t.name.endswith(".W"):
                fan_out, fan_in = t.shape
                limit = math.sqrt(6.0 / (fan_in + fan_out))
                full[t.offset:t.offset + t.size] = rng.uniform(-limit, limit, t.size)
        out = np.empty(hi - lo, np.float32) if out is None else out
        out[:] = full[lo:hi]
        return out

    def _activations(self, x):
        """The input as (N, D) float32 rows and every layer's output (the last: logits)."""
        a = np.asarray(x, dtype=np.float32).reshape(len(x), self.n_inputs)
        outs = [a]
        for i, (w, b) in enumerate(self.weights):
            z = outs[-1] @ w.T + b
            outs.append(np.maximum(z, 0.0) if i < len(self.weights) - 1 else z)
        return outs

    def forward(self, x):
        return self._activations(x)[-1]

    def loss_and_grad(self, x, labels):
        """Mean cross-entropy of softmax(logits); its gradient overwrites `grad`."""
        outs = self._activations(x)
        labels = np.asarray(labels, dtype=np.int64)
        n = len(labels)
        z = outs[-1] - outs[-1].max(axis=1, keepdims=True)
        probs = np.exp(z)
        probs /= probs.sum(axis=1, keepdims=True)
        loss = float(-np.log(probs[np.arange(n), labels].astype(np.float64)).mean())
        g = probs
        g[np.arange(n), labels] -= 1.0
        g /= n  # dL/dlogits of the mean loss
        for i in range(len(self.weights) - 1, -1, -1):
            gw, gb = self.grads[i]
            np.matmul(g.T, outs[i], out=gw)  # written, not added to
            np.sum(g, axis=0, out=gb)
            if i > 0:
                g = (g @ self.weights[i][0]) * (outs[i] > 0)
        return loss


def make_model(input_shape=(8, 8, 1), classes: int = 10, hidden: int = 0, seed: int = 0) -> NumpySoftmax:
    """The factory [model] python names; [model.args] are its keyword arguments. The loader
    passes none of [model]'s own keys, so give the seed here (every rank must use the same)
    and keep input_shape equal to [model] input_shape (the loader checks it)."""
    return NumpySoftmax(tuple(input_shape), classes, hidden, seed)
