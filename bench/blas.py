"""The MLP step's sgemms on each BLAS library a user can load, one thread, in one run.

The eight sgemm calls of one fused SGD step of the 784-512-512-10 MLP at batch 128, issued
exactly as dbmpi's dense kernels issue them (column-major, the same transposes, alpha and
beta), through ctypes on: the OpenBLAS that SciPy bundles (what dbmpi's kernels link), the
one numpy bundles (ILP64), `pip install scipy-openblas32` when installed, any library given
with --lib PATH[:SYMBOL] (a Debian libopenblas0-pthread or libblis, say), and PyTorch's own
backend (torch.mm/addmm) when torch is installed. Prints one JSON object per library and,
last, {"sgemm_step_ms": {library: ms}, "fastest_over_scipy": ratio}.

    python bench/blas.py [--quick] [--lib /usr/lib/x86_64-linux-gnu/libblis.so.4:sgemm_]
"""
import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import ctypes  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from kernels import timeit  # noqa: E402  (the same timing rule as the kernel benchmarks)

N = 128
LAYERS = [(784, 512), (512, 512), (512, 10)]  # (inputs, units)
SCIPY = "scipy's OpenBLAS (dbmpi's kernels)"


def bundled(package, pattern):
    """Path of a library a wheel bundles in <site-packages>/<package>.libs, or None."""
    site = os.path.dirname(os.path.dirname(np.__file__))
    found = sorted(glob.glob(os.path.join(site, f"{package}.libs", pattern)))
    return found[0] if found else None


def libraries(extra):
    """(name, path, symbol, integer type) of every library to measure that is present."""
    found = [(SCIPY, bundled("scipy", "libscipy_openblas-*.so"),
              "scipy_sgemm_", ctypes.c_int),
             ("numpy's OpenBLAS (ILP64)", bundled("numpy", "libscipy_openblas64_*.so"),
              "scipy_sgemm_64_", ctypes.c_int64)]
    try:
        import scipy_openblas32
        found.append((f"scipy-openblas32 {scipy_openblas32.__version__}",
                      os.path.join(scipy_openblas32.get_lib_dir(), scipy_openblas32.get_library(True)),
                      "scipy_sgemm_", ctypes.c_int))
    except ImportError:
        pass
    for spec in extra:
        path, _, symbol = spec.partition(":")
        found.append((path, path, symbol or "sgemm_", ctypes.c_int))
    return [entry for entry in found if entry[1] is not None]


class StepGemms:
    """The step's sgemm calls on one library, as dense_forward/dense_backward make them."""

    def __init__(self, path, symbol, int_type):
        self.sgemm = getattr(ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL), symbol)
        self.sgemm.restype = None
        self.int = int_type
        self.keep = []  # the arrays and scalars the calls point at

    def call(self, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc):
        """A bound column-major sgemm call (Fortran: every argument by reference)."""
        ints = [self.int(v) for v in (m, n, k, lda, ldb, ldc)]
        scalars = [ctypes.c_char(ta), ctypes.c_char(tb), ctypes.c_float(alpha), ctypes.c_float(beta)]
        self.keep += [a, b, c, ints, scalars]
        ptr = [arr.ctypes.data_as(ctypes.POINTER(ctypes.c_float)) for arr in (a, b, c)]
        ref = ctypes.byref
        args = (ref(scalars[0]), ref(scalars[1]), ref(ints[0]), ref(ints[1]), ref(ints[2]), ref(scalars[2]),
                ptr[0], ref(ints[3]), ptr[1], ref(ints[4]), ref(scalars[3]), ptr[2], ref(ints[5]))
        return lambda: self.sgemm(*args)

    def calls(self, rng):
        """(label, flops, call) of the forward, input-gradient (not the first layer's) and
        fused weight-update sgemms of every layer."""
        out = []
        for index, (n_in, n_out) in enumerate(LAYERS):
            x = rng.random((N, n_in), dtype=np.float32)
            w = (0.01 * rng.standard_normal((n_out, n_in))).astype(np.float32)
            y, gz = np.zeros((N, n_out), np.float32), (1e-3 * rng.standard_normal((N, n_out))).astype(np.float32)
            gx, flops = np.empty((N, n_in), np.float32), 2 * N * n_in * n_out
            out.append((f"L{index}.forward", flops, self.call(b"T", b"N", n_out, N, n_in, 1.0, w, n_in, x, n_in,
                                                             1.0, y, n_out)))
            if index > 0:
                out.append((f"L{index}.grad_x", flops, self.call(b"N", b"N", n_in, N, n_out, 1.0, w, n_in, gz,
                                                                n_out, 0.0, gx, n_in)))
            out.append((f"L{index}.update_w", flops, self.call(b"N", b"T", n_in, n_out, N, -1e-3, x, n_in, gz,
                                                              n_out, 1.0, w, n_in)))
        return out


def measure(calls, repeats):
    """Total ms of the calls and each one's GFLOP/s."""
    total, gflops = 0.0, {}
    for label, flops, fn in calls:
        seconds = timeit(fn, repeats, inner=20)
        total += seconds
        gflops[label] = round(flops / seconds / 1e9, 1)
    return {"sgemm_step_ms": round(total * 1e3, 3), "gflops": gflops}


def torch_calls(rng):
    """The same products through PyTorch's backend (addmm with the bias, mm), or []."""
    try:
        import torch
    except ImportError:
        return []
    torch.set_num_threads(1)
    out = []
    for index, (n_in, n_out) in enumerate(LAYERS):
        x, w = torch.from_numpy(rng.random((N, n_in), dtype=np.float32)), 0.01 * torch.randn(n_out, n_in)
        b, gz = torch.zeros(n_out), torch.randn(N, n_out)
        y, gx, gw, flops = torch.empty(N, n_out), torch.empty(N, n_in), torch.empty(n_out, n_in), 2 * N * n_in * n_out
        out.append((f"L{index}.forward", flops, lambda x=x, w=w, b=b, y=y: torch.addmm(b, x, w.t(), out=y)))
        if index > 0:
            out.append((f"L{index}.grad_x", flops, lambda gz=gz, w=w, gx=gx: torch.mm(gz, w, out=gx)))
        out.append((f"L{index}.update_w", flops, lambda gz=gz, x=x, gw=gw: torch.mm(gz.t(), x, out=gw)))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--lib", action="append", default=[], metavar="PATH[:SYMBOL]",
                        help="another LP64 BLAS library to measure (symbol: sgemm_ unless given)")
    args = parser.parse_args()
    repeats = 3 if args.quick else 15
    rng, summary = np.random.default_rng(0), {}
    for name, path, symbol, int_type in libraries(args.lib):
        record = {"blas": name, "path": path, **measure(StepGemms(path, symbol, int_type).calls(rng), repeats)}
        summary[name] = record["sgemm_step_ms"]
        print(json.dumps(record), flush=True)
    calls = torch_calls(rng)
    if calls:
        import torch
        name = f"torch {torch.__version__} mm/addmm ({'MKL' if torch.backends.mkl.is_available() else 'BLAS'})"
        record = {"blas": name, **measure(calls, repeats)}
        summary[name] = record["sgemm_step_ms"]
        print(json.dumps(record), flush=True)
    scipy_ms = summary.get(SCIPY)
    print(json.dumps({"sgemm_step_ms": summary,
                      "fastest_over_scipy": scipy_ms and round(scipy_ms / min(summary.values()), 3)}))


if __name__ == "__main__":
    main()
