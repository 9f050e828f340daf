# cython: language_level=3
"""Fully connected layer: y = f(x @ w.T + b), w stored output-unit-major as (out, in).

Row-major activations (batch, units). Forward is one sgemm with the bias pre-broadcast
into y (beta = 1), then the activation in place. Backward is two sgemms; the weight
gradient can be scaled and accumulated (gw = accumulate * gw + scale * gz.T @ x), which
with gw = w and scale = -lr fuses an SGD step into the GEMM.
"""
cimport numpy as cnp
from libc.stdlib cimport calloc, free
from libc.string cimport memcpy

from blas cimport gemm
from checks cimport check_array, check_shape, check_activation
from activations cimport activate, activation_grad, dbmpi_add_row_f64

cnp.import_array()


def dense_forward(x, w, b, y, activation="identity"):
    """y[N, out] = f(x[N, in] @ w[out, in].T + b[out]); returns y."""
    cdef cnp.ndarray ax = check_array(x, "x", 2, cnp.NPY_FLOAT32)
    cdef cnp.ndarray aw = check_array(w, "w", 2, cnp.NPY_FLOAT32)
    cdef cnp.ndarray ab = check_array(b, "b", 1, cnp.NPY_FLOAT32)
    cdef cnp.ndarray ay = check_array(y, "y", 2, cnp.NPY_FLOAT32, True)
    cdef int act = check_activation(activation)
    cdef int n = ax.shape[0], n_in = ax.shape[1], n_out = aw.shape[0]
    check_shape(aw, "w", (n_out, n_in))
    check_shape(ab, "b", (n_out,))
    check_shape(ay, "y", (n, n_out))
    cdef float* px = <float*>cnp.PyArray_DATA(ax)
    cdef float* pw = <float*>cnp.PyArray_DATA(aw)
    cdef float* pb = <float*>cnp.PyArray_DATA(ab)
    cdef float* py = <float*>cnp.PyArray_DATA(ay)
    cdef int i
    with nogil:
        for i in range(n):
            memcpy(py + <Py_ssize_t>i * n_out, pb, n_out * sizeof(float))
        gemm(False, True, n, n_out, n_in, 1.0, px, n_in, pw, n_in, 1.0, py, n_out)
        activate(act, py, <Py_ssize_t>n * n_out)
    return y


def dense_backward(x, w, y, gy, gz, gw, gb, gx=None, activation="identity",
                   float scale=1.0, bint accumulate=False):
    """Backward of dense_forward, given gy = dL/dy.

    gz (N, out) receives dL/dz (z = pre-activation); it may be gy itself.
    gx (N, in), when given, receives gz @ w, computed before gw is written, so gw may
    be w itself (fused update). gw = accumulate * gw + scale * gz.T @ x and
    gb = accumulate * gb + scale * sum_rows(gz), the bias sum accumulated in float64.
    """
    cdef cnp.ndarray ax = check_array(x, "x", 2, cnp.NPY_FLOAT32)
    cdef cnp.ndarray aw = check_array(w, "w", 2, cnp.NPY_FLOAT32)
    cdef cnp.ndarray ay = check_array(y, "y", 2, cnp.NPY_FLOAT32)
    cdef cnp.ndarray agy = check_array(gy, "gy", 2, cnp.NPY_FLOAT32)
    cdef cnp.ndarray agz = check_array(gz, "gz", 2, cnp.NPY_FLOAT32, True)
    cdef cnp.ndarray agw = check_array(gw, "gw", 2, cnp.NPY_FLOAT32, True)
    cdef cnp.ndarray agb = check_array(gb, "gb", 1, cnp.NPY_FLOAT32, True)
    cdef cnp.ndarray agx = None
    cdef int act = check_activation(activation)
    cdef int n = ax.shape[0], n_in = ax.shape[1], n_out = aw.shape[0]
    check_shape(aw, "w", (n_out, n_in))
    check_shape(ay, "y", (n, n_out))
    check_shape(agy, "gy", (n, n_out))
    check_shape(agz, "gz", (n, n_out))
    check_shape(agw, "gw", (n_out, n_in))
    check_shape(agb, "gb", (n_out,))
    if gx is not None:
        agx = check_array(gx, "gx", 2, cnp.NPY_FLOAT32, True)
        check_shape(agx, "gx", (n, n_in))
    cdef float* px = <float*>cnp.PyArray_DATA(ax)
    cdef float* pw = <float*>cnp.PyArray_DATA(aw)
    cdef float* py = <float*>cnp.PyArray_DATA(ay)
    cdef float* pgy = <float*>cnp.PyArray_DATA(agy)
    cdef float* pgz = <float*>cnp.PyArray_DATA(agz)
    cdef float* pgw = <float*>cnp.PyArray_DATA(agw)
    cdef float* pgb = <float*>cnp.PyArray_DATA(agb)
    cdef float* pgx = NULL if agx is None else <float*>cnp.PyArray_DATA(agx)
    cdef float beta = 1.0 if accumulate else 0.0
    cdef double* bias_sum = <double*>calloc(max(n_out, 1), sizeof(double))
    if bias_sum == NULL:
        raise MemoryError()
    cdef int i, j
    cdef float* row
    cdef Py_ssize_t at
    with nogil:
        # One pass over gz, a row at a time: its bias sums are added while the row is in L1.
        for i in range(n):
            at = <Py_ssize_t>i * n_out
            activation_grad(act, py + at, pgy + at, pgz + at, n_out)
            dbmpi_add_row_f64(bias_sum, pgz + at, n_out)
        if pgx != NULL:
            gemm(False, False, n, n_in, n_out, 1.0, pgz, n_out, pw, n_in, 0.0, pgx, n_in)
        for j in range(n_out):
            # Not beta * gb when beta is 0: stale NaN in an overwritten gb must not survive.
            if accumulate:
                pgb[j] = <float>(pgb[j] + scale * bias_sum[j])
            else:
                pgb[j] = <float>(scale * bias_sum[j])
        gemm(True, False, n_out, n_in, n, scale, pgz, n_out, px, n_in, beta, pgw, n_in)
    free(bias_sum)
    return gx
