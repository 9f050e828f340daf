# Thin row-major wrappers over scipy.linalg.cython_blas (column-major Fortran BLAS).
# A row-major matrix is the transpose of the same memory read column-major, so
# row-major C = op(A) op(B) is computed as column-major C^T = op(B)^T op(A)^T.
from scipy.linalg.cython_blas cimport sgemm, saxpy, sscal, scopy


cdef inline void gemm(bint trans_a, bint trans_b, int m, int n, int k, float alpha,
                      const float* a, int lda, const float* b, int ldb, float beta,
                      float* c, int ldc) noexcept nogil:
    """Row-major C[m, n] = alpha * op(A) @ op(B) + beta * C (op: transpose when asked)."""
    cdef char ta = b'T' if trans_a else b'N'
    cdef char tb = b'T' if trans_b else b'N'
    if m == 0 or n == 0:
        return
    sgemm(&tb, &ta, &n, &m, &k, &alpha, <float*>b, &ldb, <float*>a, &lda, &beta, c, &ldc)


cdef inline void axpy(int n, float alpha, const float* x, float* y) noexcept nogil:
    """y += alpha * x."""
    cdef int one = 1
    saxpy(&n, &alpha, <float*>x, &one, y, &one)


cdef inline void scal(int n, float alpha, float* x) noexcept nogil:
    """x *= alpha."""
    cdef int one = 1
    sscal(&n, &alpha, x, &one)


cdef inline void copy(int n, const float* x, float* y) noexcept nogil:
    """y = x."""
    cdef int one = 1
    scopy(&n, <float*>x, &one, y, &one)

