#!/usr/bin/env bash
# Run every test: the serial suite with pytest, then the MPI suite under mpiexec
# (python -m mpi4py makes an exception on one rank abort the whole job instead of hanging).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/install.sh

export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
# mpiexec from the environment's own bin (the PyPI MPICH wheel), else from PATH.
MPIEXEC=$("$PYTHON" -c 'import os, sys; p = os.path.join(os.path.dirname(sys.executable), "mpiexec"); print(p if os.path.exists(p) else "mpiexec")')
RANKS=${DBMPI_TEST_RANKS:-6}

echo "== lint (ruff, configured in pyproject.toml)"
"$PYTHON" -m ruff check .

echo "== serial tests"
"$PYTHON" -m pytest -q "$@" tests

echo "== MPI tests: $RANKS ranks"
timeout --kill-after=30 1200 "$MPIEXEC" -n "$RANKS" \
  "$PYTHON" -m mpi4py -m pytest -q --with-mpi -m mpi "$@" tests
