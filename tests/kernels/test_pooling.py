"""l2pool_forward/l2pool_backward against a NumPy float64 reference and finite differences."""
import zlib

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from dbmpi._kernels.pooling import l2pool_backward, l2pool_forward
from tests.kernels.spatial_helpers import assert_close, bad_argument_cases, numeric_grad, overlapping, randn

# (N, H, W, C, size, stride): odd and even windows, overlapping and ragged strides.
SHAPES = [
    (1, 1, 1, 1, 1, 1),
    (1, 4, 4, 1, 2, 2),
    (2, 7, 5, 3, 3, 2),
    (3, 8, 11, 2, 2, 3),
    (1, 6, 9, 4, 3, 1),
    (2, 10, 7, 5, 4, 3),
    (2, 9, 13, 16, 5, 2),
]
GRAD_SHAPES = [(2, 5, 6, 2, 2, 1), (1, 7, 5, 3, 3, 2), (2, 8, 7, 2, 3, 3)]


def reference(x, size, stride, eps=1e-6):
    win = sliding_window_view(np.asarray(x, np.float64), (size, size), axis=(1, 2))
    return np.sqrt(eps + (win[:, ::stride, ::stride] ** 2).sum(axis=(-2, -1)))


def out_shape(x, size, stride):
    n, h, w, c = x.shape
    return (n, (h - size) // stride + 1, (w - size) // stride + 1, c)


@pytest.mark.parametrize("eps", [1e-6, 0.5])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_matches_numpy(shape, eps):
    rng = np.random.default_rng(zlib.crc32(repr((shape, eps)).encode()))
    n, h, w, c, size, stride = shape
    x = randn(rng, n, h, w, c)
    y = np.full(out_shape(x, size, stride), np.nan, np.float32)
    assert l2pool_forward(x, y, size, stride, eps) is y
    assert_close(y, reference(x, size, stride, eps), rtol=1e-5, atol=1e-6)


def test_default_eps_and_zero_window():
    x = np.zeros((1, 4, 4, 2), np.float32)
    x[0, 2:, 2:, 1] = 3.0
    y = np.empty((1, 2, 2, 2), np.float32)
    l2pool_forward(x, y, size=2, stride=2)
    np.testing.assert_allclose(y[0, :, :, 0], np.sqrt(1e-6), rtol=1e-6)
    assert y[0, 1, 1, 1] == pytest.approx(6.0)
    gx = np.full_like(x, np.nan)
    l2pool_backward(x, y, np.ones_like(y), gx, size=2, stride=2)
    # All-zero windows have a finite (zero) gradient; the others get x / y.
    assert np.all(np.isfinite(gx))
    np.testing.assert_allclose(gx[0, 2:, 2:, 1], 0.5, rtol=1e-6)
    assert np.count_nonzero(gx) == 4
    # With eps = 0, y == 0 exactly; the backward pass still gives 0, not NaN.
    l2pool_forward(x, y, 2, 2, 0.0)
    assert y[0, 0, 0, 0] == 0.0
    l2pool_backward(x, y, np.ones_like(y), gx, 2, 2)
    assert np.all(np.isfinite(gx))


@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
def test_backward_matches_finite_differences(shape):
    rng = np.random.default_rng(zlib.crc32(repr(shape).encode()))
    n, h, w, c, size, stride = shape
    x = randn(rng, n, h, w, c)
    y = np.empty(out_shape(x, size, stride), np.float32)
    l2pool_forward(x, y, size, stride)
    r = randn(rng, *y.shape)
    gx = np.full_like(x, np.nan)
    assert l2pool_backward(x, y, r, gx, size, stride) is gx
    x64 = x.astype(np.float64)
    want = numeric_grad(lambda: float(np.sum(r * reference(x64, size, stride))), x64)
    assert_close(gx, want, name="gx")


def test_backward_sums_overlapping_windows():
    # size 3, stride 1 on a constant map: every window has y = 3|a|, so gx = cover * sign / 3.
    x = np.full((1, 5, 5, 1), 2.0, np.float32)
    y = np.empty((1, 3, 3, 1), np.float32)
    l2pool_forward(x, y, 3, 1, 0.0)
    gx = np.empty_like(x)
    l2pool_backward(x, y, np.ones_like(y), gx, 3, 1)
    cover = np.array([1, 2, 3, 2, 1], np.float64)
    assert_close(gx[0, :, :, 0], np.outer(cover, cover) / 3.0, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------- argument validation

def _fwd_args():
    x = randn(np.random.default_rng(0), 2, 7, 6, 3)
    return dict(x=x, y=np.zeros((2, 3, 2, 3), np.float32))


def _bwd_args():
    a = _fwd_args()
    return dict(x=a["x"], y=np.ones_like(a["y"]), gy=np.ones_like(a["y"]),
                gx=np.zeros_like(a["x"]))


@pytest.mark.parametrize("name,label,bad",
                         bad_argument_cases(_fwd_args(), outputs={"y"}, primary={"x"}))
def test_forward_rejects_bad_array(name, label, bad):
    args = _fwd_args()
    args[name] = bad
    with pytest.raises(ValueError, match=f"^{name}:"):
        l2pool_forward(**args, size=3, stride=2)


@pytest.mark.parametrize("name,label,bad",
                         bad_argument_cases(_bwd_args(), outputs={"gx"}, primary={"x"}))
def test_backward_rejects_bad_array(name, label, bad):
    args = _bwd_args()
    args[name] = bad
    with pytest.raises(ValueError, match=f"^{name}:"):
        l2pool_backward(**args, size=3, stride=2)


@pytest.mark.parametrize("shift", [0, 5, -5])
def test_backward_refuses_gx_sharing_memory_with_x(shift):
    """gx is zeroed and summed into while x is read: an aliased gx gave wrong gradients."""
    args = _bwd_args()
    args["x"], args["gx"] = overlapping(args["x"], shift)
    with pytest.raises(ValueError, match="^gx: must not share memory with x"):
        l2pool_backward(**args, size=3, stride=2)


def test_backward_refuses_gx_sharing_memory_with_gy():
    args = _bwd_args()
    big = np.zeros(args["gx"].size, np.float32)
    args["gx"] = big.reshape(args["gx"].shape)
    args["gy"] = big[:args["gy"].size].reshape(args["gy"].shape)
    with pytest.raises(ValueError, match="^gx: must not share memory with gy"):
        l2pool_backward(**args, size=3, stride=2)


@pytest.mark.parametrize("kw,name", [
    (dict(size=0, stride=1), "size"), (dict(size=-3, stride=1), "size"),
    (dict(size=3, stride=0), "stride"), (dict(size=3, stride=-2), "stride"),
    (dict(size=7, stride=1), "x"),  # 7 x 6 input, window wider than the image
    (dict(size=8, stride=1), "x"),
])
def test_rejects_bad_geometry(kw, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        l2pool_forward(**_fwd_args(), **kw)
    with pytest.raises(ValueError, match=f"^{name}:"):
        l2pool_backward(**_bwd_args(), **kw)


def test_rejects_negative_eps():
    with pytest.raises(ValueError, match="^eps:"):
        l2pool_forward(**_fwd_args(), size=3, stride=2, eps=-1e-3)
    with pytest.raises(ValueError, match="^eps:"):
        l2pool_forward(**_fwd_args(), size=3, stride=2, eps=float("nan"))


def test_forward_bands_give_the_whole_output():
    """Bands of output rows (any order) are exactly the whole forward; a band leaves the
    other rows alone and reads only its own windows."""
    rng = np.random.default_rng(11)
    x = randn(rng, 2, 9, 7, 3)
    whole = np.empty((2, 4, 3, 3), np.float32)
    l2pool_forward(x, whole, 3, 2)
    y = np.full_like(whole, np.nan)
    for r0, r1 in [(3, 4), (0, 1), (1, 3)]:
        l2pool_forward(x, y, 3, 2, 1e-6, r0, r1)
    assert np.array_equal(y, whole)
    partial = x.copy()
    partial[:, :2] = np.nan  # rows 1-2 read input rows 2-6 only
    partial[:, 7:] = np.nan
    y = np.full_like(whole, np.nan)
    l2pool_forward(partial, y, 3, 2, row_start=1, row_stop=3)
    assert np.array_equal(y[:, 1:3], whole[:, 1:3])
    assert np.isnan(y[:, 0]).all() and np.isnan(y[:, 3]).all()


@pytest.mark.parametrize("band", [(-1, 1), (3, 2), (0, 5)])
def test_forward_rejects_a_band_outside_the_output(band):
    x = np.ones((1, 9, 7, 1), np.float32)
    y = np.empty((1, 4, 3, 1), np.float32)
    with pytest.raises(ValueError, match=r"rows: band"):
        l2pool_forward(x, y, 3, 2, 1e-6, *band)
