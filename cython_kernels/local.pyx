# cython: language_level=3
"""Locally connected 2-D layer: like a convolution, but every output position has its own
(unshared) filter bank -- the layer type of DistBelief's image model (Le et al., 2012).

Activations are NHWC (batch, rows, cols, maps). With kernel k, stride s and a valid
(unpadded) window, OH = (H - k) // s + 1 and OW = (W - k) // s + 1. The patch of output
position (oh, ow) is x[:, oh*s : oh*s+k, ow*s : ow*s+k, :] flattened row-major, i.e. in
(dy, dx, c) order, P = k * k * C values per example. Weights are w[OH, OW, F, P] and biases
b[OH, OW, F]:

    y[:, oh, ow, :] = f(patch(oh, ow) @ w[oh, ow].T + b[oh, ow])

Each position is one sgemm on a contiguous (N, P) patch gathered from x (k row segments of
k*C contiguous floats per example); the result is written straight into y with a leading
dimension of OH*OW*F, so y needs no transpose. Backward mirrors dense_backward: the weight
gradient may be scaled and accumulated, which with gw = w and scale = -lr fuses the SGD step.
"""
cimport numpy as cnp
from libc.stdlib cimport malloc, calloc, free
from libc.string cimport memcpy, memset

from blas cimport gemm
from checks cimport check_array, check_band, check_disjoint, check_shape, check_positive, check_activation
from activations cimport activate, activation_grad

cnp.import_array()


cdef inline void _gather(const float* px, float* patch, int n, int h, int w, int c,
                         int k, int row0, int col0) noexcept nogil:
    """patch[N, k*k*C] = x[:, row0:row0+k, col0:col0+k, :] (k contiguous runs of k*C)."""
    cdef Py_ssize_t i, dy
    cdef Py_ssize_t run = <Py_ssize_t>k * c
    cdef Py_ssize_t p = run * k
    cdef const float* src
    for i in range(n):
        src = px + ((i * h + row0) * <Py_ssize_t>w + col0) * c
        for dy in range(k):
            memcpy(patch + i * p + dy * run, src + dy * <Py_ssize_t>w * c, run * sizeof(float))


cdef inline void _scatter_add(float* pgx, const float* patch, int n, int h, int w, int c,
                              int k, int row0, int col0) noexcept nogil:
    """gx[:, row0:row0+k, col0:col0+k, :] += patch[N, k*k*C] (the transpose of _gather)."""
    cdef Py_ssize_t i, dy, j
    cdef Py_ssize_t run = <Py_ssize_t>k * c
    cdef Py_ssize_t p = run * k
    cdef float* dst
    cdef const float* src
    for i in range(n):
        for dy in range(k):
            dst = pgx + ((i * h + row0 + dy) * <Py_ssize_t>w + col0) * c
            src = patch + i * p + dy * run
            for j in range(run):
                dst[j] += src[j]


cdef tuple _geometry(cnp.ndarray ax, int kernel, int stride):
    """Validate kernel/stride against x and return (OH, OW)."""
    check_positive(kernel, "kernel")
    check_positive(stride, "stride")
    cdef Py_ssize_t h = ax.shape[1], w = ax.shape[2]
    if h < kernel or w < kernel:
        raise ValueError(f"x: spatial size {h}x{w} is smaller than the {kernel}x{kernel} kernel")
    return ((h - kernel) // stride + 1, (w - kernel) // stride + 1)


def local_forward(x, w, b, y, int kernel, int stride, activation="identity",
                  int row_start=0, int row_stop=-1):
    """y[N, OH, OW, F] = f(patch @ w[oh, ow].T + b[oh, ow]) at every output position; returns y.

    x (N, H, W, C); w (OH, OW, F, k*k*C) with patch order (dy, dx, c); b (OH, OW, F).
    Only output rows [row_start, row_stop) are computed (stop -1: the last; the other rows
    of y are left alone), reading only their receptive input rows: model parallelism
    computes the rows it can while halo rows are still in flight.
    """
    cdef cnp.ndarray ax = check_array(x, "x", 4, cnp.NPY_FLOAT32)
    cdef cnp.ndarray aw = check_array(w, "w", 4, cnp.NPY_FLOAT32)
    cdef cnp.ndarray ab = check_array(b, "b", 3, cnp.NPY_FLOAT32)
    cdef cnp.ndarray ay = check_array(y, "y", 4, cnp.NPY_FLOAT32, True)
    cdef int act = check_activation(activation)
    cdef int oh_n, ow_n
    oh_n, ow_n = _geometry(ax, kernel, stride)
    cdef int n = ax.shape[0], h = ax.shape[1], wd = ax.shape[2], c = ax.shape[3]
    cdef int p = kernel * kernel * c
    cdef int f = aw.shape[2]
    check_shape(aw, "w", (oh_n, ow_n, f, p))
    check_shape(ab, "b", (oh_n, ow_n, f))
    check_shape(ay, "y", (n, oh_n, ow_n, f))
    row_stop = check_band(row_start, row_stop, oh_n)
    cdef float* px = <float*>cnp.PyArray_DATA(ax)
    cdef float* pw = <float*>cnp.PyArray_DATA(aw)
    cdef float* pb = <float*>cnp.PyArray_DATA(ab)
    cdef float* py = <float*>cnp.PyArray_DATA(ay)
    cdef float* patch = <float*>malloc(max(<Py_ssize_t>n * p, 1) * sizeof(float))
    if patch == NULL:
        raise MemoryError()
    cdef Py_ssize_t ldy = <Py_ssize_t>oh_n * ow_n * f
    cdef Py_ssize_t pos
    cdef int i, oh, ow
    cdef Py_ssize_t band = <Py_ssize_t>(row_stop - row_start) * ow_n * f
    with nogil:
        for oh in range(row_start, row_stop):
            for ow in range(ow_n):
                pos = <Py_ssize_t>oh * ow_n + ow
                _gather(px, patch, n, h, wd, c, kernel, oh * stride, ow * stride)
                for i in range(n):
                    memcpy(py + i * ldy + pos * f, pb + pos * f, f * sizeof(float))
                gemm(False, True, n, f, p, 1.0, patch, p, pw + pos * f * p, p,
                     1.0, py + pos * f, <int>ldy)
        if band == ldy:
            activate(act, py, <Py_ssize_t>n * ldy)
        else:
            for i in range(n):
                activate(act, py + i * ldy + <Py_ssize_t>row_start * ow_n * f, band)
    free(patch)
    return y


def local_backward(x, w, y, gy, gz, gw, gb, gx=None, kernel=None, stride=None,
                   activation="identity", float scale=1.0, bint accumulate=False,
                   bint params=True):
    """Backward of local_forward, given gy = dL/dy. kernel and stride are required.

    gz (N, OH, OW, F) receives dL/dz (z = pre-activation); it may be gy itself.
    gx (N, H, W, C), when given, receives dL/dx: zeroed, then each position's gz_pos @ w[pos]
    is scatter-added into its patch (overlapping patches add up). All of gx is computed
    before gw is written, so gw may be w itself (fused update, scale = -lr,
    accumulate = True). gx must not share memory with x, w or gz (ValueError).
    With params=False gw and gb are left alone (only gz and gx are computed): model
    parallelism sends gx's halo rows back first and computes the parameter gradients, in a
    second call with gx=None and gy = gz, activation "identity", while they travel.
    gw[pos] = accumulate * gw[pos] + scale * gz_pos.T @ patch(pos) and
    gb[pos] = accumulate * gb[pos] + scale * sum over the batch of gz_pos (float64 sums).
    Returns gx.
    """
    if kernel is None:
        raise ValueError("kernel: required argument missing")
    if stride is None:
        raise ValueError("stride: required argument missing")
    cdef int k = kernel, s = stride
    cdef cnp.ndarray ax = check_array(x, "x", 4, cnp.NPY_FLOAT32)
    cdef cnp.ndarray aw = check_array(w, "w", 4, cnp.NPY_FLOAT32)
    cdef cnp.ndarray ay = check_array(y, "y", 4, cnp.NPY_FLOAT32)
    cdef cnp.ndarray agy = check_array(gy, "gy", 4, cnp.NPY_FLOAT32)
    cdef cnp.ndarray agz = check_array(gz, "gz", 4, cnp.NPY_FLOAT32, True)
    cdef cnp.ndarray agw = check_array(gw, "gw", 4, cnp.NPY_FLOAT32, True)
    cdef cnp.ndarray agb = check_array(gb, "gb", 3, cnp.NPY_FLOAT32, True)
    cdef cnp.ndarray agx = None
    if gx is not None:
        agx = check_array(gx, "gx", 4, cnp.NPY_FLOAT32, True)
    cdef int act = check_activation(activation)
    cdef int oh_n, ow_n
    oh_n, ow_n = _geometry(ax, k, s)
    cdef int n = ax.shape[0], h = ax.shape[1], wd = ax.shape[2], c = ax.shape[3]
    cdef int p = k * k * c
    cdef int f = aw.shape[2]
    check_shape(aw, "w", (oh_n, ow_n, f, p))
    check_shape(ay, "y", (n, oh_n, ow_n, f))
    check_shape(agy, "gy", (n, oh_n, ow_n, f))
    check_shape(agz, "gz", (n, oh_n, ow_n, f))
    check_shape(agw, "gw", (oh_n, ow_n, f, p))
    check_shape(agb, "gb", (oh_n, ow_n, f))
    if agx is not None:
        check_shape(agx, "gx", (n, h, wd, c))
        check_disjoint(agx, "gx", ax, "x")
        check_disjoint(agx, "gx", aw, "w")
        check_disjoint(agx, "gx", agz, "gz")
    cdef float* px = <float*>cnp.PyArray_DATA(ax)
    cdef float* pw = <float*>cnp.PyArray_DATA(aw)
    cdef float* py = <float*>cnp.PyArray_DATA(ay)
    cdef float* pgy = <float*>cnp.PyArray_DATA(agy)
    cdef float* pgz = <float*>cnp.PyArray_DATA(agz)
    cdef float* pgw = <float*>cnp.PyArray_DATA(agw)
    cdef float* pgb = <float*>cnp.PyArray_DATA(agb)
    cdef float* pgx = NULL if agx is None else <float*>cnp.PyArray_DATA(agx)
    cdef float beta = 1.0 if accumulate else 0.0
    cdef float* patch = <float*>malloc(max(<Py_ssize_t>n * p, 1) * sizeof(float))
    cdef double* bias_sum = <double*>calloc(max(f, 1), sizeof(double))
    if patch == NULL or bias_sum == NULL:
        free(patch)
        free(bias_sum)
        raise MemoryError()
    cdef Py_ssize_t ldz = <Py_ssize_t>oh_n * ow_n * f
    cdef Py_ssize_t pos, i
    cdef int oh, ow, j
    cdef float* row
    with nogil:
        activation_grad(act, py, pgy, pgz, <Py_ssize_t>n * ldz)
        # Pass 1: the input gradient, reading w only (gw may be w).
        if pgx != NULL:
            memset(pgx, 0, <Py_ssize_t>n * h * wd * c * sizeof(float))
            for oh in range(oh_n):
                for ow in range(ow_n):
                    pos = <Py_ssize_t>oh * ow_n + ow
                    gemm(False, False, n, p, f, 1.0, pgz + pos * f, <int>ldz,
                         pw + pos * f * p, p, 0.0, patch, p)
                    _scatter_add(pgx, patch, n, h, wd, c, k, oh * s, ow * s)
        # Pass 2: parameter gradients (or the fused update) position by position.
        for oh in range(oh_n if params else 0):
            for ow in range(ow_n):
                pos = <Py_ssize_t>oh * ow_n + ow
                _gather(px, patch, n, h, wd, c, k, oh * s, ow * s)
                gemm(True, False, f, p, n, scale, pgz + pos * f, <int>ldz, patch, p,
                     beta, pgw + pos * f * p, p)
                memset(bias_sum, 0, f * sizeof(double))
                for i in range(n):
                    row = pgz + i * ldz + pos * f
                    for j in range(f):
                        bias_sum[j] += row[j]
                row = pgb + pos * f
                for j in range(f):
                    # Not beta * gb: a stale NaN in gb must not leak when overwriting.
                    if accumulate:
                        row[j] = <float>(row[j] + scale * bias_sum[j])
                    else:
                        row[j] = <float>(scale * bias_sum[j])
    free(patch)
    free(bias_sum)
    return gx
