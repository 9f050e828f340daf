# Elementwise activations shared by the dense and locally connected kernels.
# Codes: 0 identity, 1 sigmoid, 2 tanh, 3 relu. Derivatives are taken from the
# activation's output y, which is what the layers keep for the backward pass.
from libc.math cimport expf, fabsf, tanhf

cdef enum:
    ACT_IDENTITY = 0
    ACT_SIGMOID = 1
    ACT_TANH = 2
    ACT_RELU = 3


cdef inline void activate(int act, float* y, Py_ssize_t n) noexcept nogil:
    """y = f(y) in place."""
    cdef Py_ssize_t i
    cdef float v, e, one = 1.0, zero = 0.0
    if act == ACT_SIGMOID:
        for i in range(n):
            # Stable on both tails and branch-free: e = exp(-|v|) never overflows, and
            # sigmoid(v) = 1 / (1 + e) for v >= 0, e / (1 + e) for v < 0.
            v = y[i]
            e = expf(-fabsf(v))
            y[i] = (one if v >= 0 else e) / (one + e)
    elif act == ACT_TANH:
        for i in range(n):
            y[i] = tanhf(y[i])
    elif act == ACT_RELU:
        for i in range(n):
            # A select, not a branch (vectorises); NaN compares false and stays visible.
            y[i] = zero if y[i] < zero else y[i]


cdef inline void activation_grad(int act, const float* y, const float* gy, float* gz,
                                 Py_ssize_t n) noexcept nogil:
    """gz = gy * f'(z), with f'(z) written in terms of y = f(z)."""
    cdef Py_ssize_t i
    if act == ACT_IDENTITY:
        for i in range(n):
            gz[i] = gy[i]
    elif act == ACT_SIGMOID:
        for i in range(n):
            gz[i] = gy[i] * y[i] * (1.0 - y[i])
    elif act == ACT_TANH:
        for i in range(n):
            gz[i] = gy[i] * (1.0 - y[i] * y[i])
    elif act == ACT_RELU:
        for i in range(n):
            gz[i] = gy[i] if y[i] > 0 else 0.0
