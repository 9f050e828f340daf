# cython: language_level=3
"""Local contrast normalization (Jarrett et al., 2009; Le et al., 2012): subtractive, then
divisive, across all C maps over a size x size spatial window (size odd), NHWC layout.

At the image border the window is clipped and the averages run over in-bounds positions
only. With box(A)[i,j] = sum of A over the clipped window centred at (i,j), n[i,j] the number
of in-bounds positions in it, and sums over c running over the maps:

    m = box(sum_c x) / (C n)          v = x - m            (subtractive)
    s2 = box(sum_c v^2) / (C n)       d = sqrt(s2 + eps)   y = v / d   (divisive)

The window is symmetric, so box is its own transpose and the backward pass is

    gd = -sum_c gy v / d^2            gs2 = gd / (2 d)     gT = box(gs2 / (C n))
    gv = gy / d + 2 v gT              gm = -sum_c gv       gS = box(gm / (C n))
    gx = gv + gS  (gS broadcast over c)

box is evaluated from a float64 summed-area table, so each pass is O(H W) per image
whatever the window size; all the per-position sums are float64. A window larger than the
image is allowed (it is clipped to the image like any border window). eps > 0 keeps d > 0
on constant regions.
"""
cimport numpy as cnp
from libc.math cimport sqrt
from libc.stdlib cimport malloc, free

from checks cimport check_array, check_shape, check_positive

cnp.import_array()


cdef inline void _sat(const double* a, double* s, Py_ssize_t h, Py_ssize_t w) noexcept nogil:
    """Summed-area table s[(h+1), (w+1)]: s[i, j] = sum of a[:i, :j]."""
    cdef Py_ssize_t i, j, w1 = w + 1
    cdef double run
    for j in range(w1):
        s[j] = 0.0
    for i in range(h):
        s[(i + 1) * w1] = 0.0
        run = 0.0
        for j in range(w):
            run += a[i * w + j]
            s[(i + 1) * w1 + j + 1] = s[i * w1 + j + 1] + run


cdef inline double _box(const double* s, Py_ssize_t w, const Py_ssize_t* lo_r,
                        const Py_ssize_t* hi_r, const Py_ssize_t* lo_c, const Py_ssize_t* hi_c,
                        Py_ssize_t i, Py_ssize_t j) noexcept nogil:
    """Sum over rows [lo_r[i], hi_r[i]) x cols [lo_c[j], hi_c[j]) from the table s."""
    cdef Py_ssize_t w1 = w + 1
    return (s[hi_r[i] * w1 + hi_c[j]] - s[lo_r[i] * w1 + hi_c[j]]
            - s[hi_r[i] * w1 + lo_c[j]] + s[lo_r[i] * w1 + lo_c[j]])


cdef class _Workspace:
    """Per-call float64 scratch: one H*W plane, a summed-area table, clipped window bounds."""
    cdef double* plane
    cdef double* table
    cdef Py_ssize_t* bounds

    def __cinit__(self, Py_ssize_t h, Py_ssize_t w):
        self.plane = <double*>malloc(h * w * sizeof(double))
        self.table = <double*>malloc((h + 1) * (w + 1) * sizeof(double))
        self.bounds = <Py_ssize_t*>malloc(2 * (h + w) * sizeof(Py_ssize_t))
        if self.plane == NULL or self.table == NULL or self.bounds == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.plane)
        free(self.table)
        free(self.bounds)


cdef inline void _bounds(Py_ssize_t* lo, Py_ssize_t* hi, Py_ssize_t length,
                         Py_ssize_t half) noexcept nogil:
    """Clipped window [lo[i], hi[i]) of each index i along an axis of the given length."""
    cdef Py_ssize_t i
    for i in range(length):
        lo[i] = i - half if i >= half else 0
        hi[i] = i + half + 1 if i + half + 1 <= length else length


cdef void _check_size(int size) except *:
    check_positive(size, "size")
    if size % 2 == 0:
        raise ValueError(f"size: must be odd, got {size}")


def lcn_forward(x, y, v, d, int size, float eps=1e-2):
    """y = v / d with v = x - local mean, d = sqrt(local variance + eps); returns y.

    x, y, v are (N, H, W, C); d is (N, H, W). v and d are kept for lcn_backward.
    """
    cdef cnp.ndarray ax = check_array(x, "x", 4, cnp.NPY_FLOAT32)
    cdef cnp.ndarray ay = check_array(y, "y", 4, cnp.NPY_FLOAT32, True)
    cdef cnp.ndarray av = check_array(v, "v", 4, cnp.NPY_FLOAT32, True)
    cdef cnp.ndarray ad = check_array(d, "d", 3, cnp.NPY_FLOAT32, True)
    _check_size(size)
    if not eps > 0:
        raise ValueError(f"eps: must be positive, got {eps}")
    cdef Py_ssize_t n = ax.shape[0], h = ax.shape[1], w = ax.shape[2], c = ax.shape[3]
    if h == 0 or w == 0 or c == 0:
        raise ValueError(f"x: needs at least one row, column and map, got shape {(n, h, w, c)}")
    check_shape(ay, "y", (n, h, w, c))
    check_shape(av, "v", (n, h, w, c))
    check_shape(ad, "d", (n, h, w))
    cdef float* px = <float*>cnp.PyArray_DATA(ax)
    cdef float* py = <float*>cnp.PyArray_DATA(ay)
    cdef float* pv = <float*>cnp.PyArray_DATA(av)
    cdef float* pd = <float*>cnp.PyArray_DATA(ad)
    cdef _Workspace ws = _Workspace(h, w)
    cdef double* a = ws.plane
    cdef double* s = ws.table
    cdef Py_ssize_t* lo_r = ws.bounds
    cdef Py_ssize_t* hi_r = lo_r + h
    cdef Py_ssize_t* lo_c = hi_r + h
    cdef Py_ssize_t* hi_c = lo_c + w
    cdef Py_ssize_t b, i, j, k, p, off
    cdef double acc, mean, val, inv
    with nogil:
        _bounds(lo_r, hi_r, h, size // 2)
        _bounds(lo_c, hi_c, w, size // 2)
        for b in range(n):
            # S = sum_c x, then m = box(S) / (C n).
            for p in range(h * w):
                off = (b * h * w + p) * c
                acc = 0.0
                for k in range(c):
                    acc += px[off + k]
                a[p] = acc
            _sat(a, s, h, w)
            for i in range(h):
                for j in range(w):
                    a[i * w + j] = _box(s, w, lo_r, hi_r, lo_c, hi_c, i, j) / (
                        c * (hi_r[i] - lo_r[i]) * (hi_c[j] - lo_c[j]))
            # v = x - m and T = sum_c v^2 (v from the float64 mean, T from the stored v).
            for p in range(h * w):
                off = (b * h * w + p) * c
                mean = a[p]
                acc = 0.0
                for k in range(c):
                    pv[off + k] = <float>(px[off + k] - mean)
                    val = pv[off + k]
                    acc += val * val
                a[p] = acc
            # s2 = box(T) / (C n); d = sqrt(s2 + eps); y = v / d.
            _sat(a, s, h, w)
            for i in range(h):
                for j in range(w):
                    p = i * w + j
                    val = sqrt(_box(s, w, lo_r, hi_r, lo_c, hi_c, i, j) / (
                        c * (hi_r[i] - lo_r[i]) * (hi_c[j] - lo_c[j])) + eps)
                    pd[b * h * w + p] = <float>val
                    inv = 1.0 / val
                    off = (b * h * w + p) * c
                    for k in range(c):
                        py[off + k] = <float>(pv[off + k] * inv)
    return y


def lcn_backward(v, d, gy, gx, int size):
    """gx = dL/dx of lcn_forward given gy = dL/dy and the saved v, d; returns gx.

    v, gy, gx are (N, H, W, C); d is (N, H, W); size must match the forward call.
    gx may be gy itself (each element of gy is read before that element of gx is written).
    """
    cdef cnp.ndarray av = check_array(v, "v", 4, cnp.NPY_FLOAT32)
    cdef cnp.ndarray ad = check_array(d, "d", 3, cnp.NPY_FLOAT32)
    cdef cnp.ndarray agy = check_array(gy, "gy", 4, cnp.NPY_FLOAT32)
    cdef cnp.ndarray agx = check_array(gx, "gx", 4, cnp.NPY_FLOAT32, True)
    _check_size(size)
    cdef Py_ssize_t n = av.shape[0], h = av.shape[1], w = av.shape[2], c = av.shape[3]
    if h == 0 or w == 0 or c == 0:
        raise ValueError(f"v: needs at least one row, column and map, got shape {(n, h, w, c)}")
    check_shape(ad, "d", (n, h, w))
    check_shape(agy, "gy", (n, h, w, c))
    check_shape(agx, "gx", (n, h, w, c))
    cdef float* pv = <float*>cnp.PyArray_DATA(av)
    cdef float* pd = <float*>cnp.PyArray_DATA(ad)
    cdef float* pgy = <float*>cnp.PyArray_DATA(agy)
    cdef float* pgx = <float*>cnp.PyArray_DATA(agx)
    cdef _Workspace ws = _Workspace(h, w)
    cdef double* a = ws.plane
    cdef double* s = ws.table
    cdef Py_ssize_t* lo_r = ws.bounds
    cdef Py_ssize_t* hi_r = lo_r + h
    cdef Py_ssize_t* lo_c = hi_r + h
    cdef Py_ssize_t* hi_c = lo_c + w
    cdef Py_ssize_t b, i, j, k, p, off
    cdef double acc, dd, inv, gt, gv, gs
    with nogil:
        _bounds(lo_r, hi_r, h, size // 2)
        _bounds(lo_c, hi_c, w, size // 2)
        for b in range(n):
            # gs2 / (C n) with gs2 = gd / (2 d), gd = -sum_c gy v / d^2.
            for i in range(h):
                for j in range(w):
                    p = i * w + j
                    off = (b * h * w + p) * c
                    acc = 0.0
                    for k in range(c):
                        acc += <double>pgy[off + k] * pv[off + k]
                    dd = pd[b * h * w + p]
                    a[p] = -acc / (2.0 * dd * dd * dd) / (
                        c * (hi_r[i] - lo_r[i]) * (hi_c[j] - lo_c[j]))
            # gT = box(.); gv = gy / d + 2 v gT into gx; gm / (C n) with gm = -sum_c gv.
            _sat(a, s, h, w)
            for i in range(h):
                for j in range(w):
                    p = i * w + j
                    off = (b * h * w + p) * c
                    gt = _box(s, w, lo_r, hi_r, lo_c, hi_c, i, j)
                    inv = 1.0 / pd[b * h * w + p]
                    acc = 0.0
                    for k in range(c):
                        gv = pgy[off + k] * inv + 2.0 * pv[off + k] * gt
                        pgx[off + k] = <float>gv
                        acc += gv
                    a[p] = -acc / (c * (hi_r[i] - lo_r[i]) * (hi_c[j] - lo_c[j]))
            # gS = box(.); gx = gv + gS.
            _sat(a, s, h, w)
            for i in range(h):
                for j in range(w):
                    p = i * w + j
                    off = (b * h * w + p) * c
                    gs = _box(s, w, lo_r, hi_r, lo_c, hi_c, i, j)
                    for k in range(c):
                        pgx[off + k] = <float>(pgx[off + k] + gs)
    return gx
