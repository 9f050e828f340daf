#!/usr/bin/env bash
# Install dbmpi (editable, with the PyPI MPICH wheel and the data, test and plot extras) into the
# current Python when it is missing or its compiled kernels are older than their sources.
# The build needs Cython, numpy and scipy (for scipy.linalg.cython_blas), installed first
# so the build can reuse them (--no-build-isolation).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

needs_install() {
  # Run from / so that the package found is the installed one, not this directory's.
  local root=$PWD
  (cd / && "$PYTHON" - "$root" <<'PY' 2>/dev/null)
import glob, os, sys
root = sys.argv[1]
try:
    import dbmpi._kernels as k, dbmpi  # noqa: F401
    import mpi4py, h5py, pytest, pytest_mpi, pytest_timeout, ruff, sklearn  # noqa: F401
except Exception:
    sys.exit(0)
os.chdir(root)
if os.path.realpath(os.path.dirname(dbmpi.__file__)) != os.path.realpath(os.path.join(root, "dbmpi")):
    sys.exit(0)  # installed from another checkout: install this one
built = glob.glob(os.path.join(os.path.dirname(k.__file__), "*.so"))
sources = glob.glob("cython_kernels/*.pyx") + glob.glob("cython_kernels/*.pxd")
if len(built) < len(glob.glob("cython_kernels/*.pyx")):
    sys.exit(0)
newest_source = max(os.path.getmtime(p) for p in sources)
sys.exit(0 if min(os.path.getmtime(p) for p in built) < newest_source else 1)
PY
}

if needs_install; then
  echo "installing dbmpi (editable) and its dependencies..." >&2
  "$PYTHON" -m pip install -q "setuptools>=64" wheel "Cython>=3.0" numpy scipy
  "$PYTHON" -m pip install -q --no-build-isolation -e ".[mpich,data,test,plot]"
fi
