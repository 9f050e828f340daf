"""Helpers shared by the spatial kernel tests (local, pooling, lcn): float64 activations,
central differences, tolerant comparison and the bad-argument variants every kernel must
reject. A plain module (not a conftest) so it cannot clash with other conftest files."""
import numpy as np

from tests.conftest import assert_close, randn  # noqa: F401  (re-exported for the spatial tests)
from tests.conftest import numeric_grad as _numeric_grad

ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu")


def activate64(z, activation):
    """float64 reference of the kernels' activations."""
    if activation == "identity":
        return z
    if activation == "sigmoid":
        return 1.0 / (1.0 + np.exp(-z))
    if activation == "tanh":
        return np.tanh(z)
    if activation == "relu":
        return np.maximum(z, 0.0)
    raise ValueError(activation)


def numeric_grad(loss, arr, step=1e-6):
    """Central differences of the scalar loss() w.r.t. every element of the float64 array
    arr, which loss() reads; arr is perturbed in place and restored."""
    return _numeric_grad(lambda _arr: loss(), arr, step)


def bad_variants(arr, output=False, shaped=True):
    """(label, bad value) pairs a kernel must reject for the argument arr: wrong type,
    dtype, rank, layout (same shape, non-contiguous), shape (when shaped: its shape is
    fixed by the other arguments), and read-only for outputs."""
    out = [
        ("list", arr.tolist()),
        ("dtype", arr.astype(np.float64)),
        ("ndim", arr[None].copy()),
        ("noncontig", np.zeros(arr.shape[:-1] + (2 * arr.shape[-1],), np.float32)[..., ::2]),
    ]
    if shaped:
        out.append(("shape", np.zeros(arr.shape[:-1] + (arr.shape[-1] + 1,), np.float32)))
    if output:
        ro = arr.copy()
        ro.flags.writeable = False
        out.append(("readonly", ro))
    return out


def bad_argument_cases(args, outputs, primary=()):
    """pytest parameters (name, label, value) for every array argument in the dict args;
    outputs get the read-only variant, primary arguments (which set the geometry) no
    wrong-shape variant."""
    cases = []
    for name, value in args.items():
        if isinstance(value, np.ndarray):
            for label, bad in bad_variants(value, output=name in outputs,
                                             shaped=name not in primary):
                cases.append((name, label, bad))
    return cases


def overlapping(a, shift):
    """(x, gx): two C-contiguous float32 arrays shaped like `a` in one buffer, gx starting
    `shift` floats after x (0: the same memory); x holds a's values."""
    base = np.zeros(a.size + abs(shift), np.float32)
    x = base[max(-shift, 0):][:a.size].reshape(a.shape)
    gx = base[max(shift, 0):][:a.size].reshape(a.shape)
    x[:] = a
    return x, gx
