"""The Slurm job scripts in jobs/slurm/, submitted unmodified to a real one-node Slurm cluster
(tests/slurm/cluster.py) with small runs on the digits data set.

Settings reach the scripts the way a user's would: environment variables (DBMPI_*) that
sbatch passes on, sbatch options on the command line, and `dbmpi train` options after the
script's name.
"""
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from tests.slurm.cluster import ROOT

SCRIPTS = ROOT / "jobs" / "slurm"
SHM_CLEANUP = SCRIPTS / "mpich-shm-cleanup.sh"
LONG_RUN = ("--set", "train.steps=1000000000", "--set", "train.log_every=200")


class Job:
    """A submitted job: its id, name, run root and log file(s)."""

    def __init__(self, slurm, job_id, name, tmp_path, array=False):
        self.slurm, self.id, self.name, self.tmp_path, self.array = slurm, job_id, name, tmp_path, array

    def run_dir(self, task=None):
        suffix = self.id if task is None else f"{self.id}_{task}"
        return self.tmp_path / "runs" / f"{self.name}-{suffix}"

    def log(self, task=None):
        name = f"{self.name}-{self.id}.out" if task is None else f"{self.name}-{self.id}_{task}.out"
        try:
            return (self.tmp_path / name).read_text(errors="replace")
        except OSError:
            return ""

    def records(self):
        return self.slurm.jobs(self.id)

    def record(self):
        return self.slurm.job(self.id)

    def wait(self, timeout):
        try:
            return self.slurm.wait_finished(self.id, timeout)
        except Exception as exc:
            raise AssertionError(f"{exc}\n--- job log:\n{self.log()[-3000:]}") from exc

    def context(self, task=None):
        """What to show when an assertion fails: the job's state and the end of its log."""
        states = [(r.get("JobId"), r.get("JobState"), r.get("ExitCode"), r.get("Restarts"))
                  for r in self.records()]
        return f"job {self.id} {states}\n--- log:\n{self.log(task)[-3000:]}"


def submit(slurm, tmp_path, digits, script, *args, sbatch=(), env=None):
    """sbatch jobs/slurm/SCRIPT [ARGS] from tmp_path, run directories under tmp_path/runs."""
    name = {"downpour.sbatch": "dbmpi-downpour", "sandblaster.sbatch": "dbmpi-sandblaster",
            "model_parallel.sbatch": "dbmpi-model-parallel", "sweep.sbatch": "dbmpi-sweep"}[script]
    array = any(str(option).startswith("--array") for option in sbatch) or script == "sweep.sbatch"
    output = tmp_path / ("%x-%A_%a.out" if array else "%x-%j.out")
    # Shared memory unless a test asks for the network path itself (sbatch --export=...):
    # a MPIR_CVAR_NOLOCAL exported around pytest does not leak into every job.
    inherited = {k: v for k, v in slurm.env.items() if k != "MPIR_CVAR_NOLOCAL"}
    job_env = {**inherited, "DBMPI_PYTHON": sys.executable, "DBMPI_DATA": str(digits),
               "DBMPI_RUN_ROOT": str(tmp_path / "runs"), **(env or {})}
    job_id = slurm.sbatch(f"--output={output}", *sbatch, SCRIPTS / script, *args, env=job_env, cwd=tmp_path)
    return Job(slurm, job_id, name, tmp_path, array)


def metrics(run_dir):
    """Every rank's records so far ([] before there are any)."""
    from dbmpi.io.rundir import RunDirectoryError, read_metrics

    try:
        return read_metrics(run_dir)
    except RunDirectoryError:
        return []


def progress_by_file(run_dir, progress) -> list[list]:
    """Per rank's metrics file, in its order, the progress (`progress(record)`: step or
    iteration, None for other records) it logged."""
    from dbmpi.io.rundir import metrics_files

    sequences = []
    for path in metrics_files(run_dir):
        values = []
        for line in path.read_text().splitlines():
            try:
                value = progress(json.loads(line))
            except json.JSONDecodeError:  # a line torn by a kill
                continue
            if value is not None:
                values.append(value)
        sequences.append(values)
    return sequences


def wait_for(condition, timeout, message, poll=0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise AssertionError(f"not within {timeout} s: {message()}")


def training_started(job):
    return lambda: any(r["kind"] == "train" for r in metrics(job.run_dir()))


def job_processes(job_id):
    """pid -> (command line, environment) of every process whose environment says it belongs
    to the Slurm job: the batch shell, srun or mpiexec, hydra's proxies, the ranks."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw_env = (entry / "environ").read_bytes()
            if f"\0SLURM_JOB_ID={job_id}\0".encode() not in b"\0" + raw_env + b"\0":
                continue
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
        except (OSError, IndexError):
            continue
        env = dict(item.split("=", 1) for item in raw_env.decode(errors="replace").split("\0") if "=" in item)
        found[int(entry.name)] = (cmdline, env)
    return found


def rank_processes(job_id):
    return {pid: (cmd, env) for pid, (cmd, env) in job_processes(job_id).items()
            if "mpi4py" in cmd and "dbmpi" in cmd and "PMI_RANK" in env}


def shm_segments(pids):
    """The /dev/shm/mpich_shm_* files that these processes have mapped."""
    found = set()
    for pid in pids:
        try:
            for line in Path(f"/proc/{pid}/maps").read_text().splitlines():
                path = line.split()[-1]
                if path.startswith("/dev/shm/mpich_shm_"):
                    found.add(path)
        except OSError:
            continue
    return found


def fnv1a(text):
    value = 2166136261
    for byte in text.encode():
        value = ((value ^ byte) * 16777619) & 0xFFFFFFFF
    return value


def verify_checkpoint(path):
    result = subprocess.run([sys.executable, "-m", "dbmpi", "inspect", str(path), "--verify"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result.stdout


# --- runs to completion --------------------------------------------------------------------

@pytest.mark.timeout(300)
@pytest.mark.parametrize("launcher", ["srun", "mpiexec"])
def test_downpour_job_runs_to_completion(slurm, tmp_path, digits, launcher):
    from dbmpi.io.checkpoint import list_checkpoints, open_checkpoint

    # the config's own 30 epochs: at 15, one CI run under heavy load ended at 0.875
    job = submit(slurm, tmp_path, digits, "downpour.sbatch", env={"DBMPI_LAUNCHER": launcher})
    (record,) = job.wait(240)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", job.context()
    run_dir = job.run_dir()  # one run directory per job id, under DBMPI_RUN_ROOT
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.9, summary
    assert summary["layout"]["world_size"] == 4 and summary["stopped_by_signal"] is False
    assert not [r for r in metrics(run_dir) if r["kind"] == "resume"]  # --resume auto: a fresh start
    log = job.log()
    assert f"launcher {launcher}" in log and "final test accuracy" in log
    # the rank -> role table, from the run itself
    for rank, role in enumerate(["replica 0 partition 0", "replica 1 partition 0", "shard 0", "shard 1"]):
        assert f"{rank}  {role}" in log, log[-3000:]
    last = list_checkpoints(run_dir / "checkpoints")[-1]
    verify_checkpoint(last)
    with open_checkpoint(last) as ckpt:
        assert ckpt.state["phase"] == "end"


# UCX's address exchange in MPI_Init sometimes cannot open a peer's /proc/PID/fd link under
# srun ("mm_posix.c ... open(/proc/PID/fd/N) failed", openucx/ucx#4224 and #8511; once in our
# CI). Outside dbmpi, before any of its code runs; docs/GUIDE.md (troubleshooting) gives the
# workaround. The test then submits the job once more.
UCX_STARTUP_RACE = ("mm_posix.c", "internal_Init_thread")


def network_path_job(slurm, tmp_path, digits, tries: int = 2):
    """Submit downpour.sbatch on the network path; (job, ranks, their segments, record) once
    its 4 ranks are seen initialised and the job has ended."""
    for attempt in range(tries):
        job = submit(slurm, tmp_path, digits, "downpour.sbatch", sbatch=["--export=ALL,MPIR_CVAR_NOLOCAL=1"])
        try:
            # The ranks map their segment in MPI_Init (python -m mpi4py, before dbmpi loads) and
            # keep it until MPI_Finalize, seconds later at the least: look while they train.
            def initialised(job=job):
                ranks = rank_processes(job.id)
                mapped = {pid: shm_segments([pid]) for pid in ranks}
                if len(ranks) == 4 and all(mapped.values()):
                    return ranks, mapped
                ended = [r for r in job.records() if r.get("JobState") not in ("PENDING", "RUNNING", None)]
                return "ended" if ended else None
            seen = wait_for(initialised, 180, lambda job=job: f"ranks {rank_processes(job.id)}; {job.context()}",
                            poll=0.2)
            (record,) = job.wait(300)
        finally:
            slurm.command("scancel", job.id, check=False)
        if seen != "ended":
            return job, *seen, record
        if attempt + 1 == tries or not all(marker in job.log() for marker in UCX_STARTUP_RACE):
            raise AssertionError(f"the job ended before its ranks were seen: {job.context()}")
        warnings.warn(f"UCX startup race in MPI_Init, job {job.id} submitted again", stacklevel=1)
    raise AssertionError("unreachable")


@pytest.mark.timeout(420)
def test_downpour_job_on_the_network_path(slurm, tmp_path, digits):
    """sbatch --export=ALL,MPIR_CVAR_NOLOCAL=1: MPICH uses its network module between the
    ranks even on one node, as it does between nodes (RMA through the netmod, no shared
    memory). The job completes with what a user relies on: the accuracy, the run directory,
    its summary and final checkpoint. While it runs, the variable is in every rank's
    environment and MPICH honoured it: each rank is a node of its own, so each maps its own
    /dev/shm/mpich_shm_* segment (on the shared-memory path all four map one, see
    test_scancel_stops_the_ranks_cleanly_and_leaves_nothing_behind)."""
    from dbmpi.io.checkpoint import list_checkpoints, open_checkpoint

    job, ranks, mapped, record = network_path_job(slurm, tmp_path, digits)
    for cmd, env in ranks.values():
        assert env.get("MPIR_CVAR_NOLOCAL") == "1", cmd
    segments = [segment for found in mapped.values() for segment in found]
    assert len(mapped) == 4 and len(segments) == len(set(segments)) == 4, mapped
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", job.context()
    run_dir = job.run_dir()
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.9, summary
    assert summary["layout"]["world_size"] == 4 and summary["stopped_by_signal"] is False, summary
    assert "launcher srun" in job.log() and "final test accuracy" in job.log(), job.context()
    last = list_checkpoints(run_dir / "checkpoints")[-1]
    verify_checkpoint(last)
    with open_checkpoint(last) as ckpt:
        assert ckpt.state["phase"] == "end"
    wait_for(lambda: not job_processes(job.id), 30, lambda: f"left behind: {job_processes(job.id)}")
    wait_for(lambda: not any(os.path.exists(s) for s in segments), 30, lambda: f"left behind: {segments}")


@pytest.mark.timeout(300)
def test_model_parallel_job_runs_to_completion(slurm, tmp_path, digits):
    job = submit(slurm, tmp_path, digits, "model_parallel.sbatch", "--set", "train.n_partitions=2",
                 "--set", "train.epochs=10", env={"DBMPI_CONFIG": str(ROOT / "configs/downpour_digits.toml")})
    (record,) = job.wait(240)
    assert record["JobState"] == "COMPLETED", job.context()
    summary = json.loads((job.run_dir() / "summary.json").read_text())
    assert summary["layout"]["n_partitions"] == 2 and summary["layout"]["world_size"] == 6
    assert summary["test_accuracy"] >= 0.85, summary
    replicas = [r for r in metrics(job.run_dir()) if r["kind"] == "replica"]
    assert sorted((r["replica"], r["partition"]) for r in replicas) == [(0, 0), (0, 1), (1, 0), (1, 1)]


@pytest.mark.timeout(300)
def test_a_pytorch_model_job_runs_to_completion(slurm, tmp_path, digits):
    """downpour.sbatch unchanged, with a config naming a PyTorch CNN ([model] python)."""
    from tests.conftest import require_torch

    require_torch()
    job = submit(slurm, tmp_path, digits, "downpour.sbatch",
                 env={"DBMPI_CONFIG": str(ROOT / "configs/downpour_digits_torch.toml")})
    (record,) = job.wait(240)
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", job.context()
    summary = json.loads((job.run_dir() / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.95 and summary["layout"]["world_size"] == 4, summary
    assert "(torch Sequential)" in job.log(), job.context()


@pytest.mark.timeout(300)
def test_sandblaster_job_runs_to_completion(slurm, tmp_path, digits):
    job = submit(slurm, tmp_path, digits, "sandblaster.sbatch", "--set", "train.iterations=25")
    (record,) = job.wait(240)
    assert record["JobState"] == "COMPLETED", job.context()
    summary = json.loads((job.run_dir() / "summary.json").read_text())
    assert summary["iterations"] == 25 and summary["test_accuracy"] >= 0.9, summary
    assert "4  coordinator" in job.log(), job.context()


# --- a sweep as a job array ----------------------------------------------------------------

@pytest.mark.timeout(300)
def test_sweep_array_gives_each_task_its_value_and_run_directory(slurm, tmp_path, digits):
    """Two values, three tasks: tasks 0 and 1 train with their learning rate in their own run
    directory; task 2 has no value and fails with one message."""
    job = submit(slurm, tmp_path, digits, "sweep.sbatch", "--set", "train.epochs=8", sbatch=["--array=0-2"],
                 env={"DBMPI_SWEEP_VALUES": "0.05 0.1"})
    records = job.wait(240)
    states = {int(r["ArrayTaskId"]): r["JobState"] for r in records}
    assert states == {0: "COMPLETED", 1: "COMPLETED", 2: "FAILED"}, [job.context(t) for t in range(3)]
    for task, rate in ((0, 0.05), (1, 0.1)):
        run_dir = job.run_dir(task)
        assert f"learning_rate = {rate}" in (run_dir / "config.toml").read_text()
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["test_accuracy"] >= 0.85, (task, summary)
        assert f"train.learning_rate={rate}" in job.log(task)
    errors = [line for line in job.log(2).splitlines() if line.startswith("dbmpi-slurm: error:")]
    assert errors == ["dbmpi-slurm: error: array task 2, but DBMPI_SWEEP_VALUES has only 2 values: 0.05 0.1"]
    assert not job.run_dir(2).exists()


# --- time limit, signal, requeue, resume --------------------------------------------------

def _downpour_step(record):
    return record["step"] if record["kind"] == "train" and record["replica"] == 0 else None


def _sandblaster_iteration(record):
    return record["iteration"] if record["kind"] == "iteration" else None


@pytest.mark.timeout(420)
@pytest.mark.parametrize("script,args,progress", [
    ("downpour.sbatch", LONG_RUN, _downpour_step),
    ("sandblaster.sbatch", ("--set", "train.iterations=1000000000", "--set", "train.batch_size=200",
                            "--set", "train.tolerance=0"), _sandblaster_iteration),
], ids=["downpour", "sandblaster"])
def test_time_limit_signals_checkpoints_requeues_and_resumes(slurm, tmp_path, digits, script, args, progress):
    """--time=1 with the warning 20 s before: the batch shell gets USR1, the ranks
    checkpoint and exit 0, the job requeues itself and its second start resumes from that
    checkpoint in the same run directory and trains on. (Slurm checks time limits about
    every 30 s, so the warning comes 20 to 50 s before the limit.) While the job waits in
    the queue the test lengthens its limit, so that its second start is not warned too."""
    from dbmpi.io.checkpoint import open_checkpoint

    job = submit(slurm, tmp_path, digits, script, *args, sbatch=["--time=1", "--signal=B:USR1@20"])
    run_dir = job.run_dir()
    try:
        slurm.wait(job.id, lambda rs: rs and int(rs[0]["Restarts"]) >= 1, timeout=180)
        # Requeued: give the second start time enough not to be warned again (the job waits
        # about 10 s before it is eligible again).
        slurm.command("scontrol", "update", f"JobId={job.id}", "TimeLimit=10")
        resumed = wait_for(lambda: [r for r in metrics(run_dir) if r["kind"] == "resume"], 180,
                           lambda: job.context())
        step = resumed[0]["step"]
        wait_for(lambda: any((progress(r) or 0) > step for r in metrics(run_dir)), 120, lambda: job.context())
        record = job.record()
        assert record["JobState"] == "RUNNING" and record["Restarts"] == "1", job.context()
    finally:
        slurm.command("scancel", job.id, check=False)
    job.wait(120)

    log = job.log()
    assert log.count("dbmpi-slurm: passing USR1 on to the ranks") == 1, log[-3000:]
    assert f"dbmpi-slurm: requeueing job {job.id}" in log and "start 2," in log
    assert len(resumed) == 1 and step > 0
    ckpt = Path(resumed[0]["checkpoint"])
    assert ckpt.parent == run_dir / "checkpoints" and ckpt.name == f"ckpt-{step:09d}.h5"
    verify_checkpoint(ckpt)
    with open_checkpoint(ckpt) as opened:
        assert opened.state["phase"] == "signal" and opened.step == step
    # Each rank appends to its own metrics file across both starts: in every file that logs
    # progress, the first start's values (up to the checkpoint's step) come first and never
    # fall (a second start from scratch would), then the second start's go past it.
    # (Sandblaster's second start first logs the objective at the checkpoint's iterate.)
    sequences = [seq for seq in progress_by_file(run_dir, progress) if seq]
    assert sequences, "no rank logged progress"
    for seq in sequences:
        split = next((i for i, value in enumerate(seq) if value > step), len(seq))
        before, after = seq[:split], seq[split:]
        assert before and after and before == sorted(before) and max(before) <= step, (before[-3:], step, after[:3])


@pytest.mark.timeout(300)
def test_a_failover_job_survives_a_killed_replica(slurm, tmp_path, digits):
    """DBMPI_FAILOVER=1 (mpiexec -disable-auto-cleanup, each rank under dbmpi.runtime.supervise):
    replica 1's rank is SIGKILLed mid-run; the job goes on, replica 0 trains every step,
    shard 0 writes the final checkpoint and a summary naming the failed replica; the job's
    exit code is the killed rank's (137), and nothing of it is left running."""
    from dbmpi.io.checkpoint import list_checkpoints, open_checkpoint

    steps = 30000
    job = submit(slurm, tmp_path, digits, "downpour.sbatch", "--set", f"train.steps={steps}",
                 "--set", "train.replica_timeout_s=4", "--set", "train.n_fetch=20", "--set", "train.n_push=20",
                 "--set", "train.log_every=500",
                 env={"DBMPI_LAUNCHER": "mpiexec", "DBMPI_FAILOVER": "1"})
    try:
        wait_for(training_started(job), 120, lambda: job.context())
        # the ranks themselves: the supervised children, not their dbmpi.runtime.supervise parents
        ranks = wait_for(lambda: (r := {int(env["PMI_RANK"]): pid for pid, (cmd, env) in rank_processes(job.id).items()
                                        if "dbmpi.runtime.supervise" not in cmd}) and len(r) == 4 and r, 60,
                         lambda: job.context())
        os.kill(ranks[1], 9)
        (record,) = job.wait(240)
    finally:
        slurm.command("scancel", job.id, check=False)
    assert record["JobState"] == "FAILED" and record["ExitCode"].startswith("137"), job.context()
    log = job.log()
    assert "-disable-auto-cleanup" in log and "dbmpi.runtime.supervise" in log, log[-3000:]
    assert "dbmpi: replica 1 failed" in log, log[-3000:]
    summary = json.loads((job.run_dir() / "summary.json").read_text())
    assert summary["failed_replicas"] == [1] and summary["steps_by_replica"][1] is None, summary
    assert summary["steps_by_replica"][0] >= steps, summary
    final = list_checkpoints(job.run_dir() / "checkpoints")[-1]
    verify_checkpoint(final)
    with open_checkpoint(final) as ckpt:
        assert ckpt.state["phase"] == "end"
    wait_for(lambda: not job_processes(job.id), 30, lambda: f"left behind: {job_processes(job.id)}")


@pytest.mark.timeout(300)
def test_a_failover_job_checkpoints_and_requeues_on_usr1(slurm, tmp_path, digits):
    """Under dbmpi.runtime.supervise the batch shell passes the time-limit warning on as TERM (the
    supervisors ignore USR1, hydra's failure notice): every rank checkpoints, the job
    requeues itself."""
    from dbmpi.io.checkpoint import list_checkpoints, open_checkpoint

    job = submit(slurm, tmp_path, digits, "downpour.sbatch", *LONG_RUN,
                 env={"DBMPI_LAUNCHER": "mpiexec", "DBMPI_FAILOVER": "1"})
    try:
        wait_for(training_started(job), 120, lambda: job.context())
        slurm.command("scancel", "--batch", "--signal=USR1", job.id)
        slurm.wait(job.id, lambda rs: rs and int(rs[0]["Restarts"]) >= 1, timeout=120)
    finally:
        slurm.command("scancel", job.id, check=False)
    job.wait(120)
    log = job.log()
    assert "dbmpi-slurm: passing USR1 (as TERM) on to the ranks" in log, log[-3000:]
    assert f"dbmpi-slurm: requeueing job {job.id}" in log, log[-3000:]
    phases = []
    for path in list_checkpoints(job.run_dir() / "checkpoints"):
        verify_checkpoint(path)
        with open_checkpoint(path) as ckpt:
            phases.append(ckpt.state["phase"])
    assert "signal" in phases, phases


def test_failover_needs_the_mpiexec_launcher(slurm, tmp_path, digits):
    job = submit(slurm, tmp_path, digits, "downpour.sbatch", env={"DBMPI_FAILOVER": "1"})
    (record,) = job.wait(60)
    assert record["JobState"] == "FAILED" and record["ExitCode"].startswith("2"), job.context()
    assert "DBMPI_FAILOVER=1 needs DBMPI_LAUNCHER=mpiexec" in job.log()


# --- scancel and killed ranks leave nothing behind -----------------------------------------

@pytest.mark.timeout(300)
def test_scancel_stops_the_ranks_cleanly_and_leaves_nothing_behind(slurm, tmp_path, digits):
    """scancel: Slurm sends SIGTERM to the ranks, which checkpoint and finish MPI; no process
    of the job and no shared-memory segment of its ranks is left. Also checks the thread
    settings per rank (--cpus-per-task=2)."""
    from dbmpi.io.checkpoint import list_checkpoints, open_checkpoint

    job = submit(slurm, tmp_path, digits, "downpour.sbatch", *LONG_RUN, sbatch=["--cpus-per-task=2"])
    try:
        wait_for(training_started(job), 120, lambda: job.context())
        ranks = wait_for(lambda: (r := rank_processes(job.id)) and len(r) == 4 and r, 60,
                         lambda: f"ranks {rank_processes(job.id)}; {job.context()}")
        for cmd, env in ranks.values():
            assert env["OMP_NUM_THREADS"] == "2" and env["OPENBLAS_NUM_THREADS"] == "2", cmd
        segments = shm_segments(ranks)
        # under srun --mpi=pmi2, MPICH names the segment after "<job id>.<step id>"
        assert segments == {f"/dev/shm/mpich_shm_{fnv1a(f'{job.id}.0'):x}_0"}, segments
    finally:
        slurm.command("scancel", job.id, check=False)
    (record,) = job.wait(120)
    assert record["JobState"] == "CANCELLED", job.context()
    wait_for(lambda: not job_processes(job.id), 30, lambda: f"left behind: {job_processes(job.id)}")
    wait_for(lambda: not any(os.path.exists(s) for s in segments), 30, lambda: f"left behind: {segments}")
    assert "threads = 2" in (job.run_dir() / "config.toml").read_text()
    summary = json.loads((job.run_dir() / "summary.json").read_text())
    assert summary["stopped_by_signal"] is True
    with open_checkpoint(list_checkpoints(job.run_dir() / "checkpoints")[-1]) as ckpt:
        assert ckpt.state["phase"] == "signal"


@pytest.mark.timeout(420)
def test_killed_ranks_leave_nothing_and_stale_segments_do_not_break_a_later_job(slurm, tmp_path, digits):
    """scancel --signal=KILL: the ranks die without MPI_Finalize; the job ends, nothing of it
    keeps running, and the cluster's Epilog (jobs/slurm/mpich-shm-cleanup.sh) removes the
    segment they leave. A stale segment under the next job's name (as after a controller
    restarted with fresh state) would make that job fail in MPI_Init; the Prolog (the same
    script) clears it and the job runs."""
    job = submit(slurm, tmp_path, digits, "downpour.sbatch", *LONG_RUN)
    try:
        wait_for(training_started(job), 120, lambda: job.context())
        ranks = wait_for(lambda: (r := rank_processes(job.id)) and len(r) == 4 and r, 60,
                         lambda: job.context())
        segments = shm_segments(ranks)
        assert len(segments) == 1, segments
        slurm.command("scancel", "--signal=KILL", job.id)
    finally:
        slurm.command("scancel", job.id, check=False)
    (record,) = job.wait(120)
    assert record["JobState"] in ("FAILED", "CANCELLED"), job.context()
    wait_for(lambda: not job_processes(job.id), 30, lambda: f"left behind: {job_processes(job.id)}")
    wait_for(lambda: not any(os.path.exists(s) for s in segments), 60, lambda: f"left behind: {segments}")

    # Job ids are sequential and these tests submit one job at a time: the next is id + 1.
    stale = Path(f"/dev/shm/mpich_shm_{fnv1a(f'{int(job.id) + 1}.0'):x}_0")
    stale.write_bytes(os.urandom(8192))
    try:
        later = submit(slurm, tmp_path, digits, "downpour.sbatch", "--set", "train.epochs=3")
        assert later.id == str(int(job.id) + 1)
        (record,) = later.wait(240)
        assert record["JobState"] == "COMPLETED", later.context()
        assert not stale.exists()
    finally:
        stale.unlink(missing_ok=True)


def test_shm_cleanup_removes_only_unused_segments_of_the_job(tmp_path):
    """The Prolog/Epilog script on its own, against a stand-in /dev/shm: this job's
    segments go (any step), another job's and one still mapped by a live process stay."""
    job = 4000000123
    name = lambda text: f"mpich_shm_{fnv1a(text):x}_0"  # noqa: E731
    mine = [tmp_path / name(f"{job}.0"), tmp_path / name(f"{job}.7"),
            tmp_path / f"mpich_vci_{fnv1a(f'{job}.0'):x}_0"]
    other = tmp_path / name(f"{job + 1}.0")
    busy = tmp_path / name(f"{job}.1")
    for path in (*mine, other, busy):
        path.write_bytes(b"\0" * 4096)
    holder = subprocess.Popen([sys.executable, "-c", "import mmap, sys, time\n"
                               "f = open(sys.argv[1], 'r+b'); m = mmap.mmap(f.fileno(), 4096); f.close()\n"
                               "print('mapped', flush=True); time.sleep(120)", str(busy)],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "mapped"
        env = {**os.environ, "SLURM_JOB_ID": str(job), "DBMPI_SHM_DIR": str(tmp_path)}
        result = subprocess.run(["bash", str(SHM_CLEANUP)], env=env, capture_output=True, text=True, timeout=60)
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert result.returncode == 0, result.stderr
    assert not any(p.exists() for p in mine), result.stdout
    assert other.exists() and busy.exists(), result.stdout
    assert f"{busy} is in use; kept" in result.stdout
    # without a job id (or with a bad one) it does nothing and still succeeds (a failing
    # prolog or epilog would drain the node)
    for bad in ("", "12x"):
        env = {**os.environ, "SLURM_JOB_ID": bad, "DBMPI_SHM_DIR": str(tmp_path)}
        result = subprocess.run(["bash", str(SHM_CLEANUP)], env=env, capture_output=True, text=True, timeout=60)
        assert result.returncode == 0 and other.exists() and busy.exists()


# --- bad input: one clear message, nothing launched -----------------------------------------

@pytest.mark.timeout(300)
@pytest.mark.parametrize("sbatch,env,message", [
    (["--ntasks=3"], {}, "dbmpi-slurm: error: the run's layout does not match the job's 3 tasks"),
    ([], {"DBMPI_LAUNCHER": "mpirun"}, "dbmpi-slurm: error: DBMPI_LAUNCHER=mpirun: must be srun or mpiexec"),
    ([], {"DBMPI_CONFIG": "/nonexistent/run.toml"}, "dbmpi-slurm: error: DBMPI_CONFIG=/nonexistent/run.toml: "
                                                    "no such file"),
    ([], {"DBMPI_PYTHON": "/bin/false"}, "dbmpi-slurm: error: DBMPI_PYTHON=/bin/false cannot import dbmpi"),
])
def test_bad_settings_fail_the_job_with_one_message(slurm, tmp_path, digits, sbatch, env, message):
    job = submit(slurm, tmp_path, digits, "downpour.sbatch", sbatch=sbatch, env=env)
    (record,) = job.wait(120)
    assert record["JobState"] == "FAILED" and record["ExitCode"] == "2:0", job.context()
    errors = [line for line in job.log().splitlines() if line.startswith("dbmpi-slurm: error:")]
    assert len(errors) == 1 and errors[0].startswith(message), job.context()
    assert "srun --mpi=pmi2" not in job.log()  # nothing was launched
    if sbatch == ["--ntasks=3"]:  # dbmpi's own verdict names the layout
        assert "needs 2 replica(s) x 1 partition(s) + 2 shard(s) = 4" in job.log()
