"""Run one MPI rank under a small supervising parent, so that hydra lets the others live
when it dies.

    mpiexec -disable-auto-cleanup -n 4 python -m dbmpi.runtime.supervise python -m mpi4py -m dbmpi train CONFIG

Why. MPICH's hydra launcher (mpiexec) watches the processes it starts. Whatever
`-disable-auto-cleanup` says, its proxy kills every rank of the job as soon as it reaps a
rank that died of a signal (measured with MPICH 5.0.2: SIGKILL one rank and the others are
gone a moment later, at the proxy's next event). A rank that *exits*, even with a non-zero
status, only makes it send SIGUSR1 to every rank (`-disable-auto-cleanup`) or kill them all
(the default). So this parent starts the real rank as its child and waits for it; when the
child dies of signal N, the parent exits with status 128 + N: hydra sees an exit and, under
`-disable-auto-cleanup`, the surviving ranks train on (dbmpi.runtime.failover). Without
`-disable-auto-cleanup` the job still ends at the first death, as before.

Signals. The child runs in its own process group, so hydra's SIGUSR1 failure notices (sent
to each rank's process group) reach only this parent, which ignores them: a rank must not
take a peer's death for a request to stop. For the same reason SIGUSR1 is not passed on:
under this wrapper a graceful stop (checkpoint, exit 0) is asked for with SIGTERM, which is
passed on, as are SIGINT, SIGHUP and SIGUSR2. The child gets SIGKILL when this parent dies
(Linux's PR_SET_PDEATHSIG), so hydra killing the parent's process group, or the parent
being killed, never leaves the rank running.

Single copies. The rank runs with MPICH's CMA transfers off (RANK_ENV): with them, a peer
dying mid-transfer makes MPICH abort the whole job.

MPI-free: the child inherits the PMI connection (its file descriptor, or PMI_PORT); the
parent closes its own copy, so the launcher sees the connection close when the child dies.

Shared memory. An MPICH job that ends without MPI_Finalize (a killed rank, a failover, an
MPI_Abort) leaves its segment, /dev/shm/mpich_shm_<id>_<node> (4-5 MB), behind. So this
parent forks a sweeper, in a session of its own (what ends the job's processes, MPI_Abort's
SIGKILL of every rank's parent included, does not reach it): it reads which MPICH files the
rank maps (/proc/PID/maps) for as long as the rank lives, then removes those that no process
uses any more (jobs/slurm/mpich-shm-cleanup.sh, given the paths). The last rank of the job
to end on a node finds them unused, so this job's files go, and only these: another job's
name is never learnt. A parent that exits normally waits for its sweeper (at most
SWEEP_WAIT_S), so the files are gone when mpiexec returns; after an MPI_Abort they go a
moment later.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys

from dbmpi.runtime import procfs
from dbmpi.runtime.poll import poll

PASSED_ON = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR2)
IGNORED = (signal.SIGUSR1,)
PR_SET_PDEATHSIG = 1
SWEEP_POLL_S = 0.2
SWEEP_WAIT_S = 10.0
# The rank's MPICH settings, unless already set: no single-copy (CMA) transfers. MPICH reads
# a large message straight from the sender's memory (process_vm_readv); when the sender has
# died meanwhile, that fails with ESRCH, which MPICH 5.0.2 treats as fatal whatever the error
# handler: the rank aborts the whole job (seen in a partitioned replica's Allgatherv), the
# surviving replicas included. Without CMA such a message goes through shared-memory cells,
# and a dead partner leaves the collective waiting: dbmpi.runtime.failover's watchdog then ends that
# rank alone.
RANK_ENV = {"MPIR_CVAR_CH4_CMA_ENABLE": "0"}

USAGE = """usage: python -m dbmpi.runtime.supervise COMMAND [ARG...]

Runs COMMAND (one MPI rank) as a child and exits with its status (128 + N when signal N
killed it), so that `mpiexec -disable-auto-cleanup` keeps the other ranks running when this
one dies. SIGTERM, SIGINT, SIGHUP and SIGUSR2 are passed on; SIGUSR1 (hydra's notice that a
peer died) is not. Linux only."""


def _in_child(libc) -> None:
    """Between fork and exec: own process group, default signal handling, and death with
    the parent."""
    os.setpgid(0, 0)
    for signum in PASSED_ON + IGNORED:
        signal.signal(signum, signal.SIG_DFL)
    if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
        os._exit(127)
    if os.getppid() == 1:  # the parent died before prctl took effect
        os._exit(127)


def sweep(rank: tuple[int, int | None], poll_s: float = SWEEP_POLL_S) -> str:
    """Learn the MPICH shared-memory files `rank` (procfs.identity) maps (MPI_Init maps
    them: read until found); once it has ended, remove those nothing uses any more. Returns
    the cleanup script's report."""
    files: set[str] = set()

    def ended() -> bool:
        if procfs.gone(rank):
            return True
        if not files:
            files.update(procfs.mpich_shm_files(rank[0]))
        return False

    poll(ended, low=poll_s, high=poll_s)
    return procfs.remove_unused(files)


def start_sweeper(rank_pid: int) -> int | None:
    """Fork sweep(rank) into a session of its own, its output to /dev/null and no other
    descriptor (the PMI connection, the launcher's pipes) kept; returns its pid."""
    rank = procfs.identity(rank_pid)
    try:
        pid = os.fork()
    except OSError:
        return None
    if pid:
        return pid
    try:  # the sweeper: signals stay ignored (as set in main) until it is done
        os.setsid()
        null = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(null, fd)
        os.closerange(3, os.sysconf("SC_OPEN_MAX"))
        sweep(rank)
    finally:
        os._exit(0)


def wait_for_sweeper(pid: int | None, limit_s: float = SWEEP_WAIT_S) -> None:
    def reaped() -> bool:
        try:
            return os.waitpid(pid, os.WNOHANG)[0] != 0
        except ChildProcessError:
            return True

    if pid is not None:
        poll(reaped, low=0.02, high=0.02, limit_s=limit_s)


def exit_status(wait_status: int) -> int:
    """The child's exit code, or 128 + N when signal N killed it (as a shell reports it)."""
    code = os.waitstatus_to_exitcode(wait_status)
    return 128 - code if code < 0 else code


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "--":
        args = args[1:]
    if not args or args[0] in ("-h", "--help"):
        print(USAGE, file=sys.stderr if not args else sys.stdout)
        return 2 if not args else 0
    if not sys.platform.startswith("linux"):
        print("dbmpi.runtime.supervise: error: needs Linux (PR_SET_PDEATHSIG)", file=sys.stderr)
        return 2
    # Ignore everything we pass on until the child exists (it restores the defaults).
    for signum in PASSED_ON + IGNORED:
        signal.signal(signum, signal.SIG_IGN)
    env = {**RANK_ENV, **os.environ, "DBMPI_SUPERVISED": "1"}
    libc = ctypes.CDLL(None, use_errno=True)  # loaded here: the child only calls it
    try:
        child = subprocess.Popen(args, close_fds=False, preexec_fn=lambda: _in_child(libc), env=env)
    except OSError as exc:
        print(f"dbmpi.runtime.supervise: error: cannot run {args[0]}: {exc.strerror}", file=sys.stderr)
        return 127

    sweeper = start_sweeper(child.pid)

    def pass_on(signum, _frame) -> None:
        try:
            os.kill(child.pid, signum)
        except ProcessLookupError:
            pass

    for signum in PASSED_ON:
        signal.signal(signum, pass_on)
    pmi_fd = os.environ.get("PMI_FD")
    if pmi_fd and pmi_fd.isdigit():
        try:
            os.close(int(pmi_fd))
        except OSError:
            pass
    while True:
        try:
            _, status = os.waitpid(child.pid, 0)
            break
        except InterruptedError:  # pragma: no cover - PEP 475 retries for us
            continue
    wait_for_sweeper(sweeper)
    sys.stdout.flush()
    sys.stderr.flush()
    # os._exit: no interpreter teardown, during which a late SIGUSR1 from hydra (it sends
    # one whenever a rank leaves without MPI_Finalize) could still kill this process.
    os._exit(exit_status(status))


if __name__ == "__main__":
    sys.exit(main())
