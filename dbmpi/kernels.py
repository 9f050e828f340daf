"""The compiled BLAS-backed kernels, imported in one place with a clear error when unbuilt.

Every kernel takes float32 C-contiguous arrays (int32 for labels) and writes into output
arrays the caller owns; a wrong dtype, rank, shape or layout raises ValueError naming the
argument. Activation layout: (batch, units) for dense layers, (batch, rows, cols, maps) for
spatial layers.
"""
_BUILD_HINT = (
    "dbmpi's compiled kernels (dbmpi._kernels.*) are not built. From the source tree run\n"
    "    pip install -e .        (or: python setup.py build_ext --inplace)\n"
    "which compiles cython_kernels/*.pyx (needs Cython, numpy and scipy; no system BLAS)."
)

try:
    from dbmpi._kernels.dense import dense_backward, dense_forward
    from dbmpi._kernels.lcn import lcn_backward, lcn_forward
    from dbmpi._kernels.local import local_backward, local_forward
    from dbmpi._kernels.optim import (
        adagrad_step,
        adam_step,
        axpy,
        axpy_count_nonfinite,
        copy,
        count_nonfinite,
        dot,
        momentum_step,
        multiply,
        nesterov_step,
        scale,
        sgd_step,
    )
    from dbmpi._kernels.outputs import logistic_ova_loss, softmax_xent_loss
    from dbmpi._kernels.pooling import l2pool_backward, l2pool_forward
except ImportError as exc:  # pragma: no cover - exercised only on unbuilt trees
    raise ImportError(f"{_BUILD_HINT}\n(import failed with: {exc})") from exc

ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu")

__all__ = [
    "ACTIVATIONS",
    "adagrad_step",
    "adam_step",
    "axpy",
    "axpy_count_nonfinite",
    "copy",
    "count_nonfinite",
    "dense_backward",
    "dense_forward",
    "dot",
    "l2pool_backward",
    "l2pool_forward",
    "lcn_backward",
    "lcn_forward",
    "local_backward",
    "local_forward",
    "logistic_ova_loss",
    "momentum_step",
    "multiply",
    "nesterov_step",
    "scale",
    "sgd_step",
    "softmax_xent_loss",
]
