#!/usr/bin/env bash
# Check the "cluster's MPI" install route of docs/GUIDE.md on a Debian machine (root), with
# Debian's MPICH, Debian's Open MPI, or both (the default):
#
#   scripts/check-system-mpi.sh [mpich|openmpi|both]
#
# Per MPI: apt-get install it, make a fresh venv, build mpi4py from source against its
# compiler wrapper, install dbmpi (editable, from a clean clone of this checkout) without the
# PyPI MPICH wheel, then under that MPI's own launcher run, each under a timeout, with its
# wall time: (a) Downpour on digits, 4 ranks; (b) Sandblaster, 5 ranks, 10 iterations;
# (c) model-parallel Downpour (2 replicas x 2 partitions + 2 shards, 6 ranks); (d) the MPI
# test suite (6 ranks, as scripts/run-tests.sh runs it). For Open MPI it also prints the
# version, the one-sided (osc) components and the one selected for a window made by
# MPI.Win.Allocate, and the thread level.
#
# Not part of the test suite (it compiles mpi4py: a few minutes per MPI); run it when the
# install docs change. Every step runs even if an earlier one failed; the exit status is 1
# when any did, and the last lines say which.
#
# Environment:
#   WORK=DIR        where the clone, the venvs and the runs go (default: a new temp
#                   directory); a venv already built there (venv-mpich, venv-openmpi) is reused
#   STEP_TIMEOUT=S  limit of each training step (default 600); TEST_TIMEOUT=S: of the MPI
#                   test suite (default 1200)
#   PYTHON=PATH     the Python the venvs are made from (default Debian's /usr/bin/python3). A
#                   Python whose build flags put a directory holding another libmpi.so on the
#                   link line (e.g. a pyenv Python with the PyPI mpich wheel installed in its
#                   base environment: LDSHARED has -L<prefix>/lib) links mpi4py against that
#                   MPI whatever MPICC says; the check below catches it.
#   OMPI_MCA_*      passed through to mpirun (e.g. OMPI_MCA_osc=ucx to try another component)
set -uo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
ROUTES=${1:-both}
case "$ROUTES" in
  both) ROUTES="mpich openmpi" ;;
  mpich|openmpi) ;;
  *) echo "usage: $0 [mpich|openmpi|both]" >&2; exit 2 ;;
esac
if [ -z "${WORK:-}" ]; then
  WORK=$(mktemp -d /tmp/dbmpi-sysmpi.XXXXXX)
fi
PYTHON=${PYTHON:-/usr/bin/python3}
STEP_TIMEOUT=${STEP_TIMEOUT:-600}
TEST_TIMEOUT=${TEST_TIMEOUT:-1200}
export OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 MKL_NUM_THREADS=1
FAILED=()
SUMMARY=()

# step NAME CMD...: run CMD under the step's timeout, print its wall time, record the outcome.
step() {
  local name=$1 limit=$STEP_TIMEOUT; shift
  [ "$name" = "${name%tests}" ] || limit=$TEST_TIMEOUT
  echo "== $ROUTE: $name"
  local t0=$SECONDS rc=0
  timeout --kill-after=30 "$limit" "$@" > "$WORK/$ROUTE-$name.log" 2>&1 || rc=$?
  local dt=$((SECONDS - t0))
  tail -3 "$WORK/$ROUTE-$name.log"
  if [ $rc -eq 0 ]; then
    SUMMARY+=("$ROUTE $name: ok, ${dt} s")
  else
    [ $rc -eq 124 ] && rc="$rc (timeout after ${limit} s)"
    SUMMARY+=("$ROUTE $name: FAILED, exit $rc, ${dt} s (log: $WORK/$ROUTE-$name.log)")
    FAILED+=("$ROUTE $name")
  fi
  echo "   wall time ${dt} s, exit $rc"
}

if [ -d "$WORK/src" ]; then  # a reused WORK: bring its clone to this checkout's commit
  git -C "$WORK/src" fetch -q "$SRC" HEAD && git -C "$WORK/src" checkout -q --detach FETCH_HEAD
else
  git clone -q "$SRC" "$WORK/src"
fi
cd "$WORK"

for ROUTE in $ROUTES; do
  if [ "$ROUTE" = mpich ]; then
    PKGS="mpich libmpich-dev"; CC_WRAPPER=/usr/bin/mpicc.mpich
    LAUNCH=(/usr/bin/mpiexec.mpich)
  else
    PKGS="openmpi-bin libopenmpi-dev"; CC_WRAPPER=/usr/bin/mpicc.openmpi
    LAUNCH=(/usr/bin/mpirun.openmpi --oversubscribe)
    if [ "$(id -u)" = 0 ]; then
      export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
    fi
  fi
  apt-get -o DPkg::Lock::Timeout=900 install -y -qq $PKGS python3-venv python3-dev >/dev/null || { FAILED+=("$ROUTE apt-get"); continue; }
  VENV=$WORK/venv-$ROUTE
  if ! "$VENV/bin/python" -c "import mpi4py.MPI" 2>/dev/null; then
    rm -rf "$VENV"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/pip" install -q "setuptools>=64" wheel Cython numpy scipy
    env MPICC=$CC_WRAPPER "$VENV/bin/pip" install -q --no-binary=mpi4py --no-cache-dir mpi4py \
      || { FAILED+=("$ROUTE mpi4py build"); continue; }
  fi
  # dbmpi from this run's clone, also into a reused venv (which may hold an older checkout).
  (cd "$WORK/src" && "$VENV/bin/python" -m pip install -q --no-build-isolation -e ".[data,test]") \
    || { FAILED+=("$ROUTE dbmpi install"); continue; }
  PY=$VENV/bin/python
  # mpi4py must load the system MPI's libmpi, not one found first on the Python's link path.
  LIBMPI=$(ldd "$VENV"/lib/python3*/site-packages/mpi4py/MPI.*.so | grep -E '^\s*lib(mpi|mpich)\.so')
  echo "== $ROUTE: mpi4py loads:$LIBMPI"
  case "$LIBMPI" in
    *"=> /usr/lib/"*|*"=> /lib/"*) ;;
    *) echo "$ROUTE: mpi4py is not linked against the system MPI (see PYTHON above)" >&2
       FAILED+=("$ROUTE mpi4py link"); continue ;;
  esac
  RUN=$WORK/runs-$ROUTE
  rm -rf "$RUN"; mkdir -p "$RUN"
  echo "== $ROUTE: $("$PY" -c 'from mpi4py import MPI; print(MPI.Get_library_version().replace(chr(0), "").splitlines()[0])')"
  if [ "$ROUTE" = openmpi ]; then
    ompi_info --version | head -1
    echo "osc components: $(ompi_info | sed -n 's/^ *MCA osc: \([a-z0-9]*\) .*/\1/p' | tr '\n' ' ')"
    grep -E '^ *(osc|pml|btl) *=' /etc/openmpi/openmpi-mca-params.conf 2>/dev/null | sed 's/^/  site default: /'
    # Which component serves a window made by MPI.Win.Allocate, and the thread level.
    timeout 300 "${LAUNCH[@]}" --mca osc_base_verbose 100 -n 2 "$PY" -c '
from mpi4py import MPI
w = MPI.Win.Allocate(8, 8)
if MPI.COMM_WORLD.rank == 0:
    print("thread level:", MPI.Query_thread(), "(THREAD_MULTIPLE =", MPI.THREAD_MULTIPLE, ")")
w.Free()' 2>&1 | grep -E -i 'selected|thread level' | sort -u | sed 's/^/  /'
  fi
  "$PY" -m dbmpi data prepare digits --out "$RUN/digits.h5" >/dev/null
  step helloworld "${LAUNCH[@]}" -n 2 "$PY" -m mpi4py.bench helloworld
  step downpour "${LAUNCH[@]}" -n 4 "$PY" -m mpi4py -m dbmpi train "$WORK/src/configs/downpour_digits.toml" \
    --run-dir "$RUN/downpour" --set data.path="$RUN/digits.h5"
  step sandblaster "${LAUNCH[@]}" -n 5 "$PY" -m mpi4py -m dbmpi train "$WORK/src/configs/sandblaster_digits.toml" \
    --run-dir "$RUN/sandblaster" --set data.path="$RUN/digits.h5" --set train.iterations=10
  step model-parallel "${LAUNCH[@]}" -n 6 "$PY" -m mpi4py -m dbmpi train "$WORK/src/configs/downpour_digits.toml" \
    --run-dir "$RUN/model-parallel" --set data.path="$RUN/digits.h5" --set train.n_partitions=2 --set train.epochs=5
  cd "$WORK/src"
  step mpi-tests "${LAUNCH[@]}" -n 6 "$PY" -m mpi4py -m pytest -q -p no:cacheprovider --with-mpi -m mpi tests
  cd "$WORK"
done

echo "== summary ($WORK)"
[ ${#SUMMARY[@]} -eq 0 ] || printf '  %s\n' "${SUMMARY[@]}"
if [ ${#FAILED[@]} -gt 0 ]; then
  echo "system MPI route: FAILED: ${FAILED[*]}"
  exit 1
fi
echo "system MPI route: OK"
