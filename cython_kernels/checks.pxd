# Argument validation shared by every kernel entry point. A wrong dtype, rank, shape,
# layout or a read-only output raises ValueError naming the argument, before any
# pointer is touched, so a bad call can never crash or silently compute garbage.
cimport numpy as cnp


cdef inline str _dtype_name(int typenum):
    if typenum == cnp.NPY_FLOAT32:
        return "float32"
    if typenum == cnp.NPY_INT32:
        return "int32"
    if typenum == cnp.NPY_FLOAT64:
        return "float64"
    return str(typenum)


cdef inline cnp.ndarray check_array(object arr, str name, int ndim, int typenum,
                                    bint writeable=False):
    """Return arr as an ndarray after checking type, dtype, rank, C-contiguity, writeability."""
    if not cnp.PyArray_Check(arr):
        raise ValueError(f"{name}: expected a numpy.ndarray, got {type(arr).__name__}")
    cdef cnp.ndarray a = <cnp.ndarray>arr
    if cnp.PyArray_TYPE(a) != typenum:
        raise ValueError(f"{name}: expected dtype {_dtype_name(typenum)}, got {a.dtype}")
    if cnp.PyArray_NDIM(a) != ndim:
        raise ValueError(f"{name}: expected a {ndim}-d array, got shape {tuple((<object>a).shape)}")
    if not cnp.PyArray_IS_C_CONTIGUOUS(a):
        raise ValueError(f"{name}: must be C-contiguous (use numpy.ascontiguousarray)")
    if writeable and not cnp.PyArray_ISWRITEABLE(a):
        raise ValueError(f"{name}: must be writeable")
    return a


cdef inline void check_shape(cnp.ndarray a, str name, tuple expected) except *:
    """Raise ValueError unless a.shape == expected."""
    if tuple((<object>a).shape) != expected:
        raise ValueError(f"{name}: expected shape {expected}, got {tuple((<object>a).shape)}")


cdef inline void check_disjoint(cnp.ndarray out, str name, cnp.ndarray a, str other) except *:
    """Raise ValueError when the output `out` shares memory with the input `a` (an aliased
    output would be written while the input is still read: silently wrong results)."""
    cdef char* p = <char*>cnp.PyArray_DATA(out)
    cdef char* q = <char*>cnp.PyArray_DATA(a)
    if p < q + cnp.PyArray_NBYTES(a) and q < p + cnp.PyArray_NBYTES(out):
        raise ValueError(f"{name}: must not share memory with {other} "
                         f"({name} is written while {other} is still read)")


cdef inline void check_positive(long value, str name) except *:
    if value <= 0:
        raise ValueError(f"{name}: must be positive, got {value}")


cdef inline int check_band(long start, long stop, long rows) except -1:
    """Validate a band [start, stop) of output rows (stop = -1: to the last row); return stop."""
    if stop == -1:
        stop = rows
    if not 0 <= start <= stop <= rows:
        raise ValueError(f"rows: band [{start}, {stop}) is not within the {rows} output rows")
    return stop


cdef inline int check_activation(object activation) except -1:
    """Map an activation name (or code) to its code: 0 identity, 1 sigmoid, 2 tanh, 3 relu."""
    if activation == "identity" or activation == 0:
        return 0
    if activation == "sigmoid" or activation == 1:
        return 1
    if activation == "tanh" or activation == 2:
        return 2
    if activation == "relu" or activation == 3:
        return 3
    raise ValueError(f"activation: unknown activation {activation!r} "
                     "(expected identity, sigmoid, tanh or relu)")
