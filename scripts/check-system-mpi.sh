#!/usr/bin/env bash
# Check the "cluster's MPI" install route of docs/GUIDE.md on a Debian machine (root): build
# mpi4py against Debian's MPICH in a fresh venv, install dbmpi from a clean clone without the
# PyPI MPICH wheel, and train Downpour and Sandblaster under Debian's mpiexec. Not part of
# the test suite (it compiles mpi4py: a few minutes); run it when the install docs change.
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
# WORK: where the clone, the venv and the runs go (default: a new temp directory).
if [ -z "${WORK:-}" ]; then
  WORK=$(mktemp -d /tmp/dbmpi-sysmpi.XXXXXX)
fi
apt-get -o DPkg::Lock::Timeout=900 install -y -qq mpich libmpich-dev >/dev/null
git clone -q "$SRC" "$WORK/src"
python3 -m venv "$WORK/venv"
. "$WORK/venv/bin/activate"
pip install -q "setuptools>=64" wheel Cython numpy scipy
env MPICC=/usr/bin/mpicc.mpich pip install -q --no-binary=mpi4py --no-cache-dir mpi4py
(cd "$WORK/src" && pip install -q --no-build-isolation ".[data,test]")
cd "$WORK"
python -c "from mpi4py import MPI; print(MPI.Get_library_version().splitlines()[0])"
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1
timeout 300 /usr/bin/mpiexec.mpich -n 2 python -m mpi4py.bench helloworld
timeout 300 /usr/bin/mpiexec.mpich -n 4 python -m mpi4py -m dbmpi train src/configs/downpour_digits.toml \
  --run-dir downpour --set data.path=digits.h5 --set train.epochs=5 | tail -1
timeout 300 /usr/bin/mpiexec.mpich -n 5 python -m mpi4py -m dbmpi train src/configs/sandblaster_digits.toml \
  --run-dir sandblaster --set data.path=digits.h5 --set train.iterations=10 | tail -1
echo "system MPI route: OK ($WORK)"
