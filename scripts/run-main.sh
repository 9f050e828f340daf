#!/usr/bin/env bash
# The main job: Downpour SGD on scikit-learn's bundled digits (no download needed):
# 2 model replicas and 2 parameter-server shards, 4 MPI ranks.
# Extra arguments go to `dbmpi train`, e.g. --set train.epochs=5
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
bash scripts/install.sh
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
MPIEXEC=$("$PYTHON" -c 'import os, sys; p = os.path.join(os.path.dirname(sys.executable), "mpiexec"); print(p if os.path.exists(p) else "mpiexec")')
exec "$MPIEXEC" -n 4 "$PYTHON" -m mpi4py -m dbmpi train configs/downpour_digits.toml "$@"
