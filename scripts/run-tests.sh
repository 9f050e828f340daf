#!/usr/bin/env bash
# Run every test: lint, the serial suite with pytest, then the MPI suite under mpiexec twice,
# on shared memory and on MPICH's network path (python -m mpi4py makes an exception on one
# rank abort the whole job instead of hanging).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/install.sh

export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
# This script decides which MPI path each part runs on: the serial suite (and the mpiexec
# its end-to-end tests start) and the first MPI pass use shared memory whatever the caller
# exported; only the second MPI pass sets MPIR_CVAR_NOLOCAL=1.
unset MPIR_CVAR_NOLOCAL
# mpiexec from the environment's own bin (the PyPI MPICH wheel), else from PATH.
MPIEXEC=$("$PYTHON" -c 'import os, sys; p = os.path.join(os.path.dirname(sys.executable), "mpiexec"); print(p if os.path.exists(p) else "mpiexec")')
RANKS=${DBMPI_TEST_RANKS:-6}

echo "== lint (ruff, configured in pyproject.toml)"
"$PYTHON" -m ruff check .

echo "== serial tests"
"$PYTHON" -m pytest -q "$@" tests

# The MPI suite twice: on shared memory, then with MPICH's network module between the ranks
# of this one machine (MPIR_CVAR_NOLOCAL=1), which is how RMA behaves between nodes. Before
# each pass a probe shows how many ranks MPI puts on one shared-memory node (all of them, or
# 1 on the network path), so a setting MPICH ignored cannot pass unnoticed.
probe='from mpi4py import MPI
c = MPI.COMM_WORLD
n = c.allreduce(c.Split_type(MPI.COMM_TYPE_SHARED).size, op=MPI.MAX)
c.rank == 0 and print(n)'
mpi_pass() {  # mpi_pass NAME EXPECTED_RANKS_PER_NODE [VAR=VALUE ...] -- pytest args
  local name=$1 expect=$2 vars=() shared
  shift 2
  while [ "$1" != -- ]; do vars+=("$1"); shift; done
  shift
  echo "== MPI tests: $RANKS ranks, $name"
  shared=$(env "${vars[@]}" timeout --kill-after=10 120 "$MPIEXEC" -n 2 "$PYTHON" -c "$probe")
  if [ "$shared" != "$expect" ]; then
    echo "error: expected $expect rank(s) per shared-memory node on this path, MPI says $shared" >&2
    return 1
  fi
  env "${vars[@]}" timeout --kill-after=30 1200 "$MPIEXEC" -n "$RANKS" \
    "$PYTHON" -m mpi4py -m pytest -q --with-mpi -m mpi "$@" tests
}
mpi_pass "shared memory" 2 -- "$@"
mpi_pass "network path (MPIR_CVAR_NOLOCAL=1)" 1 MPIR_CVAR_NOLOCAL=1 -- "$@"
