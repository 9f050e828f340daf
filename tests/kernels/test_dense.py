"""dense_forward/dense_backward against NumPy float64 and finite differences."""
import numpy as np
import pytest

from dbmpi.kernels import dense_backward, dense_forward
from tests.conftest import assert_close, numeric_grad, randn

ACTS = {
    "identity": lambda z: z,
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "tanh": np.tanh,
    "relu": lambda z: np.maximum(z, 0.0),
}
SHAPES = [(1, 1, 1), (1, 7, 3), (5, 3, 4), (13, 17, 9), (64, 33, 65)]


def reference(x, w, b, act):
    return ACTS[act](x.astype(np.float64) @ w.astype(np.float64).T + b)


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("n,n_in,n_out", SHAPES)
def test_forward_matches_numpy(rng, act, n, n_in, n_out):
    x, w, b = randn(rng, n, n_in), randn(rng, n_out, n_in), randn(rng, n_out)
    y = np.full((n, n_out), np.nan, dtype=np.float32)
    assert dense_forward(x, w, b, y, act) is y
    assert_close(y, reference(x, w, b, act), rtol=1e-5, atol=1e-5)


def test_sigmoid_saturates_without_overflow():
    x = np.array([[1.0]], dtype=np.float32)
    w = np.array([[1e4], [-1e4]], dtype=np.float32)
    y = np.empty((1, 2), np.float32)
    dense_forward(x, w, np.zeros(2, np.float32), y, "sigmoid")
    assert y[0, 0] == 1.0 and y[0, 1] == 0.0


@pytest.mark.parametrize("act", list(ACTS))
@pytest.mark.parametrize("n,n_in,n_out", [(1, 3, 2), (4, 5, 3), (7, 2, 5)])
def test_backward_matches_finite_differences(rng, act, n, n_in, n_out):
    x, w, b = randn(rng, n, n_in), randn(rng, n_out, n_in), randn(rng, n_out)
    # loss = sum(r * y), so dL/dy = r. (A ReLU kink within the 1e-6 step is vanishingly rare.)
    r = rng.standard_normal((n, n_out))
    y = np.empty((n, n_out), np.float32)
    dense_forward(x, w, b, y, act)
    gy = r.astype(np.float32)
    gz = np.empty_like(y)
    gw, gb, gx = np.empty_like(w), np.empty_like(b), np.empty_like(x)
    dense_backward(x, w, y, gy, gz, gw, gb, gx, act)

    x64, w64, b64 = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    assert_close(gx, numeric_grad(lambda v: (r * reference(v, w64, b64, act)).sum(), x64), name="gx")
    assert_close(gw, numeric_grad(lambda v: (r * reference(x64, v, b64, act)).sum(), w64), name="gw")
    assert_close(gb, numeric_grad(lambda v: (r * reference(x64, w64, v, act)).sum(), b64), name="gb")


def test_backward_scale_accumulate_and_fused_update(rng):
    n, n_in, n_out = 6, 5, 4
    x, w, b = randn(rng, n, n_in), randn(rng, n_out, n_in), randn(rng, n_out)
    y = np.empty((n, n_out), np.float32)
    dense_forward(x, w, b, y, "tanh")
    gy = randn(rng, n, n_out)
    gw, gb, gx = np.empty_like(w), np.empty_like(b), np.empty_like(x)
    dense_backward(x, w, y, gy.copy(), np.empty_like(y), gw, gb, gx, "tanh")

    # accumulate with a scale: g <- g + 0.5 * grad
    gw2, gb2 = np.ones_like(w), np.ones_like(b)
    dense_backward(x, w, y, gy.copy(), np.empty_like(y), gw2, gb2, None, "tanh", 0.5, True)
    assert_close(gw2, 1 + 0.5 * gw, rtol=1e-5, atol=1e-6)
    assert_close(gb2, 1 + 0.5 * gb, rtol=1e-5, atol=1e-6)

    # fused SGD: gw aliases w and gb aliases b; gx still uses the old weights; gz aliases gy
    lr = 0.1
    w_new, b_new, gx_fused = w.copy(), b.copy(), np.empty_like(x)
    g = gy.copy()
    dense_backward(x, w_new, y, g, g, w_new, b_new, gx_fused, "tanh", -lr, True)
    assert_close(w_new, w - lr * gw, rtol=1e-5, atol=1e-6)
    assert_close(b_new, b - lr * gb, rtol=1e-5, atol=1e-6)
    assert_close(gx_fused, gx, rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("n_out", [1, 3, 8, 17, 64])
@pytest.mark.parametrize("in_place", [False, True])
def test_relu_backward_values_and_bias_sums(rng, n_out, in_place):
    # What the ReLU gradient and the bias sums are, exactly, element by element: gz = gy
    # where y > 0 and 0 elsewhere (y = 0, y = NaN, and gy = inf/NaN masked by y <= 0), gz
    # written over gy or into its own array, and gb the float64 sum of gz's rows in order,
    # at row lengths through the vectorised loops and their tails.
    n, n_in = 9, 2
    x, w = randn(rng, n, n_in), randn(rng, n_out, n_in)
    y = np.abs(randn(rng, n, n_out))
    y[rng.random((n, n_out)) < 0.5] = 0.0
    y[0, 0], y[-1, -1] = np.nan, -0.0
    gy = randn(rng, n, n_out)
    gy[0, -1] = np.inf if y[0, -1] <= 0 else gy[0, -1]
    gy[-1, 0] = np.nan if y[-1, 0] <= 0 else gy[-1, 0]
    expected = np.where(y > 0, gy, np.float32(0.0))
    gz = gy.copy() if in_place else np.full_like(gy, np.nan)
    gw, gb = np.empty_like(w), np.empty(n_out, np.float32)
    dense_backward(x, w, y, gz if in_place else gy, gz, gw, gb, None, "relu")
    np.testing.assert_array_equal(gz, expected)
    bias = np.zeros(n_out)
    for row in expected.astype(np.float64):
        bias += row
    np.testing.assert_array_equal(gb, bias.astype(np.float32))

def good_args(rng):
    x, w, b = randn(rng, 3, 4), randn(rng, 5, 4), randn(rng, 5)
    return dict(x=x, w=w, b=b, y=np.empty((3, 5), np.float32))


@pytest.mark.parametrize("name,bad", [
    ("x", lambda a: a["x"].astype(np.float64)),
    ("x", lambda a: np.ones((3, 8), np.float32)[:, ::2]),
    ("x", lambda a: a["x"][None]),
    ("x", lambda a: [[1.0] * 4] * 3),
    ("w", lambda a: np.ones((5, 3), np.float32)),
    ("w", lambda a: np.asfortranarray(np.ones((5, 4), np.float32))),
    ("b", lambda a: np.ones(4, np.float32)),
    ("b", lambda a: np.ones(5, np.int32)),
    ("y", lambda a: np.ones((3, 4), np.float32)),
    ("y", lambda a: np.ones((5, 3), np.float32).T),
])
def test_forward_rejects_bad_arguments(rng, name, bad):
    args = good_args(rng)
    args[name] = bad(args)
    with pytest.raises(ValueError, match=f"^{name}:"):
        dense_forward(args["x"], args["w"], args["b"], args["y"], "relu")


def test_forward_rejects_read_only_output_and_unknown_activation(rng):
    args = good_args(rng)
    args["y"].flags.writeable = False
    with pytest.raises(ValueError, match="^y: must be writeable"):
        dense_forward(args["x"], args["w"], args["b"], args["y"])
    args = good_args(rng)
    with pytest.raises(ValueError, match="^activation:"):
        dense_forward(args["x"], args["w"], args["b"], args["y"], "softplus")


@pytest.mark.parametrize("name", ["gy", "gz", "gw", "gb", "gx"])
def test_backward_rejects_wrong_shapes(rng, name):
    a = good_args(rng)
    dense_forward(a["x"], a["w"], a["b"], a["y"])
    args = dict(x=a["x"], w=a["w"], y=a["y"], gy=np.ones((3, 5), np.float32),
                gz=np.ones((3, 5), np.float32), gw=np.ones((5, 4), np.float32),
                gb=np.ones(5, np.float32), gx=np.ones((3, 4), np.float32))
    args[name] = np.ones((2, 2), np.float32) if name != "gb" else np.ones(2, np.float32)
    with pytest.raises(ValueError, match=f"^{name}:"):
        dense_backward(**args)
