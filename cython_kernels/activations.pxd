# Elementwise activations shared by the dense and locally connected kernels.
# Codes: 0 identity, 1 sigmoid, 2 tanh, 3 relu. Derivatives are taken from the
# activation's output y, which is what the layers keep for the backward pass.
from libc.math cimport tanhf

# The sigmoid loop is plain C: libm expf per element is a call gcc cannot vectorise (about
# 35 cycles per element, over 10% of a dense layer's forward time at 2560 units), while
# this branch-free exp and loop vectorise at -O3 with baseline SSE2 (AVX2 + FMA with
# DBMPI_NATIVE=1). Checked over all 2^32 float32 inputs against the float64 sigmoid: at
# most 3.2 ulp, 1.92e-7 relative, where that exceeds 1e-30 (1.1e-37 absolute below);
# NaN stays NaN. See tests/kernels/test_activations.py.
cdef extern from *:
    """
    #ifndef DBMPI_FAST_SIGMOID_H
    #define DBMPI_FAST_SIGMOID_H
    #include <math.h>
    #include <stdint.h>
    #include <string.h>

    /* exp(-v) for float32, branch-free so that loops calling it auto-vectorise without
       -ffast-math (baseline SSE2 included). x = -v = n ln2 + r with n = rint(x / ln2) (round
       to nearest by the 1.5 * 2^23 magic number), ln2 split Cody-Waite style so that
       n * ln2_hi is exact; e^r on |r| <= ln2 / 2 by the Cephes expf polynomial (about 1 ulp);
       2^n put together in the exponent field.
       |x| is clamped to 88.75 on its bits (an integer min: gcc turns a float compare-and-select
       here into a branch, which stops vectorisation), so n is in [-128, 128]: n = 128 gives the
       bits of +inf (exp(x) > ~2^127.5 returns inf), n + 127 <= 0 gives 0 (exp(x) < ~2^-126.5
       returns 0). NaN is clamped too (to +-inf or 0): callers must pass NaN through themselves. */
    static inline float dbmpi_exp_neg(float v)
    {
        const float magic = 12582912.0f;             /* 1.5 * 2^23 */
        int32_t vb, ab, xb;
        float x;
        memcpy(&vb, &v, sizeof vb);
        ab = vb & 0x7FFFFFFF;                        /* |v| as non-negative int32 bits */
        ab = ab < 0x42B18000 ? ab : 0x42B18000;      /* min(|v|, 88.75f) */
        xb = ab | (~vb & INT32_MIN);            /* with the sign of -v */
        memcpy(&x, &xb, sizeof x);
        float t = x * 1.44269504088896341f + magic;  /* rounds x / ln2 to an integer n */
        float n = t - magic;
        float r = x - n * 0.693359375f;              /* ln2_hi: 9 bits, n * ln2_hi exact */
        r = r - n * -2.12194440e-4f;                 /* ln2_lo = ln2 - ln2_hi */
        /* e^r = 1 + r + r^2 (P0 + P1 r + ... + P5 r^5), by Estrin's scheme: a short dependency
           chain, so more loop iterations overlap in the out-of-order window. */
        float r2 = r * r;
        float a = 5.0000001201e-1f + 1.6666665459e-1f * r;
        float b = 4.1665795894e-2f + 8.3334519073e-3f * r;
        float c = 1.3981999507e-3f + 1.9875691500e-4f * r;
        float q = a + r2 * (b + r2 * c);
        float p = (1.0f + r) + r2 * q;
        /* bits(t) = bits(magic) + n, so the biased exponent of 2^n is k = n + 127. */
        int32_t tb;
        memcpy(&tb, &t, sizeof tb);
        int32_t k = tb - 0x4B400000 + 127;
        k = k < 0 ? 0 : k;
        uint32_t sb = (uint32_t)k << 23;
        float s;
        memcpy(&s, &sb, sizeof s);
        return p * s;
    }

    /* y = 1 / (1 + exp(-y)) in place. Accurate in relative terms on both tails without the
       exp(-|v|) split: the reciprocal keeps exp's relative error, and exp(-v) = inf gives 0.
       Exactly 1 for v > ~16.7 (as the float32 rounding of the true value), exactly 0 for
       v < ~-88.38 (true value below 4e-39). NaN stays NaN: it is added into the denominator
       in place of the 1, because a select that drops the exp or the division for NaN lets
       gcc move that (possibly trapping) work into a branch, which stops if-conversion and
       so vectorisation. */
    static inline void dbmpi_sigmoid_inplace(float *y, Py_ssize_t n)
    {
        Py_ssize_t i;
        for (i = 0; i < n; i++) {
            float v = y[i];
            float one = v != v ? v : 1.0f;           /* off the exp's dependency chain */
            y[i] = 1.0f / (dbmpi_exp_neg(v) + one);
        }
    }

    /* gz = y > 0 ? gy : 0. Both loads happen on every element, so gcc turns the choice into
       a blend and vectorises the loop; Cython's `a if c else b` loads gy only under a branch,
       which on a ReLU layer's random signs mispredicts about half the time (about 0.1 ms of
       a 128 x 512 backward pass). Same values as the branch: NaN in y gives 0. gz may be gy. */
    static inline void dbmpi_relu_grad(const float *y, const float *gy, float *gz, Py_ssize_t n)
    {
        Py_ssize_t i;
        if (gz == gy) {
            for (i = 0; i < n; i++) {
                float g = gz[i];
                gz[i] = y[i] > 0.0f ? g : 0.0f;
            }
        } else {
            for (i = 0; i < n; i++) {
                float g = gy[i];
                gz[i] = y[i] > 0.0f ? g : 0.0f;
            }
        }
    }

    /* sum[j] += row[j] in float64. `restrict` tells gcc the float64 sums and the float32
       row do not overlap (Python builds extensions with -fno-strict-aliasing, so the types
       alone do not), which lets the loop vectorise instead of storing and reloading each
       sum; every sum still adds the rows in the same order, so the result is unchanged. */
    static inline void dbmpi_add_row_f64(double *restrict sum, const float *restrict row,
                                         Py_ssize_t n)
    {
        Py_ssize_t j;
        for (j = 0; j < n; j++)
            sum[j] += (double)row[j];
    }
    #endif
    """
    float dbmpi_exp_neg(float v) noexcept nogil
    void dbmpi_sigmoid_inplace(float* y, Py_ssize_t n) noexcept nogil
    void dbmpi_relu_grad(const float* y, const float* gy, float* gz, Py_ssize_t n) noexcept nogil
    void dbmpi_add_row_f64(double* sum, const float* row, Py_ssize_t n) noexcept nogil

cdef enum:
    ACT_IDENTITY = 0
    ACT_SIGMOID = 1
    ACT_TANH = 2
    ACT_RELU = 3


cdef inline void activate(int act, float* y, Py_ssize_t n) noexcept nogil:
    """y = f(y) in place."""
    cdef Py_ssize_t i
    cdef float zero = 0.0
    if act == ACT_SIGMOID:
        dbmpi_sigmoid_inplace(y, n)
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
        if gz != gy:
            for i in range(n):
                gz[i] = gy[i]
    elif act == ACT_SIGMOID:
        for i in range(n):
            gz[i] = gy[i] * y[i] * (1.0 - y[i])
    elif act == ACT_TANH:
        for i in range(n):
            gz[i] = gy[i] * (1.0 - y[i] * y[i])
    elif act == ACT_RELU:
        dbmpi_relu_grad(y, gy, gz, n)
