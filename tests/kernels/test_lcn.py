"""lcn_forward/lcn_backward against a NumPy float64 reference and finite differences."""
import zlib

import numpy as np
import pytest

from dbmpi._kernels.lcn import lcn_backward, lcn_forward
from tests.kernels.spatial_helpers import assert_close, bad_argument_cases, numeric_grad, randn

# (N, H, W, C, size): non-square images, windows up to and beyond the image size.
SHAPES = [
    (1, 1, 1, 1, 1),
    (1, 5, 5, 1, 3),
    (2, 7, 5, 3, 3),
    (3, 8, 11, 2, 5),
    (1, 6, 9, 4, 1),
    (2, 4, 3, 2, 7),  # window larger than the image: clipped like any border window
    (2, 12, 16, 8, 9),
    (1, 9, 13, 16, 5),
]
GRAD_SHAPES = [(2, 5, 6, 3, 3), (1, 6, 4, 2, 5), (1, 3, 4, 2, 7), (2, 4, 5, 1, 1)]


def box64(a, size):
    """Sum of a[N, H, W] over the size x size window centred at each position, clipped."""
    h = size // 2
    out = np.empty(a.shape, np.float64)
    for i in range(a.shape[1]):
        for j in range(a.shape[2]):
            out[:, i, j] = a[:, max(0, i - h):i + h + 1, max(0, j - h):j + h + 1].sum(axis=(1, 2))
    return out


def reference(x, size, eps=1e-2):
    """(y, v, d) in float64, straight from the definition."""
    x = np.asarray(x, np.float64)
    c = x.shape[3]
    cn = c * box64(np.ones(x.shape[:3]), size)
    m = box64(x.sum(axis=3), size) / cn
    v = x - m[..., None]
    d = np.sqrt(box64((v * v).sum(axis=3), size) / cn + eps)
    return v / d[..., None], v, d


def data(rng, n, h, w, c):
    # Per-map offsets and scales so that both normalization stages matter.
    return (randn(rng, n, h, w, c) * rng.uniform(0.5, 3.0, c) + rng.normal(0, 2, c)).astype(
        np.float32)


def run_forward(x, size, eps=1e-2):
    y, v = np.full_like(x, np.nan), np.full_like(x, np.nan)
    d = np.full(x.shape[:3], np.nan, np.float32)
    assert lcn_forward(x, y, v, d, size, eps) is y
    return y, v, d


@pytest.mark.parametrize("eps", [1e-2, 1.0])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_numpy(shape, eps):
    rng = np.random.default_rng(zlib.crc32(repr((shape, eps)).encode()))
    *dims, size = shape
    x = data(rng, *dims)
    y, v, d = run_forward(x, size, eps)
    y64, v64, d64 = reference(x, size, eps)
    assert_close(y, y64, rtol=1e-5, atol=1e-5, name="y")
    assert_close(v, v64, rtol=1e-5, atol=1e-5, name="v")
    assert_close(d, d64, rtol=1e-5, atol=1e-5, name="d")


def test_forward_invariances():
    # Subtractive stage: adding a constant to every map changes nothing. Divisive stage:
    # scaling x scales v and d alike, so y is unchanged when eps is negligible.
    rng = np.random.default_rng(11)
    x = data(rng, 2, 9, 7, 4)
    y, v, d = run_forward(x, 5, eps=1e-6)
    y_shift, v_shift, _ = run_forward((x + 10.0).astype(np.float32), 5, eps=1e-6)
    assert_close(v_shift, v, rtol=1e-4, atol=1e-5)
    y_scaled, _, d_scaled = run_forward((x * 8.0).astype(np.float32), 5, eps=1e-6)
    assert_close(y_scaled, y, rtol=1e-4, atol=1e-5)
    assert_close(d_scaled, 8.0 * d, rtol=1e-4, atol=1e-5)
    # A constant image normalizes to zero (d = sqrt(eps) keeps it finite).
    y0, v0, d0 = run_forward(np.full((1, 5, 6, 3), 4.0, np.float32), 3)
    assert np.all(y0 == 0) and np.all(v0 == 0)
    np.testing.assert_allclose(d0, np.sqrt(1e-2), rtol=1e-6)


@pytest.mark.parametrize("eps", [1e-2, 0.7])
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
def test_backward_matches_finite_differences(shape, eps):
    rng = np.random.default_rng(zlib.crc32(repr((shape, eps, "grad")).encode()))
    *dims, size = shape
    x = data(rng, *dims)
    y, v, d = run_forward(x, size, eps)
    r = randn(rng, *x.shape)
    gx = np.full_like(x, np.nan)
    assert lcn_backward(v, d, r, gx, size) is gx
    x64 = x.astype(np.float64)
    want = numeric_grad(lambda: float(np.sum(r * reference(x64, size, eps)[0])), x64)
    assert_close(gx, want, name="gx")


def test_gx_may_alias_gy():
    rng = np.random.default_rng(5)
    x = data(rng, 2, 6, 7, 3)
    _, v, d = run_forward(x, 5)
    gy = randn(rng, *x.shape)
    gx = np.empty_like(x)
    lcn_backward(v, d, gy, gx, 5)
    g = gy.copy()
    lcn_backward(v, d, g, g, 5)
    np.testing.assert_array_equal(g, gx)


# ---------------------------------------------------------------- argument validation

def _fwd_args():
    x = randn(np.random.default_rng(0), 2, 6, 5, 3)
    return dict(x=x, y=np.zeros_like(x), v=np.zeros_like(x), d=np.zeros((2, 6, 5), np.float32))


def _bwd_args():
    a = _fwd_args()
    return dict(v=a["x"], d=np.ones_like(a["d"]), gy=np.ones_like(a["x"]), gx=np.zeros_like(a["x"]))


@pytest.mark.parametrize("name,label,bad",
                         bad_argument_cases(_fwd_args(), outputs={"y", "v", "d"}, primary={"x"}))
def test_forward_rejects_bad_array(name, label, bad):
    args = _fwd_args()
    args[name] = bad
    with pytest.raises(ValueError, match=f"^{name}:"):
        lcn_forward(**args, size=3)


@pytest.mark.parametrize("name,label,bad",
                         bad_argument_cases(_bwd_args(), outputs={"gx"}, primary={"v"}))
def test_backward_rejects_bad_array(name, label, bad):
    args = _bwd_args()
    args[name] = bad
    with pytest.raises(ValueError, match=f"^{name}:"):
        lcn_backward(**args, size=3)


@pytest.mark.parametrize("size", [0, -1, -3, 2, 4])
def test_rejects_bad_size(size):
    with pytest.raises(ValueError, match="^size:"):
        lcn_forward(**_fwd_args(), size=size)
    with pytest.raises(ValueError, match="^size:"):
        lcn_backward(**_bwd_args(), size=size)


@pytest.mark.parametrize("eps", [0.0, -1e-2, float("nan")])
def test_rejects_bad_eps(eps):
    with pytest.raises(ValueError, match="^eps:"):
        lcn_forward(**_fwd_args(), size=3, eps=eps)


def test_rejects_empty_input():
    x = np.zeros((1, 4, 4, 0), np.float32)
    with pytest.raises(ValueError, match="^x:"):
        lcn_forward(x, x.copy(), x.copy(), np.zeros((1, 4, 4), np.float32), 3)
    with pytest.raises(ValueError, match="^v:"):
        lcn_backward(x, np.ones((1, 4, 4), np.float32), x.copy(), x.copy(), 3)
