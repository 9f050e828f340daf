# cython: language_level=3
"""Output layers with their losses fused to the gradient, numerically stable.

softmax_xent_loss: softmax over K classes and cross-entropy with integer labels.
logistic_ova_loss: K independent sigmoids with one-vs-all binary cross-entropy (the
paper's ImageNet output). Both return the loss summed over the batch times `scale`
(default 1/N, the mean), accumulated in float64, and write scale * dL/dlogits.
"""
cimport numpy as cnp
from libc.math cimport exp, log, log1p, fabs

from checks cimport check_array, check_shape

cnp.import_array()


cdef inline void _check_labels(const int* labels, int n, int k) except *:
    cdef int i
    for i in range(n):
        if labels[i] < 0 or labels[i] >= k:
            raise ValueError(f"labels: label {labels[i]} at row {i} is outside [0, {k})")


def softmax_xent_loss(logits, labels, probs, grad=None, scale=None):
    """Softmax cross-entropy. probs (N, K) receives softmax(logits); grad, when given,
    receives scale * (probs - onehot(labels)). Returns scale * sum_i -log p[i, label_i]."""
    cdef cnp.ndarray az = check_array(logits, "logits", 2, cnp.NPY_FLOAT32)
    cdef cnp.ndarray al = check_array(labels, "labels", 1, cnp.NPY_INT32)
    cdef cnp.ndarray ap = check_array(probs, "probs", 2, cnp.NPY_FLOAT32, True)
    cdef cnp.ndarray ag = None
    cdef int n = az.shape[0], k = az.shape[1]
    if k < 1:
        raise ValueError("logits: needs at least one class")
    check_shape(al, "labels", (n,))
    check_shape(ap, "probs", (n, k))
    if grad is not None:
        ag = check_array(grad, "grad", 2, cnp.NPY_FLOAT32, True)
        check_shape(ag, "grad", (n, k))
    cdef double s = (1.0 / n if n > 0 else 0.0) if scale is None else float(scale)
    cdef float* pz = <float*>cnp.PyArray_DATA(az)
    cdef int* pl = <int*>cnp.PyArray_DATA(al)
    cdef float* pp = <float*>cnp.PyArray_DATA(ap)
    cdef float* pg = NULL if ag is None else <float*>cnp.PyArray_DATA(ag)
    _check_labels(pl, n, k)
    cdef double total = 0.0, zmax, denom, e
    cdef int i, j
    cdef float* z
    cdef float* p
    with nogil:
        for i in range(n):
            z = pz + <Py_ssize_t>i * k
            p = pp + <Py_ssize_t>i * k
            zmax = z[0]
            for j in range(1, k):
                if z[j] > zmax:
                    zmax = z[j]
            denom = 0.0
            for j in range(k):
                e = exp(z[j] - zmax)
                p[j] = <float>e
                denom += e
            for j in range(k):
                p[j] = <float>(p[j] / denom)
            # -log softmax computed from the logits: no log(0) when a probability underflows.
            total += log(denom) - (z[pl[i]] - zmax)
            if pg != NULL:
                for j in range(k):
                    pg[<Py_ssize_t>i * k + j] = <float>(s * p[j])
                pg[<Py_ssize_t>i * k + pl[i]] -= <float>s
    return s * total


def logistic_ova_loss(logits, labels, probs, grad=None, scale=None):
    """One-vs-all logistic outputs. probs (N, K) receives sigmoid(logits); grad, when given,
    receives scale * (probs - onehot(labels)). Returns scale * sum of the N*K binary
    cross-entropies."""
    cdef cnp.ndarray az = check_array(logits, "logits", 2, cnp.NPY_FLOAT32)
    cdef cnp.ndarray al = check_array(labels, "labels", 1, cnp.NPY_INT32)
    cdef cnp.ndarray ap = check_array(probs, "probs", 2, cnp.NPY_FLOAT32, True)
    cdef cnp.ndarray ag = None
    cdef int n = az.shape[0], k = az.shape[1]
    if k < 1:
        raise ValueError("logits: needs at least one class")
    check_shape(al, "labels", (n,))
    check_shape(ap, "probs", (n, k))
    if grad is not None:
        ag = check_array(grad, "grad", 2, cnp.NPY_FLOAT32, True)
        check_shape(ag, "grad", (n, k))
    cdef double s = (1.0 / n if n > 0 else 0.0) if scale is None else float(scale)
    cdef float* pz = <float*>cnp.PyArray_DATA(az)
    cdef int* pl = <int*>cnp.PyArray_DATA(al)
    cdef float* pp = <float*>cnp.PyArray_DATA(ap)
    cdef float* pg = NULL if ag is None else <float*>cnp.PyArray_DATA(ag)
    _check_labels(pl, n, k)
    cdef double total = 0.0, z, t, p
    cdef int i, j
    cdef Py_ssize_t idx
    with nogil:
        for i in range(n):
            for j in range(k):
                idx = <Py_ssize_t>i * k + j
                z = pz[idx]
                t = 1.0 if j == pl[i] else 0.0
                if z >= 0:
                    p = 1.0 / (1.0 + exp(-z))
                else:
                    p = exp(z) / (1.0 + exp(z))
                pp[idx] = <float>p
                # BCE(sigmoid(z), t) = max(z, 0) - z t + log(1 + exp(-|z|))
                total += (z if z > 0 else 0.0) - z * t + log1p(exp(-fabs(z)))
                if pg != NULL:
                    pg[idx] = <float>(s * (p - t))
    return s * total
