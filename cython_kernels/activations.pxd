# Elementwise activations shared by the dense and locally connected kernels.
# Codes: 0 identity, 1 sigmoid, 2 tanh, 3 relu. Derivatives are taken from the
# activation's output y, which is what the layers keep for the backward pass.
from libc.math cimport expf, tanhf

cdef enum:
    ACT_IDENTITY = 0
    ACT_SIGMOID = 1
    ACT_TANH = 2
    ACT_RELU = 3


cdef inline void activate(int act, float* y, Py_ssize_t n) noexcept nogil:
    """y = f(y) in place."""
    cdef Py_ssize_t i
    cdef float v
    if act == ACT_SIGMOID:
        for i in range(n):
            v = y[i]
            # Stable on both tails: never exponentiates a large positive number.
            if v >= 0:
                y[i] = 1.0 / (1.0 + expf(-v))
            else:
                v = expf(v)
                y[i] = v / (1.0 + v)
    elif act == ACT_TANH:
        for i in range(n):
            y[i] = tanhf(y[i])
    elif act == ACT_RELU:
        for i in range(n):
            if y[i] < 0:  # False for NaN, which stays visible
                y[i] = 0


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
