#!/bin/bash
# Slurm Prolog and Epilog (slurm.conf: Prolog=/path/to/mpich-shm-cleanup.sh and
# Epilog=/path/to/mpich-shm-cleanup.sh): remove the MPICH shared-memory segments in
# /dev/shm that belong to this job's id and that no process uses.
#
# An MPICH rank killed before MPI_Finalize (SIGKILL at the end of KillWait, scancel
# --signal=KILL, srun killing a step, the out-of-memory killer) leaves
# /dev/shm/mpich_shm_<id>_<node> behind. MPICH derives <id> from the PMI job name, which
# under `srun --mpi=pmi2` is "<job id>.<step id>": <id> is its 32-bit FNV-1a hash in hex.
# Job ids start again at 1 when a controller starts with fresh state, and a later job with
# the same id and step then opens the stale segment and fails in MPI_Init ("Out of memory"
# from MPIDI_POSIX_comm_bootstrap). As the Epilog this removes what the job's killed ranks
# left; as the Prolog it also clears leftovers of an earlier job with the same id (say,
# from before the controller's state was wiped) before the job's ranks start. It covers
# steps 0 .. DBMPI_SHM_CLEANUP_STEPS-1 (default 64) and keeps any segment a process still
# has mapped or open. (Under mpiexec the name comes from hydra's own job name instead, so
# leftovers cost space but do not collide with later jobs.)
#
# A failing Prolog or Epilog drains the node, so this always exits 0.
# By hand: SLURM_JOB_ID=123 bash mpich-shm-cleanup.sh --dry-run
#
# Given paths instead (`mpich-shm-cleanup.sh [--dry-run] PATH...`), it handles exactly those
# MPICH segments, whatever their job (anything but $shm/mpich_shm_* and $shm/mpich_vci_* is
# ignored): dbmpi.runtime.supervise passes the ones its rank mapped once that rank has ended.

job=${SLURM_JOB_ID:-}
steps=${DBMPI_SHM_CLEANUP_STEPS:-64}
shm=${DBMPI_SHM_DIR:-/dev/shm}
dry_run=
[ "${1:-}" = --dry-run ] && dry_run=1 && shift
case "$steps" in '' | *[!0-9]*) steps=64 ;; esac

fnv1a() {  # sets id to the 32-bit FNV-1a hash of $1, in lower-case hex without leading zeros
  local text=$1 hash=2166136261 i code
  for ((i = 0; i < ${#text}; i++)); do
    printf -v code '%d' "'${text:i:1}"
    hash=$(( ((hash ^ code) * 16777619) & 0xffffffff ))
  done
  printf -v id '%x' "$hash"
}

in_use() {  # whether any process maps or holds open the file $1 (one grep over all maps)
  grep -qsF -- "$1" /proc/[0-9]*/maps && return 0
  find /proc/[0-9]*/fd -maxdepth 1 -lname "$1" -print 2>/dev/null | grep -q .
}

clean() {  # remove the segment $1 unless a process uses it; $2 says whose it is
  [ -e "$1" ] || return 0
  if in_use "$1"; then
    echo "mpich-shm-cleanup: $1 is in use; kept"
  elif [ -n "$dry_run" ]; then
    echo "mpich-shm-cleanup: would remove $1"
  else
    rm -f -- "$1" && echo "mpich-shm-cleanup: removed $1 ($2)"
  fi
}

if [ $# -gt 0 ]; then
  for path; do
    [ "${path%/*}" = "$shm" ] || continue
    case "${path##*/}" in mpich_shm_* | mpich_vci_*) clean "$path" "given" ;; esac
  done
  exit 0
fi
case "$job" in '' | *[!0-9]*) exit 0 ;; esac
for ((step = 0; step < steps; step++)); do
  fnv1a "$job.$step"
  for path in "$shm/mpich_shm_${id}_"* "$shm/mpich_vci_${id}_"*; do
    clean "$path" "job $job step $step"
  done
done
exit 0
