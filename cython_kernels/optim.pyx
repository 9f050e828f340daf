# cython: language_level=3
"""Optimizer kernels and the shard-local vector ops of Sandblaster L-BFGS.

All act in place on flat float32 vectors (the canonical parameter layout, or a shard's
slice of it). Vectors longer than a BLAS int are processed in chunks. dot multiplies and
accumulates in float64 so partial sums over millions of parameters keep their precision.
"""
cimport numpy as cnp
from libc.math cimport sqrtf, isfinite

from blas cimport axpy as blas_axpy, scal as blas_scal, copy as blas_copy
from checks cimport check_array, check_shape

cnp.import_array()

# Largest chunk handed to a single BLAS call (BLAS lengths are 32-bit ints).
cdef Py_ssize_t CHUNK = 1 << 30


cdef inline cnp.ndarray _vec(object arr, str name, bint writeable=False):
    return check_array(arr, name, 1, cnp.NPY_FLOAT32, writeable)


cdef inline void _same_length(cnp.ndarray a, str name, Py_ssize_t n) except *:
    check_shape(a, name, (n,))


def sgd_step(param, grad, float lr):
    """param -= lr * grad."""
    cdef cnp.ndarray p = _vec(param, "param", True)
    cdef cnp.ndarray g = _vec(grad, "grad")
    cdef Py_ssize_t n = p.shape[0], start, m
    _same_length(g, "grad", n)
    cdef float* pp = <float*>cnp.PyArray_DATA(p)
    cdef float* pg = <float*>cnp.PyArray_DATA(g)
    with nogil:
        start = 0
        while start < n:
            m = min(CHUNK, n - start)
            blas_axpy(<int>m, -lr, pg + start, pp + start)
            start += m


def momentum_step(param, grad, velocity, float lr, float momentum):
    """velocity = momentum * velocity + grad; param -= lr * velocity."""
    cdef cnp.ndarray p = _vec(param, "param", True)
    cdef cnp.ndarray g = _vec(grad, "grad")
    cdef cnp.ndarray v = _vec(velocity, "velocity", True)
    cdef Py_ssize_t n = p.shape[0], i
    _same_length(g, "grad", n)
    _same_length(v, "velocity", n)
    cdef float* pp = <float*>cnp.PyArray_DATA(p)
    cdef float* pg = <float*>cnp.PyArray_DATA(g)
    cdef float* pv = <float*>cnp.PyArray_DATA(v)
    with nogil:
        for i in range(n):
            pv[i] = momentum * pv[i] + pg[i]
            pp[i] -= lr * pv[i]


def adagrad_step(param, grad, accum, float lr, float eps=1e-8):
    """Fused Adagrad: accum += grad**2; param -= lr * grad / (sqrt(accum) + eps).

    The paper's per-parameter rate gamma / sqrt(sum_j g_j^2), in one pass over memory.
    """
    cdef cnp.ndarray p = _vec(param, "param", True)
    cdef cnp.ndarray g = _vec(grad, "grad")
    cdef cnp.ndarray a = _vec(accum, "accum", True)
    cdef Py_ssize_t n = p.shape[0], i
    _same_length(g, "grad", n)
    _same_length(a, "accum", n)
    cdef float* pp = <float*>cnp.PyArray_DATA(p)
    cdef float* pg = <float*>cnp.PyArray_DATA(g)
    cdef float* pa = <float*>cnp.PyArray_DATA(a)
    cdef float gi
    with nogil:
        for i in range(n):
            gi = pg[i]
            pa[i] += gi * gi
            pp[i] -= lr * gi / (sqrtf(pa[i]) + eps)


def nesterov_step(param, grad, velocity, float lr, float momentum):
    """Nesterov momentum as PyTorch writes it: velocity = momentum * velocity + grad;
    param -= lr * (grad + momentum * velocity), in one pass over memory."""
    cdef cnp.ndarray p = _vec(param, "param", True)
    cdef cnp.ndarray g = _vec(grad, "grad")
    cdef cnp.ndarray v = _vec(velocity, "velocity", True)
    cdef Py_ssize_t n = p.shape[0], i
    _same_length(g, "grad", n)
    _same_length(v, "velocity", n)
    cdef float* pp = <float*>cnp.PyArray_DATA(p)
    cdef float* pg = <float*>cnp.PyArray_DATA(g)
    cdef float* pv = <float*>cnp.PyArray_DATA(v)
    cdef float gi, vi
    with nogil:
        for i in range(n):
            gi = pg[i]
            vi = momentum * pv[i] + gi
            pv[i] = vi
            pp[i] -= lr * (gi + momentum * vi)


def adam_step(param, grad, m, v, float step_size, float beta1, float beta2, float inv_sqrt_bc2,
              float eps, float decay=1.0):
    """Fused Adam(W) in one pass over memory, PyTorch's formulation:
    param *= decay (AdamW's decoupled weight decay, 1 - lr * weight_decay; 1 for Adam);
    m = beta1 m + (1 - beta1) grad; v = beta2 v + (1 - beta2) grad**2;
    param -= step_size * m / (sqrt(v) * inv_sqrt_bc2 + eps), where the caller folds the
    bias corrections in: step_size = lr / (1 - beta1**t), inv_sqrt_bc2 = 1 / sqrt(1 - beta2**t)."""
    cdef cnp.ndarray p = _vec(param, "param", True)
    cdef cnp.ndarray g = _vec(grad, "grad")
    cdef cnp.ndarray a = _vec(m, "m", True)
    cdef cnp.ndarray b = _vec(v, "v", True)
    cdef Py_ssize_t n = p.shape[0], i
    _same_length(g, "grad", n)
    _same_length(a, "m", n)
    _same_length(b, "v", n)
    cdef float* pp = <float*>cnp.PyArray_DATA(p)
    cdef float* pg = <float*>cnp.PyArray_DATA(g)
    cdef float* pm = <float*>cnp.PyArray_DATA(a)
    cdef float* pv = <float*>cnp.PyArray_DATA(b)
    cdef float gi, mi, vi, one_b1 = 1.0 - beta1, one_b2 = 1.0 - beta2
    with nogil:
        for i in range(n):
            gi = pg[i]
            mi = beta1 * pm[i] + one_b1 * gi
            vi = beta2 * pv[i] + one_b2 * gi * gi
            pm[i] = mi
            pv[i] = vi
            pp[i] = pp[i] * decay - step_size * mi / (sqrtf(vi) * inv_sqrt_bc2 + eps)


cdef double _dot_f64(const float* a, const float* b, Py_ssize_t n) noexcept nogil:
    """Products and sums in float64 (BLAS dsdot may multiply in float32); four
    independent accumulators so the adds pipeline instead of waiting on each other."""
    cdef double s0 = 0.0, s1 = 0.0, s2 = 0.0, s3 = 0.0
    cdef Py_ssize_t i = 0
    while i + 4 <= n:
        s0 += <double>a[i] * <double>b[i]
        s1 += <double>a[i + 1] * <double>b[i + 1]
        s2 += <double>a[i + 2] * <double>b[i + 2]
        s3 += <double>a[i + 3] * <double>b[i + 3]
        i += 4
    while i < n:
        s0 += <double>a[i] * <double>b[i]
        i += 1
    return (s0 + s1) + (s2 + s3)


def dot(x, y):
    """sum(x * y) with products and sums in float64; returns a Python float."""
    cdef cnp.ndarray a = _vec(x, "x")
    cdef cnp.ndarray b = _vec(y, "y")
    cdef Py_ssize_t n = a.shape[0]
    _same_length(b, "y", n)
    cdef float* pa = <float*>cnp.PyArray_DATA(a)
    cdef float* pb = <float*>cnp.PyArray_DATA(b)
    cdef double total
    with nogil:
        total = _dot_f64(pa, pb, n)
    return total


def axpy(float alpha, x, y):
    """y += alpha * x."""
    cdef cnp.ndarray a = _vec(x, "x")
    cdef cnp.ndarray b = _vec(y, "y", True)
    cdef Py_ssize_t n = a.shape[0], start, m
    _same_length(b, "y", n)
    cdef float* pa = <float*>cnp.PyArray_DATA(a)
    cdef float* pb = <float*>cnp.PyArray_DATA(b)
    with nogil:
        start = 0
        while start < n:
            m = min(CHUNK, n - start)
            blas_axpy(<int>m, alpha, pa + start, pb + start)
            start += m


def scale(float alpha, x):
    """x *= alpha."""
    cdef cnp.ndarray a = _vec(x, "x", True)
    cdef Py_ssize_t n = a.shape[0], start, m
    cdef float* pa = <float*>cnp.PyArray_DATA(a)
    with nogil:
        start = 0
        while start < n:
            m = min(CHUNK, n - start)
            blas_scal(<int>m, alpha, pa + start)
            start += m


def copy(x, out):
    """out = x."""
    cdef cnp.ndarray a = _vec(x, "x")
    cdef cnp.ndarray b = _vec(out, "out", True)
    cdef Py_ssize_t n = a.shape[0], start, m
    _same_length(b, "out", n)
    cdef float* pa = <float*>cnp.PyArray_DATA(a)
    cdef float* pb = <float*>cnp.PyArray_DATA(b)
    with nogil:
        start = 0
        while start < n:
            m = min(CHUNK, n - start)
            blas_copy(<int>m, pa + start, pb + start)
            start += m


def multiply(x, y, out):
    """out = x * y elementwise (out may be x or y)."""
    cdef cnp.ndarray a = _vec(x, "x")
    cdef cnp.ndarray b = _vec(y, "y")
    cdef cnp.ndarray c = _vec(out, "out", True)
    cdef Py_ssize_t n = a.shape[0], i
    _same_length(b, "y", n)
    _same_length(c, "out", n)
    cdef float* pa = <float*>cnp.PyArray_DATA(a)
    cdef float* pb = <float*>cnp.PyArray_DATA(b)
    cdef float* pc = <float*>cnp.PyArray_DATA(c)
    with nogil:
        for i in range(n):
            pc[i] = pa[i] * pb[i]


def count_nonfinite(x):
    """Number of NaN or Inf entries (a push or drain with any is rejected)."""
    cdef cnp.ndarray a = _vec(x, "x")
    cdef Py_ssize_t n = a.shape[0], i, bad = 0
    cdef float* pa = <float*>cnp.PyArray_DATA(a)
    with nogil:
        for i in range(n):
            if not isfinite(pa[i]):
                bad += 1
    return bad


def axpy_count_nonfinite(float alpha, x, y):
    """y += alpha * x, returning how many entries of the new y are NaN or Inf: a replica
    accrues its gradient and learns whether the push must be withheld in one pass."""
    cdef cnp.ndarray a = _vec(x, "x")
    cdef cnp.ndarray b = _vec(y, "y", True)
    cdef Py_ssize_t n = a.shape[0], i, bad = 0
    _same_length(b, "y", n)
    cdef float* pa = <float*>cnp.PyArray_DATA(a)
    cdef float* pb = <float*>cnp.PyArray_DATA(b)
    cdef float v
    with nogil:
        for i in range(n):
            v = pb[i] + alpha * pa[i]
            pb[i] = v
            if not isfinite(v):
                bad += 1
    return bad
