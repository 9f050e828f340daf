"""local_forward/local_backward against a NumPy float64 reference and finite differences."""
import zlib

import numpy as np
import pytest
from numpy.lib.stride_tricks import sliding_window_view

from dbmpi._kernels.local import local_backward, local_forward
from tests.kernels.spatial_helpers import (
    ACTIVATIONS,
    activate64,
    assert_close,
    bad_argument_cases,
    numeric_grad,
    overlapping,
    randn,
)

# (N, H, W, C, F, kernel, stride): odd and even sizes, non-square images, ragged strides.
FORWARD_SHAPES = [
    (1, 1, 1, 1, 1, 1, 1),
    (1, 5, 5, 1, 1, 1, 1),
    (2, 7, 5, 3, 4, 3, 2),
    (3, 8, 11, 2, 3, 2, 3),
    (1, 6, 9, 2, 5, 3, 1),
    (2, 10, 7, 4, 2, 4, 3),
    (4, 9, 9, 3, 6, 5, 2),
    (2, 12, 16, 8, 16, 5, 1),
]
GRAD_SHAPES = [
    (2, 5, 5, 2, 3, 2, 1),
    (1, 6, 7, 1, 2, 3, 2),
    (2, 7, 5, 2, 2, 2, 3),
]


def out_hw(h, w, k, s):
    return (h - k) // s + 1, (w - k) // s + 1


def patches64(x, k, s):
    """(N, OH, OW, k*k*C) patches in (dy, dx, c) order, float64."""
    n, h, w, c = x.shape
    v = sliding_window_view(np.asarray(x, np.float64), (k, k), axis=(1, 2))[:, ::s, ::s]
    oh, ow = v.shape[1:3]
    return v.transpose(0, 1, 2, 4, 5, 3).reshape(n, oh, ow, k * k * c)


def pre64(x, w, b, k, s):
    return np.einsum("nabp,abfp->nabf", patches64(x, k, s), np.asarray(w, np.float64)) + b


def reference(x, w, b, k, s, act):
    return activate64(pre64(x, w, b, k, s), act)


def make(rng, n, h, wd, c, f, k, s, act="identity"):
    """Random x, w, b (float32); for relu, resampled until no pre-activation is near 0."""
    oh, ow = out_hw(h, wd, k, s)
    for _ in range(100):
        x = randn(rng, n, h, wd, c)
        w = randn(rng, oh, ow, f, k * k * c, scale=0.5)
        b = randn(rng, oh, ow, f)
        if act != "relu" or np.abs(pre64(x, w, b, k, s)).min() > 1e-2:
            return x, w, b
    raise AssertionError("could not draw data away from the relu kink")


def run_forward(x, w, b, k, s, act):
    n, h, wd, _ = x.shape
    oh, ow = out_hw(h, wd, k, s)
    y = np.full((n, oh, ow, w.shape[2]), np.nan, np.float32)
    assert local_forward(x, w, b, y, k, s, act) is y
    return y


def run_backward(x, w, y, gy, k, s, act, with_gx=True, **kw):
    gz = np.full_like(y, np.nan)
    gw = np.full_like(w, np.nan)
    gb = np.full(w.shape[:3], np.nan, np.float32)
    gx = np.full_like(x, np.nan) if with_gx else None
    ret = local_backward(x, w, y, gy, gz, gw, gb, gx, kernel=k, stride=s, activation=act, **kw)
    assert ret is gx
    return gz, gw, gb, gx


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", FORWARD_SHAPES, ids=str)
def test_forward_matches_numpy(act, shape):
    rng = np.random.default_rng(zlib.crc32(repr((act, shape)).encode()))
    n, h, wd, c, f, k, s = shape
    x, w, b = make(rng, *shape)
    y = run_forward(x, w, b, k, s, act)
    assert_close(y, reference(x, w, b, k, s, act), rtol=1e-5, atol=1e-5)


def test_forward_positional_and_default_activation():
    rng = np.random.default_rng(1)
    x, w, b = make(rng, 2, 6, 5, 2, 3, 3, 2)
    y = np.empty((2, 2, 2, 3), np.float32)
    local_forward(x, w, b, y, 3, 2)
    assert_close(y, reference(x, w, b, 3, 2, "identity"), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("shape", GRAD_SHAPES, ids=str)
def test_backward_matches_finite_differences(act, shape):
    rng = np.random.default_rng(zlib.crc32(repr((act, shape, "grad")).encode()))
    n, h, wd, c, f, k, s = shape
    x, w, b = make(rng, *shape, act=act)
    y = run_forward(x, w, b, k, s, act)
    r = randn(rng, *y.shape)
    gz, gw, gb, gx = run_backward(x, w, y, r.copy(), k, s, act)

    x64, w64, b64 = (a.astype(np.float64) for a in (x, w, b))

    def loss():
        return float(np.sum(r * reference(x64, w64, b64, k, s, act)))

    assert_close(gx, numeric_grad(loss, x64), name="gx")
    assert_close(gw, numeric_grad(loss, w64), name="gw")
    assert_close(gb, numeric_grad(loss, b64), name="gb")
    z = pre64(x, w, b, k, s)
    dz = {"identity": np.ones_like(z), "relu": (z > 0).astype(float),
          "sigmoid": activate64(z, "sigmoid") * (1 - activate64(z, "sigmoid")),
          "tanh": 1 - np.tanh(z) ** 2}[act]
    assert_close(gz, r * dz, rtol=1e-4, atol=1e-5, name="gz")


def grads(seed=0, act="tanh", shape=(3, 7, 6, 2, 3, 3, 2)):
    rng = np.random.default_rng(seed)
    n, h, wd, c, f, k, s = shape
    x, w, b = make(rng, *shape)
    y = run_forward(x, w, b, k, s, act)
    gy = randn(rng, *y.shape)
    return x, w, b, y, gy, k, s, act, run_backward(x, w, y, gy, k, s, act)


def test_gz_may_alias_gy_and_gx_is_optional():
    x, w, b, y, gy, k, s, act, (gz, gw, gb, gx) = grads()
    g = gy.copy()
    gw2 = np.empty_like(w)
    gb2 = np.empty_like(b)
    assert local_backward(x, w, y, g, g, gw2, gb2, None, k, s, act) is None
    np.testing.assert_array_equal(g, gz)
    np.testing.assert_array_equal(gw2, gw)
    np.testing.assert_array_equal(gb2, gb)


def test_scale_and_accumulate():
    x, w, b, y, gy, k, s, act, (gz, gw, gb, gx) = grads(seed=3)
    rng = np.random.default_rng(4)
    gw0, gb0 = randn(rng, *gw.shape), randn(rng, *gb.shape)
    # accumulate=False overwrites (stale contents ignored) and scales.
    gw1, gb1 = np.full_like(gw, np.nan), np.full_like(gb, np.nan)
    local_backward(x, w, y, gy, np.empty_like(gz), gw1, gb1, None, k, s, act, scale=-0.25)
    assert_close(gw1, -0.25 * gw, rtol=1e-5, atol=1e-6)
    assert_close(gb1, -0.25 * gb, rtol=1e-5, atol=1e-6)
    # accumulate=True adds scale * gradient to what is there.
    gw2, gb2 = gw0.copy(), gb0.copy()
    local_backward(x, w, y, gy, np.empty_like(gz), gw2, gb2, None, k, s, act,
                   scale=0.5, accumulate=True)
    assert_close(gw2, gw0 + 0.5 * gw, rtol=1e-5, atol=1e-6)
    assert_close(gb2, gb0 + 0.5 * gb, rtol=1e-5, atol=1e-6)


def test_fused_sgd_update_with_gw_aliasing_w():
    x, w, b, y, gy, k, s, act, (gz, gw, gb, gx) = grads(seed=5, act="sigmoid")
    lr = 0.1
    w_upd, b_upd = w.copy(), b.copy()
    gx2 = np.full_like(x, np.nan)
    local_backward(x, w_upd, y, gy, np.empty_like(gz), w_upd, b_upd, gx2, kernel=k,
                   stride=s, activation=act, scale=-lr, accumulate=True)
    # gx was computed from the weights before the update.
    np.testing.assert_array_equal(gx2, gx)
    assert_close(w_upd, w - lr * gw, rtol=1e-5, atol=1e-6)
    assert_close(b_upd, b - lr * gb, rtol=1e-5, atol=1e-6)


def test_gx_sums_overlapping_patches():
    # Identity layer, one input map, one filter of ones: gx counts the patches covering x.
    x = np.zeros((1, 5, 5, 1), np.float32)
    w = np.ones((3, 3, 1, 9), np.float32)
    y = np.zeros((1, 3, 3, 1), np.float32)
    gy = np.ones_like(y)
    gx = np.full_like(x, np.nan)
    local_backward(x, w, y, gy, np.empty_like(y), np.empty_like(w),
                   np.empty((3, 3, 1), np.float32), gx, kernel=3, stride=1)
    cover = np.array([1, 2, 3, 2, 1], np.float32)
    np.testing.assert_array_equal(gx[0, :, :, 0], np.outer(cover, cover))


# ---------------------------------------------------------------- argument validation

def _fwd_args():
    rng = np.random.default_rng(7)
    x, w, b = make(rng, 2, 6, 5, 2, 3, 3, 2)
    return dict(x=x, w=w, b=b, y=np.zeros((2, 2, 2, 3), np.float32))


def _bwd_args():
    a = _fwd_args()
    y = a["y"]
    return dict(x=a["x"], w=a["w"], y=y, gy=np.ones_like(y), gz=np.zeros_like(y),
                gw=np.zeros_like(a["w"]), gb=np.zeros_like(a["b"]), gx=np.zeros_like(a["x"]))


@pytest.mark.parametrize("name,label,bad",
                         bad_argument_cases(_fwd_args(), outputs={"y"}, primary={"x"}))
def test_forward_rejects_bad_array(name, label, bad):
    args = _fwd_args()
    args[name] = bad
    with pytest.raises(ValueError, match=f"^{name}:"):
        local_forward(**args, kernel=3, stride=2)


@pytest.mark.parametrize("name,label,bad",
                         bad_argument_cases(_bwd_args(), outputs={"gz", "gw", "gb", "gx"},
                                            primary={"x"}))
def test_backward_rejects_bad_array(name, label, bad):
    args = _bwd_args()
    args[name] = bad
    with pytest.raises(ValueError, match=f"^{name}:"):
        local_backward(**args, kernel=3, stride=2)


@pytest.mark.parametrize("shift", [0, 7, -7])
def test_backward_refuses_gx_sharing_memory_with_x(shift):
    """x is read (pass 2) after gx is written (pass 1): an aliased gx gave wrong gradients."""
    args = _bwd_args()
    args["x"], args["gx"] = overlapping(args["x"], shift)
    with pytest.raises(ValueError, match="^gx: must not share memory with x"):
        local_backward(**args, kernel=3, stride=2)


@pytest.mark.parametrize("kw,name", [
    (dict(kernel=0, stride=1), "kernel"), (dict(kernel=-2, stride=1), "kernel"),
    (dict(kernel=3, stride=0), "stride"), (dict(kernel=3, stride=-1), "stride"),
    (dict(kernel=7, stride=1), "x"),  # input (6 x 5) smaller than the window
    (dict(kernel=6, stride=1), "x"),
])
def test_rejects_bad_geometry(kw, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        local_forward(**_fwd_args(), **kw)
    with pytest.raises(ValueError, match=f"^{name}:"):
        local_backward(**_bwd_args(), **kw)


def test_rejects_bad_activation_and_missing_geometry():
    with pytest.raises(ValueError, match="^activation:"):
        local_forward(**_fwd_args(), kernel=3, stride=2, activation="softplus")
    with pytest.raises(ValueError, match="^activation:"):
        local_backward(**_bwd_args(), kernel=3, stride=2, activation="softplus")
    with pytest.raises(ValueError, match="^kernel:"):
        local_backward(**_bwd_args(), stride=2)
    with pytest.raises(ValueError, match="^stride:"):
        local_backward(**_bwd_args(), kernel=3)
    with pytest.raises(TypeError):
        local_forward(*_fwd_args().values())


@pytest.mark.parametrize("act", ACTIVATIONS)
def test_forward_bands_in_any_order_give_the_whole_output(act):
    """Model parallelism computes a block's rows in bands (interior first, border after):
    together they are exactly the whole forward, and a band leaves the other rows alone."""
    rng = np.random.default_rng(7)
    n, h, wd, c, f, k, s = 3, 11, 7, 2, 3, 3, 2  # 5 output rows
    x, w, b = make(rng, n, h, wd, c, f, k, s, act)
    whole = run_forward(x, w, b, k, s, act)
    y = np.full_like(whole, np.nan)
    for r0, r1 in [(2, 4), (0, 2), (4, 5), (3, 3)]:
        local_forward(x, w, b, y, k, s, act, r0, r1)
    assert np.array_equal(y, whole)
    y = np.full_like(whole, np.nan)
    local_forward(x, w, b, y, k, s, act, row_start=1, row_stop=3)
    assert np.array_equal(y[:, 1:3], whole[:, 1:3])
    assert np.isnan(y[:, :1]).all() and np.isnan(y[:, 3:]).all()


def test_forward_band_reads_only_its_receptive_rows():
    """Rows 1-2 of a 3x3/1 layer read input rows 1-4: the others may be garbage (halo rows
    still in flight)."""
    rng = np.random.default_rng(8)
    x, w, b = make(rng, 2, 7, 6, 2, 3, 3, 1)
    whole = run_forward(x, w, b, 3, 1, "tanh")
    partial = x.copy()
    partial[:, 0] = np.nan
    partial[:, 5:] = np.nan
    y = np.empty_like(whole)
    local_forward(partial, w, b, y, 3, 1, "tanh", 1, 3)
    assert np.array_equal(y[:, 1:3], whole[:, 1:3])


@pytest.mark.parametrize("band", [(-1, 2), (2, 1), (0, 6), (6, 6)])
def test_forward_rejects_a_band_outside_the_output(band):
    rng = np.random.default_rng(9)
    x, w, b = make(rng, 1, 7, 6, 1, 2, 3, 1)  # 5 output rows
    y = np.empty((1, 5, 4, 2), np.float32)
    with pytest.raises(ValueError, match=r"rows: band"):
        local_forward(x, w, b, y, 3, 1, "identity", *band)


@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("lr", [None, 0.1])
def test_backward_in_two_calls_equals_one(act, lr):
    """params=False computes gz and gx only; a second call from gz (identity, gx None)
    gives the parameter gradients: together bit for bit one call's (the fused update too)."""
    rng = np.random.default_rng(10)
    n, h, wd, c, f, k, s = 3, 8, 7, 2, 3, 3, 2
    x, w, b = make(rng, n, h, wd, c, f, k, s, act)
    y = run_forward(x, w, b, k, s, act)
    gy = randn(rng, *y.shape)
    if lr is None:
        gz, gw, gb, gx = run_backward(x, w, y, gy.copy(), k, s, act)
        targets = np.full_like(w, np.nan), np.full(w.shape[:3], np.nan, np.float32)
        scale, acc = 1.0, False
    else:
        w_fused, b_fused = w.copy(), b.copy()
        local_backward(x, w_fused, y, gy.copy(), np.empty_like(y), w_fused, b_fused, None,
                       k, s, act, -lr, True)
        targets = w.copy(), b.copy()
        scale, acc = -lr, True
    g = gy.copy()
    split_gx = np.full_like(x, np.nan)
    untouched = np.full_like(w, np.nan), np.full(w.shape[:3], np.nan, np.float32)
    local_backward(x, w if lr is None else targets[0], y, g, g, *untouched, split_gx, k, s, act,
                   params=False)
    assert np.isnan(untouched[0]).all() and np.isnan(untouched[1]).all()
    local_backward(x, targets[0], y, g, g, *targets, None, k, s, "identity", scale, acc)
    if lr is None:
        assert np.array_equal(split_gx, gx) and np.array_equal(g, gz)
        assert np.array_equal(targets[0], gw) and np.array_equal(targets[1], gb)
    else:
        assert np.array_equal(targets[0], w_fused) and np.array_equal(targets[1], b_fused)
