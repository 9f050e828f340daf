# cython: language_level=3
"""L2 pooling, per map, over size x size windows with a stride (valid, no padding).

Activations are NHWC. OH = (H - size) // stride + 1, OW likewise, and

    y[n, oh, ow, c] = sqrt(eps + sum_{dy, dx < size} x[n, oh*stride+dy, ow*stride+dx, c]^2)

eps (default 1e-6) keeps y > 0, so the gradient dy/dx = x / y stays finite when a window is
all zeros (at eps = 0 such a window has no gradient; the backward pass then gives it 0).
Sums of squares are accumulated in float64. The backward pass zeroes gx and adds
gy * x / y for every window containing an input (overlapping windows add up).
"""
cimport numpy as cnp
from libc.math cimport sqrt
from libc.stdlib cimport malloc, free
from libc.string cimport memset

from checks cimport check_array, check_band, check_disjoint, check_shape, check_positive

cnp.import_array()


cdef tuple _geometry(cnp.ndarray ax, int size, int stride):
    """Validate size/stride against x and return (OH, OW)."""
    check_positive(size, "size")
    check_positive(stride, "stride")
    cdef Py_ssize_t h = ax.shape[1], w = ax.shape[2]
    if h < size or w < size:
        raise ValueError(f"x: spatial size {h}x{w} is smaller than the {size}x{size} window")
    return ((h - size) // stride + 1, (w - size) // stride + 1)


def l2pool_forward(x, y, int size, int stride, float eps=1e-6, int row_start=0, int row_stop=-1):
    """y[N, OH, OW, C] = sqrt(eps + sum over the window of x^2); returns y.

    Only output rows [row_start, row_stop) are computed (stop -1: the last; the other rows
    of y are left alone): model parallelism computes first the rows its peers need.
    """
    cdef cnp.ndarray ax = check_array(x, "x", 4, cnp.NPY_FLOAT32)
    cdef cnp.ndarray ay = check_array(y, "y", 4, cnp.NPY_FLOAT32, True)
    if not eps >= 0:
        raise ValueError(f"eps: must be non-negative, got {eps}")
    cdef int oh_n, ow_n
    oh_n, ow_n = _geometry(ax, size, stride)
    cdef Py_ssize_t n = ax.shape[0], h = ax.shape[1], w = ax.shape[2], c = ax.shape[3]
    check_shape(ay, "y", (n, oh_n, ow_n, c))
    row_stop = check_band(row_start, row_stop, oh_n)
    cdef float* px = <float*>cnp.PyArray_DATA(ax)
    cdef float* py = <float*>cnp.PyArray_DATA(ay)
    cdef double* acc = <double*>malloc(max(c, 1) * sizeof(double))
    if acc == NULL:
        raise MemoryError()
    cdef Py_ssize_t i, oh, ow, dy, dx, j
    cdef const float* src
    cdef float* dst
    cdef float v
    with nogil:
        for i in range(n):
            for oh in range(row_start, row_stop):
                for ow in range(ow_n):
                    memset(acc, 0, c * sizeof(double))
                    for dy in range(size):
                        for dx in range(size):
                            src = px + ((i * h + oh * stride + dy) * w + ow * stride + dx) * c
                            for j in range(c):
                                v = src[j]
                                acc[j] += <double>v * v
                    dst = py + ((i * oh_n + oh) * ow_n + ow) * c
                    for j in range(c):
                        dst[j] = <float>sqrt(eps + acc[j])
    free(acc)
    return y


def l2pool_backward(x, y, gy, gx, int size, int stride):
    """gx[N, H, W, C] = sum over the windows containing each input of gy * x / y; returns gx.

    y is the output of l2pool_forward (with any eps); a window with y == 0 contributes 0.
    gx is zeroed first, so it must not share memory with x, y or gy (ValueError).
    """
    cdef cnp.ndarray ax = check_array(x, "x", 4, cnp.NPY_FLOAT32)
    cdef cnp.ndarray ay = check_array(y, "y", 4, cnp.NPY_FLOAT32)
    cdef cnp.ndarray agy = check_array(gy, "gy", 4, cnp.NPY_FLOAT32)
    cdef cnp.ndarray agx = check_array(gx, "gx", 4, cnp.NPY_FLOAT32, True)
    cdef int oh_n, ow_n
    oh_n, ow_n = _geometry(ax, size, stride)
    cdef Py_ssize_t n = ax.shape[0], h = ax.shape[1], w = ax.shape[2], c = ax.shape[3]
    check_shape(ay, "y", (n, oh_n, ow_n, c))
    check_shape(agy, "gy", (n, oh_n, ow_n, c))
    check_shape(agx, "gx", (n, h, w, c))
    check_disjoint(agx, "gx", ax, "x")
    check_disjoint(agx, "gx", ay, "y")
    check_disjoint(agx, "gx", agy, "gy")
    cdef float* px = <float*>cnp.PyArray_DATA(ax)
    cdef float* py = <float*>cnp.PyArray_DATA(ay)
    cdef float* pgy = <float*>cnp.PyArray_DATA(agy)
    cdef float* pgx = <float*>cnp.PyArray_DATA(agx)
    cdef float* ratio = <float*>malloc(max(c, 1) * sizeof(float))
    if ratio == NULL:
        raise MemoryError()
    cdef Py_ssize_t i, oh, ow, dy, dx, j, off
    cdef const float* yrow
    cdef const float* grow
    with nogil:
        memset(pgx, 0, n * h * w * c * sizeof(float))
        for i in range(n):
            for oh in range(oh_n):
                for ow in range(ow_n):
                    off = ((i * oh_n + oh) * ow_n + ow) * c
                    yrow = py + off
                    grow = pgy + off
                    for j in range(c):
                        ratio[j] = grow[j] / yrow[j] if yrow[j] != 0 else 0.0
                    for dy in range(size):
                        for dx in range(size):
                            off = ((i * h + oh * stride + dy) * w + ow * stride + dx) * c
                            for j in range(c):
                                pgx[off + j] += ratio[j] * px[off + j]
    free(ratio)
    return gx
