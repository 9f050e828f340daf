# Shared logic of the dbmpi Slurm batch scripts (jobs/slurm/*.sbatch); sourced, not submitted.
#
# A script sets its defaults, sources this file and calls `dbmpi_slurm_train [ARGS...]`;
# ARGS are passed on to `dbmpi train` (e.g. --set train.steps=5000). It then:
#   1. checks the settings and that the config's layout needs exactly --ntasks ranks
#      (`dbmpi plan -n`; `dbmpi train` prints the rank -> role table into the job log);
#   2. runs one rank per Slurm task with `srun --mpi=pmi2` or `mpiexec`, BLAS/OpenMP threads
#      per rank = --cpus-per-task, in the run directory RUN_ROOT/<job name>-<job id>
#      (array tasks: RUN_ROOT/<job name>-<array job id>_<task id>), with `--resume auto`,
#      so a requeued job continues from its newest checkpoint;
#   3. on SIGUSR1 to the batch shell (`#SBATCH --signal=B:USR1@120`: the time limit is
#      near) passes USR1 on to the ranks through the launcher, as soon as training has
#      started; every rank checkpoints and exits 0; then the job requeues itself
#      (`scontrol requeue`) unless the run had finished anyway;
#   4. on SIGTERM (scancel, or the time limit itself) waits for the ranks, which Slurm
#      signals directly and which checkpoint and exit within KillWait; no requeue.
#
# Settings, from the environment (sbatch passes the submitter's environment on):
#   DBMPI_CONFIG     run config (each script has a default)
#   DBMPI_DATA       data set file: adds --set data.path=DBMPI_DATA
#   DBMPI_RUN_ROOT   directory holding the run directories (default: runs)
#   DBMPI_LAUNCHER   srun (default: srun --mpi=pmi2) or mpiexec (inside the allocation)
#   DBMPI_PYTHON     the Python that has dbmpi installed (default: python3 on PATH)
#   DBMPI_MPIEXEC    mpiexec to use with DBMPI_LAUNCHER=mpiexec (default: the one beside
#                    DBMPI_PYTHON, i.e. the PyPI MPICH wheel's, else mpiexec on PATH)
#   DBMPI_LAUNCHER_ARGS  extra arguments for srun or mpiexec (split on spaces)
#   DBMPI_RESUME     auto (default: the run directory's newest checkpoint, or a fresh start),
#                    or a checkpoint to start from (later starts of a requeued job: auto)
#   DBMPI_FAILOVER   1: Downpour and Sandblaster survive a failed replica (mpiexec -disable-auto-cleanup,
#                    each rank under python -m dbmpi.runtime.supervise; needs DBMPI_LAUNCHER=mpiexec)
#   DBMPI_SIGNAL_WAIT    seconds a USR1 may wait for training to start before it is passed
#                    on regardless (default 60)
#   DBMPI_SLURM_DIR  this directory (found from the job's command when not set)
# See docs/SLURM.md.

dbmpi_say() { printf 'dbmpi-slurm: %s\n' "$*"; }
dbmpi_fail() { printf 'dbmpi-slurm: error: %s\n' "$*" >&2; exit 2; }

# The checkout holding this file; default configs are found relative to it.
DBMPI_HOME=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

dbmpi_slurm_train() {
  [ -n "${SLURM_JOB_ID:-}" ] || dbmpi_fail "not inside a Slurm job: submit with sbatch (see docs/SLURM.md)"
  local config=${DBMPI_CONFIG:?DBMPI_CONFIG must name a run config}
  local run_root=${DBMPI_RUN_ROOT:-runs}
  local launcher=${DBMPI_LAUNCHER:-srun}
  local python=${DBMPI_PYTHON:-python3}
  local resume=${DBMPI_RESUME:-auto}
  local ntasks=${SLURM_NTASKS:-}
  local threads=${SLURM_CPUS_PER_TASK:-1}
  local signal_wait=${DBMPI_SIGNAL_WAIT:-60}

  [ -n "$ntasks" ] || dbmpi_fail "SLURM_NTASKS is not set: give the job --ntasks"
  [ -f "$config" ] || dbmpi_fail "DBMPI_CONFIG=$config: no such file (relative paths are taken from $PWD)"
  command -v "$python" >/dev/null 2>&1 || dbmpi_fail "DBMPI_PYTHON=$python: not found"
  "$python" -c 'import dbmpi' 2>/dev/null ||
    dbmpi_fail "DBMPI_PYTHON=$python cannot import dbmpi: set DBMPI_PYTHON to the environment's python"
  if [ "$resume" != auto ]; then
    [ -f "$resume" ] || dbmpi_fail "DBMPI_RESUME=$resume: no such checkpoint (or use auto)"
    # A requeued job goes on from its own run directory, not from where the run began.
    [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && resume=auto
  fi
  if [ -n "${DBMPI_DATA:-}" ] && [ ! -e "$DBMPI_DATA" ] && [ ! -d "$(dirname "$DBMPI_DATA")" ]; then
    dbmpi_fail "DBMPI_DATA=$DBMPI_DATA: its directory does not exist"
  fi

  # One BLAS/OpenMP pool per rank, sized to the CPUs Slurm gives each task.
  export OMP_NUM_THREADS=$threads OPENBLAS_NUM_THREADS=$threads MKL_NUM_THREADS=$threads

  local run_id=$SLURM_JOB_ID
  [ -n "${SLURM_ARRAY_TASK_ID:-}" ] && run_id=${SLURM_ARRAY_JOB_ID}_${SLURM_ARRAY_TASK_ID}
  mkdir -p "$run_root" || dbmpi_fail "DBMPI_RUN_ROOT=$run_root: cannot create it"
  DBMPI_RUN_DIR=$(cd "$run_root" && pwd)/${SLURM_JOB_NAME:-dbmpi}-$run_id

  local train=("$config" --run-dir "$DBMPI_RUN_DIR" --threads "$threads")
  [ -n "${DBMPI_DATA:-}" ] && train+=(--set "data.path=$DBMPI_DATA")
  train+=("$@")
  train+=(--resume "$resume")

  # The --set options also decide the layout: check it against --ntasks before launching.
  local plan=(--set "train.threads=$threads") prev=
  for arg in "${train[@]}"; do
    [ "$prev" = --set ] && plan+=(--set "$arg")
    case "$arg" in --set=*) plan+=("$arg") ;; esac
    prev=$arg
  done
  dbmpi_say "job $SLURM_JOB_ID${SLURM_ARRAY_TASK_ID:+ (array $SLURM_ARRAY_JOB_ID task $SLURM_ARRAY_TASK_ID)}," \
    "start $((${SLURM_RESTART_COUNT:-0} + 1)), $ntasks ranks x $threads thread(s), launcher $launcher"
  local verdict
  if ! verdict=$("$python" -m dbmpi plan "$config" -n "$ntasks" "${plan[@]}" 2>&1); then
    printf '%s\n' "$verdict" >&2
    dbmpi_fail "the run's layout does not match the job's $ntasks tasks: submit with sbatch --ntasks=N" \
      "for the N that dbmpi plan names, or change the layout with --set"
  fi

  local cmd
  case "$launcher" in
    srun)
      # pmi2: the PyPI MPICH wheel speaks PMI-1/PMI-2, not PMIx.
      cmd=(srun --mpi=pmi2 --ntasks="$ntasks" --cpus-per-task="$threads" --kill-on-bad-exit=1) ;;
    mpiexec)
      local mpiexec=${DBMPI_MPIEXEC:-}
      if [ -z "$mpiexec" ]; then
        mpiexec=$(dirname "$(command -v "$python")")/mpiexec
        [ -x "$mpiexec" ] || mpiexec=$(command -v mpiexec) || dbmpi_fail "no mpiexec found: set DBMPI_MPIEXEC"
      fi
      cmd=("$mpiexec" -n "$ntasks") ;;
    *) dbmpi_fail "DBMPI_LAUNCHER=$launcher: must be srun or mpiexec" ;;
  esac
  # Downpour surviving a failed replica: hydra must not clean up after a dead rank, and each
  # rank runs under dbmpi.runtime.supervise, which ignores hydra's USR1 failure notice, so a stop is
  # passed on as TERM instead (docs/DESIGN.md, "Downpour failures").
  local stop_signal=USR1 supervise=()
  if [ "${DBMPI_FAILOVER:-0}" = 1 ]; then
    [ "$launcher" = mpiexec ] || dbmpi_fail "DBMPI_FAILOVER=1 needs DBMPI_LAUNCHER=mpiexec (srun ends the job when a task dies)"
    cmd+=(-disable-auto-cleanup)
    supervise=("$python" -m dbmpi.runtime.supervise)
    stop_signal=TERM
  fi
  # shellcheck disable=SC2206 - extra launcher arguments are split on spaces on purpose
  cmd+=(${DBMPI_LAUNCHER_ARGS:-} "${supervise[@]}" "$python" -m mpi4py -m dbmpi train "${train[@]}")
  dbmpi_say "run directory $DBMPI_RUN_DIR"
  dbmpi_say "${cmd[*]}"

  # Signals. The launcher runs in the background so that the shell can take them.
  DBMPI_PENDING=
  DBMPI_SIGNALLED=
  DBMPI_TERMINATED=
  trap 'DBMPI_PENDING=USR1; DBMPI_SIGNALLED=USR1' USR1
  trap 'DBMPI_TERMINATED=TERM' TERM
  local size_at_launch
  size_at_launch=$(dbmpi_metrics_size)
  local launched=$SECONDS
  "${cmd[@]}" &
  local pid=$! status=0
  while kill -0 "$pid" 2>/dev/null; do
    if [ -n "$DBMPI_PENDING" ]; then
      # A rank killed by USR1 before it installed its handler would end the job; wait until
      # the run has logged something since launch (training has started), within limits.
      if [ "$(dbmpi_metrics_size)" -gt "$size_at_launch" ] ||
         [ $((SECONDS - launched)) -ge "$signal_wait" ]; then
        local shown=$DBMPI_PENDING
        [ "$stop_signal" = "$DBMPI_PENDING" ] || shown="$DBMPI_PENDING (as $stop_signal)"
        dbmpi_say "passing $shown on to the ranks: checkpoint and stop"
        kill -s "$stop_signal" "$pid" 2>/dev/null
        DBMPI_PENDING=
      else
        sleep 1
        continue
      fi
    fi
    wait "$pid"  # returns when the launcher exits, or early when a trapped signal arrives
    status=$?
  done
  wait "$pid" 2>/dev/null
  local final=$?
  [ "$final" -ne 127 ] && status=$final
  trap - USR1 TERM
  dbmpi_say "launcher exited with status $status"

  if [ -n "$DBMPI_SIGNALLED" ] && [ -z "$DBMPI_TERMINATED" ] && dbmpi_unfinished "$python"; then
    dbmpi_say "requeueing job $SLURM_JOB_ID; it resumes from the newest checkpoint in $DBMPI_RUN_DIR"
    if scontrol requeue "$SLURM_JOB_ID"; then
      exit 0
    fi
    dbmpi_say "scontrol requeue failed (was the job submitted with --requeue?)"
  fi
  exit "$status"
}

# Bytes in the run's metrics files (each rank's, metrics/rank-*.jsonl), 0 before there are any.
dbmpi_metrics_size() {
  cat "$DBMPI_RUN_DIR"/metrics/rank-*.jsonl 2>/dev/null | wc -c
}

# True unless the run wrote a summary that says it was not stopped by a signal.
dbmpi_unfinished() {
  "$1" - "$DBMPI_RUN_DIR/summary.json" <<'EOF'
import json, sys
try:
    with open(sys.argv[1]) as f:
        summary = json.load(f)
except (OSError, ValueError):
    sys.exit(0)
sys.exit(0 if summary.get("stopped_by_signal") else 1)
EOF
}
