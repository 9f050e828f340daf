"""A real single-node Slurm cluster on localhost, for testing the job scripts.

`LocalSlurm(root).start()` runs munged (as the `munge` user, with a fresh key), slurmctld
and slurmd from Debian's packages, every file they use (config, key, sockets, state,
spool, logs, pid files) under `root`, on free TCP ports, and waits until the node is idle.
`stop()` cancels what is still queued, ends the daemons it started (by pid) and any job
step daemon of this cluster left over, with its tasks. If a daemon does not come up, the
error carries the tail of every daemon's log.

Needs root (slurmd starts jobs as their user) and the packages `slurm-wlm slurmctld slurmd
slurm-client munge`; `missing()` says what is lacking. Also usable by hand:

    python -m tests.slurm.cluster /tmp/slurm      # start; prints the SLURM_CONF to export; Ctrl-C stops
"""
from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SHM_CLEANUP = ROOT / "jobs" / "slurm" / "mpich-shm-cleanup.sh"
DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("munge", "runuser", "sbatch", "squeue", "scontrol", "scancel", "srun", "sinfo")


class SlurmError(RuntimeError):
    """The cluster did not start, or a Slurm command failed."""


def missing() -> str | None:
    """Why a local cluster cannot run here, or None."""
    if os.geteuid() != 0:
        return "the local Slurm cluster needs root (slurmd runs jobs as their user)"
    lacking = [name for name in (*DAEMONS, *CLIENTS) if not _which(name)]
    try:
        pwd.getpwnam("munge")
    except KeyError:
        lacking.append("user munge")
    if lacking:
        return ("missing " + ", ".join(lacking) +
                ": apt-get install slurm-wlm slurmctld slurmd slurm-client munge")
    return None


def _which(name: str) -> str | None:
    return shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError as exc:
        return f"({exc})"
    return "\n".join(text[-lines:]) or "(empty)"


def _read_pid(path: Path) -> int:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return 0


def _signal_group(pid: int, signum: int) -> None:
    try:
        os.killpg(pid, signum)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie is gone for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


SLURM_CONF = """\
# Written by tests/slurm/cluster.py: a one-node cluster on localhost.
ClusterName=dbmpitest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also holds a requeued job back this long (default 120 s).
AuthInfo=socket={munge_socket},cred_expire=10
MailProg=/bin/true
StateSaveLocation={state}
SlurmdSpoolDir={spool}
SlurmctldPidFile={run}/slurmctld.pid
SlurmdPidFile={run}/slurmd.pid
SlurmctldLogFile={log}/slurmctld.log
SlurmdLogFile={log}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
PlugStackConfig={conf_dir}/plugstack.conf
# No cgroups here: track processes by parentage, no task binding.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SwitchType=switch/none
MpiDefault=pmi2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=2
DependencyParameters=kill_invalid_depend
ReturnToService=2
KillWait=5
InactiveLimit=0
MinJobAge=600
MessageTimeout=30
SlurmdTimeout=300
# Remove /dev/shm segments of MPICH ranks killed before MPI_Finalize, and stale ones of
# an earlier job with the same id (ids restart at 1 with every fresh cluster).
Prolog={shm_cleanup}
Epilog={shm_cleanup}
# The node advertises more CPUs than the host has, so jobs of 6 ranks fit.
SlurmdParameters=config_overrides
NodeName={host} NodeAddr=127.0.0.1 {node_cpus} RealMemory={memory} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
"""


class LocalSlurm:
    """munged + slurmctld + slurmd under one private directory."""

    def __init__(self, root: Path, cpus: int = 8, memory_mb: int = 4000):
        self.root = Path(root).resolve()
        self.cpus = cpus
        self.memory_mb = memory_mb
        self.host = socket.gethostname().split(".")[0]
        self.munge_dir = self.root / "munge"
        self.conf_dir = self.root / "etc"
        self.log_dir = self.root / "log"
        self.run_dir = self.root / "run"
        self.conf = self.conf_dir / "slurm.conf"
        self.munge_socket = self.munge_dir / "munge.socket"
        self.pids: dict[str, int] = {}
        self._procs: dict[str, subprocess.Popen] = {}

    # Environment for the clients ------------------------------------------------------------
    @property
    def env(self) -> dict[str, str]:
        """os.environ plus SLURM_CONF, without Slurm variables of an enclosing job."""
        env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SBATCH_", "SRUN_"))}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        return env

    def command(self, *args: str, timeout: float = 60, check: bool = True,
                env: dict | None = None) -> subprocess.CompletedProcess:
        result = subprocess.run(list(args), capture_output=True, text=True, timeout=timeout,
                                env=env or self.env)
        if check and result.returncode != 0:
            raise SlurmError(f"{' '.join(args)} failed ({result.returncode}): "
                             f"{result.stderr.strip() or result.stdout.strip()}")
        return result

    # Start and stop --------------------------------------------------------------------------
    def start(self, timeout: float = 120) -> LocalSlurm:
        why = missing()
        if why:
            raise SlurmError(why)
        try:
            self._write_files()
            self._start_munged(timeout)
            self._start_slurm("slurmctld", timeout)
            self._start_slurm("slurmd", timeout)
            self._wait_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _write_files(self) -> None:
        munge = pwd.getpwnam("munge")
        for path in (self.root, self.conf_dir, self.log_dir, self.run_dir,
                     self.root / "state", self.root / "spool"):
            path.mkdir(parents=True, exist_ok=True)
            path.chmod(0o755)
        # munged insists on a directory and key owned by its user, writable by no one else.
        self.munge_dir.mkdir(exist_ok=True)
        os.chown(self.munge_dir, munge.pw_uid, munge.pw_gid)
        self.munge_dir.chmod(0o711)  # clients must reach the socket
        key = self.munge_dir / "munge.key"
        key.write_bytes(secrets.token_bytes(1024))
        os.chown(key, munge.pw_uid, munge.pw_gid)
        key.chmod(0o400)
        (self.conf_dir / "plugstack.conf").write_text("")
        self.conf.write_text(SLURM_CONF.format(
            host=self.host, ctld_port=_free_port(), slurmd_port=_free_port(),
            munge_socket=self.munge_socket, state=self.root / "state", spool=self.root / "spool",
            run=self.run_dir, log=self.log_dir, conf_dir=self.conf_dir, shm_cleanup=SHM_CLEANUP,
            cpus=self.cpus, memory=self.memory_mb,
            node_cpus=f"CPUs={self.cpus} Sockets=1 CoresPerSocket={self.cpus} ThreadsPerCore=1"))

    def _start_munged(self, timeout: float) -> None:
        d = self.munge_dir
        cmd = [_which("munged"), "--foreground", f"--socket={self.munge_socket}",
               f"--key-file={d / 'munge.key'}", f"--log-file={d / 'munged.log'}",
               f"--pid-file={d / 'munged.pid'}", f"--seed-file={d / 'munged.seed'}"]
        # runuser: a root process becomes `munge` without PAM prompts.
        self._spawn("munged", [_which("runuser"), "-u", "munge", "--", *cmd])
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            probe = subprocess.run(["munge", "-n", "-S", str(self.munge_socket)], capture_output=True,
                                   timeout=30)
            if probe.returncode == 0:
                return
            self._check_running("munged")
            time.sleep(0.2)
        raise self._failure("munged did not answer on its socket")

    def _start_slurm(self, name: str, timeout: float) -> None:
        args = [_which(name), "-D", "-f", str(self.conf)]
        if name == "slurmd":
            args += ["-N", self.host]
        self._spawn(name, args)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_running(name)
            probe = (["scontrol", "ping"] if name == "slurmctld" else
                     ["scontrol", "show", "node", self.host])
            result = subprocess.run(probe, capture_output=True, text=True, env=self.env, timeout=60)
            if result.returncode == 0 and (
                    "is UP" in result.stdout if name == "slurmctld" else
                    not re.search(r"State=(UNKNOWN|DOWN)", result.stdout)):
                return
            time.sleep(0.3)
        raise self._failure(f"{name} did not come up within {timeout:.0f} s")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = self.command("sinfo", "-h", "-N", "-o", "%t", check=False).stdout.split()
            if out and all(state == "idle" for state in out):
                return
            for name in DAEMONS:
                self._check_running(name)
            time.sleep(0.3)
        raise self._failure(f"the node is not idle after {timeout:.0f} s")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.log_dir / f"{name}.stdout", "ab")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, cwd=self.root)
        out.close()
        self.pids[name] = proc.pid
        self._procs[name] = proc

    def _check_running(self, name: str) -> None:
        proc = self._procs.get(name)
        if proc is not None and proc.poll() is not None:
            raise self._failure(f"{name} exited with status {proc.returncode}")

    def _failure(self, message: str) -> SlurmError:
        logs = [self.munge_dir / "munged.log", self.log_dir / "munged.stdout",
                self.log_dir / "slurmctld.log", self.log_dir / "slurmctld.stdout",
                self.log_dir / "slurmd.log", self.log_dir / "slurmd.stdout"]
        parts = [message]
        for path in logs:
            if path.exists():
                parts.append(f"--- {path}:\n{_tail(path)}")
        return SlurmError("\n".join(parts))

    def stop(self, timeout: float = 60) -> None:
        """Cancel every job and wait for them to end, then stop slurmd, slurmctld and munged
        (by pid), then end any job step daemon of this cluster still alive, with its tasks."""
        procs = self._procs
        if "slurmctld" in procs and procs["slurmctld"].poll() is None:
            self.command("scancel", f"--user={os.geteuid()}", check=False, timeout=30)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                queue = self.command("squeue", "-h", "-o", "%i %T", check=False, timeout=30)
                if queue.returncode == 0 and not queue.stdout.strip():
                    break
                time.sleep(0.5)
        for name in ("slurmd", "slurmctld", "munged"):
            proc = procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            # Each daemon leads its own session. munged runs under runuser: signal munged
            # itself, so that runuser outlives it and reaps it.
            munged = _read_pid(self.munge_dir / "munged.pid") if name == "munged" else 0
            if munged and _alive(munged):
                os.kill(munged, signal.SIGTERM)
            else:
                _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=timeout / 3)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        # munged itself may outlive runuser by a moment.
        pid = _read_pid(self.munge_dir / "munged.pid")
        deadline = time.monotonic() + 10
        while pid and _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)
        # slurmstepd daemonizes; one left over (a job that would not end) runs in our root
        # directory. End its session: the step's tasks are in it.
        for pid in self.step_daemons():
            try:
                os.killpg(os.getsid(pid), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def step_daemons(self) -> list[int]:
        """The slurmstepd processes of this cluster (their working directory is our root)."""
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if (entry / "comm").read_text().strip() == "slurmstepd" and \
                        os.readlink(entry / "cwd") == str(self.root) and _alive(int(entry.name)):
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    def running(self) -> list[str]:
        """Names of this cluster's daemons (and step daemons) that are still alive."""
        names = [name for name, pid in self.pids.items() if _alive(pid)]
        munged = _read_pid(self.munge_dir / "munged.pid")
        if munged and _alive(munged) and "munged" not in names:
            names.append("munged")
        return names + [f"slurmstepd {pid}" for pid in self.step_daemons()]

    # Jobs ------------------------------------------------------------------------------------
    def sbatch(self, *args: str, env: dict | None = None, cwd: Path | None = None) -> str:
        """Submit; returns the job id (for an array, the array's job id)."""
        result = subprocess.run(["sbatch", "--parsable", *map(str, args)], capture_output=True,
                                text=True, timeout=60, env=env or self.env, cwd=cwd)
        if result.returncode != 0:
            raise SlurmError(f"sbatch {' '.join(map(str, args))} failed: {result.stderr.strip()}")
        return result.stdout.strip().split(";")[0]

    def jobs(self, job_id: str) -> list[dict[str, str]]:
        """`scontrol show job` as dicts, one per job (an array gives one per task); [] once
        Slurm has forgotten the job."""
        result = self.command("scontrol", "show", "job", "-o", str(job_id), check=False)
        if result.returncode != 0:
            if "Invalid job id" in result.stderr:
                return []
            raise SlurmError(f"scontrol show job {job_id}: {result.stderr.strip()}")
        return [_parse_record(line) for line in result.stdout.splitlines() if line.strip()]

    def job(self, job_id: str) -> dict[str, str]:
        found = self.jobs(job_id)
        if len(found) != 1:
            raise SlurmError(f"job {job_id}: expected one record, got {len(found)}")
        return found[0]

    def wait(self, job_id: str, until, timeout: float, poll: float = 0.5) -> list[dict[str, str]]:
        """Poll until `until(records)` is true; a timeout error shows the last records."""
        deadline = time.monotonic() + timeout
        records: list[dict[str, str]] = []
        while time.monotonic() < deadline:
            records = self.jobs(job_id)
            if until(records):
                return records
            time.sleep(poll)
        states = [(r.get("JobId"), r.get("JobState"), r.get("Reason")) for r in records]
        raise SlurmError(f"job {job_id}: condition not met within {timeout:.0f} s; states {states}\n"
                         f"--- slurmctld.log:\n{_tail(self.log_dir / 'slurmctld.log', 15)}")

    def wait_finished(self, job_id: str, timeout: float) -> list[dict[str, str]]:
        """Wait until every job (array task) of `job_id` is in a final state."""
        return self.wait(job_id, lambda rs: bool(rs) and all(r["JobState"] in FINAL for r in rs), timeout)


FINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE", "PREEMPTED"}


def _parse_record(line: str) -> dict[str, str]:
    """One line of `scontrol show -o`: KEY=VALUE pairs; values may hold spaces only in the
    last fields (Command=..., Comment=...), which we never need to split."""
    fields = {}
    for match in re.finditer(r"(\w+(?::\w+)?(?:/\w+)?)=(\S*)", line):
        fields.setdefault(match.group(1), match.group(2))
    return fields


def main() -> None:  # pragma: no cover - a developer's convenience
    import argparse

    parser = argparse.ArgumentParser(description="start a one-node Slurm cluster under ROOT until Ctrl-C")
    parser.add_argument("root")
    parser.add_argument("--cpus", type=int, default=8)
    args = parser.parse_args()
    cluster = LocalSlurm(Path(args.root), cpus=args.cpus).start()
    print(f"export SLURM_CONF={cluster.conf}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
