"""Downpour survives a failed replica (the paper's claim), and ends in bounded time when it
cannot: `mpiexec -disable-auto-cleanup` with every rank under `python -m dbmpi.runtime.supervise`,
a rank SIGKILLed mid-run, every MPI launch under a timeout.

The kills are real SIGKILLs at a random moment. One that lands while the victim is inside an
MPI accumulate (MPICH holds a shared-memory mutex there, never released by a dead holder)
freezes that window for everyone; the watchdog then ends the job instead. The runs below
fetch and push every 20 steps of 64 examples, so the victim spends well under 1% of its
time there. They are long enough (20000 steps) for the survivors to train on well past the
detection, which takes train.replica_timeout_s (4 s here).
"""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_downpour import CONFIG, background_training, metrics_text, rank_pids, records

TIMEOUT_S = 4  # train.replica_timeout_s in these runs
RHYTHM = ["train.n_fetch=20", "train.n_push=20", "train.batch_size=64", "train.log_every=500"]




def none_left(marker: str, within_s: float = 10.0) -> bool:
    """No rank process left (children die with their supervisor, a moment after it)."""
    deadline = time.monotonic() + within_s
    while rank_pids(marker):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def supervised_training(tmp_path, run_dir, n, *sets, disable_auto_cleanup=True, config=CONFIG, env=None):
    """`mpiexec [-disable-auto-cleanup] -n N python -m dbmpi.runtime.supervise ... dbmpi train` in
    the background (tests.test_downpour.background_training); killed if still running after."""
    return background_training(tmp_path, run_dir, f"train.replica_timeout_s={TIMEOUT_S}", *sets, config=config,
                               ranks=n, budget=(), env=env,
                               mpiexec_args=["-disable-auto-cleanup"] if disable_auto_cleanup else [],
                               wrapper=[sys.executable, "-m", "dbmpi.runtime.supervise"])


def wait_until_training(run_dir, n, proc, train_records=2, timeout=120):
    """Until the lead has logged `train_records` train records and all n ranks run."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics_text(run_dir).count('"kind": "train"') >= train_records \
                and len(rank_pids(str(run_dir))) == n:
            return rank_pids(str(run_dir))
        time.sleep(0.1)
    out, err = proc.communicate(timeout=60) if proc.poll() is not None else ("", "")
    pytest.fail(f"training did not start: {err[-2000:]}")


def verified_checkpoints(run_dir):
    from dbmpi.io.checkpoint import list_checkpoints, open_checkpoint

    paths = list_checkpoints(run_dir / "checkpoints")
    for path in paths:
        open_checkpoint(path).close()  # every checksum verified
    return paths


@pytest.mark.parametrize("victim", [1, 0], ids=["replica-1", "replica-0-the-lead"])
def test_a_killed_replica_does_not_stop_training(tmp_path, victim):
    """Three replicas, two shards; one replica's worker is SIGKILLed mid-run. Shard 0
    declares it failed after train.replica_timeout_s without a heartbeat, the other two
    finish every step, every push of theirs is applied, and shard 0 writes a final
    checkpoint with the state of the lowest surviving replica (the lead's state, unless the
    lead was the one that died) and a summary naming the failed replica."""
    from dbmpi.io.checkpoint import open_checkpoint

    run_dir, steps, warm = tmp_path / "run", 20000, 50
    with supervised_training(tmp_path, run_dir, 5, "train.n_replicas=3", f"train.steps={steps}",
                             f"train.warmstart_steps={warm}", "train.checkpoint_every=2000",
                             "train.checkpoint_keep=20", *RHYTHM) as proc:
        pids = wait_until_training(run_dir, 5, proc)
        killed_unix, killed = time.time(), time.monotonic()
        os.kill(pids[victim], signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
        ended_s = time.monotonic() - killed
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failed_replicas"] == [victim], err[-3000:]
    # The job's status is the killed rank's, as its supervisor reports it: 128 + SIGKILL.
    assert proc.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert ended_s < 120
    expected = [warm + steps, steps, steps]
    expected[victim] = None
    assert summary["steps_by_replica"] == expected
    assert summary["test_accuracy"] >= 0.9, summary
    recs = records(run_dir)
    # The two survivors split the final evaluation: every test row scored once.
    [final] = [r for r in recs if r["kind"] == "eval" and r.get("source") == "shards"]
    assert final["evaluators"] == 2 and final["test_examples"] == summary["test_examples"] > 0
    failures = [r for r in recs if r["kind"] == "replica_failed"]
    assert len(failures) == 1 and failures[0]["replica"] == victim
    assert failures[0]["ranks"] == failures[0]["silent_ranks"] == [victim]
    # Its last heartbeat came up to one interval (timeout / 10) before the kill.
    detection_s = failures[0]["detected_unix"] - killed_unix
    assert TIMEOUT_S - 1 <= detection_s <= TIMEOUT_S + 15, detection_s
    assert err.count(f"dbmpi: replica {victim} failed") == 1, err[-3000:]
    assert "Traceback" not in err
    # The survivors trained on after the failure and every one of their pushes was applied.
    survivors = [r for r in recs if r["kind"] == "replica"]
    assert sorted(r["replica"] for r in survivors) == sorted({0, 1, 2} - {victim})
    shards = [r for r in recs if r["kind"] == "shard"]
    assert len(shards) == 2 and all(s["workers_failed"] == 1 for s in shards)
    for r in survivors:
        assert r["steps"] == expected[r["replica"]] and r["pushes"] == -(-r["steps"] // 20)
        assert all(s["pushes_by_replica"][r["replica"]] == r["pushes"] for s in shards)
    # The final checkpoint: valid, at the acting lead's final step, naming the failure.
    lead = min(r["replica"] for r in survivors)
    paths = verified_checkpoints(run_dir)
    assert paths[-1].name == summary["final_checkpoint"]
    with open_checkpoint(paths[-1]) as ckpt:
        assert ckpt.step == expected[lead]
        assert ckpt.state["lead_replica"] == lead and ckpt.state["failed_replicas"] == [victim]
        assert ckpt.state["phase"] == "end"
    # Training went on after the failure was declared: periodic checkpoints were asked for
    # later, by the lowest surviving replica (replica 1 took over when replica 0 failed).
    later = []
    for path in paths[:-1]:
        with open_checkpoint(path) as ckpt:
            if path.stat().st_mtime > failures[0]["detected_unix"]:
                later.append(ckpt.state["replica"])
    assert later and set(later) == {lead}, later
    assert none_left(str(run_dir))


# Many tiny replicas on few cores: each step's compute is a sleep beside a tiny batch
# (DBMPI_STEP_SLEEP), so the ranks take turns on the cores as if each had its own.
MANY_TINY = ["train.n_shards=2", "train.steps=100000000", "train.warmstart_steps=10", "train.batch_size=8",
             "train.n_fetch=10", "train.n_push=10", "train.log_every=50", "train.eval_every=100000000"]


def kill_one_of_many(tmp_path, n_replicas: int, timeout_s: float = 10.0, budget_s: float = 40.0,
                     step_sleep_s: float = 0.01) -> dict:
    """R tiny replicas and two shards under the failover launcher, each replica training for
    `budget_s` seconds; the last replica is SIGKILLed once training runs. Returns what a user
    sees (exit status, stderr, summary, records) and two times: `detection_s` from the kill
    to the replica_failed record, `end_of_run_s` from the survivors' time budget running out
    (the lead's loop start, from its first train record, + budget_s) to the job's exit.
    Used by the test below and bench/scale_control.py."""
    run_dir, n = tmp_path / f"run-{n_replicas}", n_replicas + 2
    with supervised_training(tmp_path, run_dir, n, f"train.n_replicas={n_replicas}", *MANY_TINY,
                             f"train.replica_timeout_s={timeout_s}", f"train.time_budget_s={budget_s}",
                             env={"DBMPI_STEP_SLEEP": str(step_sleep_s)}) as proc:
        pids = wait_until_training(run_dir, n, proc, train_records=1, timeout=900)
        seen = time.time()
        killed_unix = time.time()
        os.kill(pids[n_replicas - 1], signal.SIGKILL)
        out, err = proc.communicate(timeout=budget_s + 900)
        exited_unix = time.time()
    recs = records(run_dir)
    first_train = next(r for r in recs if r["kind"] == "train")
    failures = [r for r in recs if r["kind"] == "replica_failed"]
    budget_end = seen - first_train["elapsed_s"] + budget_s
    return {"replicas": n_replicas, "ranks": n, "replica_timeout_s": timeout_s, "budget_s": budget_s,
            "status": proc.returncode, "err": err, "out": out, "records": recs,
            "summary": json.loads((run_dir / "summary.json").read_text()),
            "detection_s": failures[0]["detected_unix"] - killed_unix if failures else None,
            "end_of_run_s": exited_unix - budget_end, "run_dir": run_dir}


def test_32_oversubscribed_replicas_survive_a_killed_one(tmp_path):
    """32 replicas and 2 shards (34 ranks) on a two-core machine, one replica SIGKILLed: the
    shard holding its heartbeat (shard 1, not shard 0) declares it failed after the timeout,
    with one line, the others finish on their time budget, the job ends in bounded time with
    the killed rank's status, and the summary names the failure. Bounds are generous: the
    ranks share two cores with whatever else runs."""
    run = kill_one_of_many(tmp_path, 32)
    err = run["err"]
    assert run["status"] == 128 + signal.SIGKILL, err[-3000:]
    assert run["summary"]["failed_replicas"] == [31], err[-3000:]
    assert err.count("dbmpi: replica 31 failed") == 1 and "Traceback" not in err, err[-3000:]
    assert "31 replica(s) train on" in err
    failures = [r for r in run["records"] if r["kind"] == "replica_failed"]
    assert len(failures) == 1 and failures[0]["ranks"] == [31]
    # Not before the timeout less what a starved victim may have missed; at most a minute late.
    assert run["replica_timeout_s"] / 2 <= run["detection_s"] <= run["replica_timeout_s"] + 60, run["detection_s"]
    survivors = [r for r in run["records"] if r["kind"] == "replica"]
    assert sorted(r["replica"] for r in survivors) == list(range(31))
    assert all(r["steps"] > 0 for r in survivors)
    shards = [r for r in run["records"] if r["kind"] == "shard"]
    assert len(shards) == 2 and all(s["workers_failed"] == 1 for s in shards)
    assert run["end_of_run_s"] < 180, run["end_of_run_s"]
    assert none_left(str(run["run_dir"]))


def test_a_killed_partition_takes_its_replica_out_and_the_other_replica_finishes(tmp_path):
    """Two replicas of two partitions and one shard; partition 1 of replica 0 is killed.
    Its sibling waits in a collective that never completes (its watchdog ends it after
    2 x the timeout) or, where MPI reports the dead partner, gets an MPI error from it:
    either way it leaves with one line and status 5, never MPI_Abort. (This test once
    failed when MPICH read the dying partner's memory with process_vm_readv, got ESRCH and
    aborted the whole job from inside Allgatherv, replica 1 included: the supervisor now
    turns those single-copy transfers off.) The shards declare the whole replica failed,
    replica 1 finishes and gives the final checkpoint its state. The run is short (1000 steps, the kill after 200): a
    partitioned replica steps in lockstep, which on an oversubscribed machine takes
    scheduler turns per step (under heavy load 5000 steps took more than 8 minutes), and
    the shards wait for the verdict on replica 0 however early replica 1 finishes."""
    from dbmpi.io.checkpoint import open_checkpoint

    run_dir, steps = tmp_path / "run", 1000
    with supervised_training(tmp_path, run_dir, 5, "train.n_partitions=2", "train.n_shards=1",
                             f"train.steps={steps}", *RHYTHM, "train.log_every=100") as proc:
        pids = wait_until_training(run_dir, 5, proc)
        killed = time.monotonic()
        os.kill(pids[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=500)
        ended_s = time.monotonic() - killed
    assert proc.returncode != 0 and ended_s < 400, (proc.returncode, ended_s)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failed_replicas"] == [0] and summary["steps_by_replica"] == [None, steps], err[-3000:]
    failure = next(r for r in records(run_dir) if r["kind"] == "replica_failed")
    assert failure["ranks"] == [0, 1] and 1 in failure["silent_ranks"]
    # The sibling leaves on its own, by either documented path, with one line.
    sibling = re.findall(r"dbmpi: rank 0 \(replica 0 partition 0\): (no progress for \d+ s|MPI error \()", err)
    assert len(sibling) == 1, err[-3000:]
    assert "dbmpi: error on rank" not in err and "Traceback" not in err, err[-3000:]
    workers = sorted((r["replica"], r["partition"], r["steps"]) for r in records(run_dir) if r["kind"] == "replica")
    assert workers == [(1, 0, steps), (1, 1, steps)]
    with open_checkpoint(verified_checkpoints(run_dir)[-1]) as ckpt:
        assert ckpt.step == steps and ckpt.state["lead_replica"] == 1
    assert none_left(str(run_dir))


def test_a_killed_shard_ends_the_job_with_the_checkpoints_intact(tmp_path):
    """A shard's parameters cannot be recovered: the others notice its silent heartbeat (or
    shard 0 its failed transfer, when it dies sending a checkpoint slice) and abort the job
    (non-zero) within bounded time; every checkpoint written still verifies. (Killed inside
    an accumulate, the shard would leave its window locked: the others' MPI calls then block
    and their watchdogs end them instead, also in bounded time.)"""
    from dbmpi.io.checkpoint import list_checkpoints

    run_dir = tmp_path / "run"
    with supervised_training(tmp_path, run_dir, 4, "train.steps=100000000", "train.checkpoint_every=200",
                             *RHYTHM) as proc:
        wait_until_training(run_dir, 4, proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list_checkpoints(run_dir / "checkpoints")) < 2:
            time.sleep(0.1)
        pids = rank_pids(str(run_dir))
        killed = time.monotonic()
        os.kill(pids[3], signal.SIGKILL)  # shard 1
        out, err = proc.communicate(timeout=120)
        ended_s = time.monotonic() - killed
    assert proc.returncode != 0 and ended_s < 60, (proc.returncode, ended_s)
    assert any(line in err for line in ("dbmpi: shard 1 (rank 3) sent no heartbeat",
                                        "dbmpi: shard 1 (rank 3) failed while sending its slice",
                                        "dbmpi: shard 1 (rank 3) died", "no progress for")), err[-3000:]
    assert len(verified_checkpoints(run_dir)) >= 2
    assert not (run_dir / "summary.json").exists()
    assert none_left(str(run_dir))


def job_segments(pids) -> set[str]:
    """The MPICH shared-memory files the job's rank processes map (this job's, exactly)."""
    from dbmpi.runtime import procfs

    return set().union(*(procfs.mpich_shm_files(pid) for pid in pids.values()))


def removed(paths, within_s: float = 30.0) -> bool:
    """The files are gone (the supervisors' sweepers remove them as the job ends)."""
    deadline = time.monotonic() + within_s
    while any(os.path.exists(p) for p in paths):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


@pytest.mark.parametrize("victim", [3, 2], ids=["shard-1", "shard-0"])
def test_a_killed_shard_is_noticed_at_once_not_after_the_timeout(tmp_path, victim):
    """A shard's process ending is seen by the ranks on its host within a watchdog period
    (0.25 s), not after train.replica_timeout_s (60 s here): one line, one MPI_Abort, the job
    ends non-zero long before the timeout, and its MPICH shared memory is removed."""
    run_dir = tmp_path / "run"
    with supervised_training(tmp_path, run_dir, 4, "train.steps=100000000", "train.replica_timeout_s=60",
                             *RHYTHM) as proc:
        pids = wait_until_training(run_dir, 4, proc)
        segments = job_segments(pids)
        killed = time.monotonic()
        os.kill(pids[victim], signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
        ended_s = time.monotonic() - killed
    shard = victim - 2
    assert proc.returncode != 0 and ended_s < 30, (proc.returncode, ended_s, err[-3000:])
    assert err.count(f"dbmpi: shard {shard} (rank {victim}) died (its process {pids[victim]} ended)") == 1, \
        err[-3000:]
    assert err.count("dbmpi: shard") == 1 and "Traceback" not in err and "no progress for" not in err, err[-3000:]
    assert not (run_dir / "summary.json").exists()
    assert none_left(str(run_dir))
    assert segments and removed(segments), segments


def test_a_failed_over_run_leaves_no_mpich_shared_memory(tmp_path):
    """A replica is killed, the other finishes: the job ends without MPI_Finalize on every
    rank, and the supervisors remove the job's /dev/shm/mpich_shm_* file (it is gone when
    mpiexec returns: the last supervisor waits for its sweeper)."""
    run_dir, steps = tmp_path / "run", 3000
    with supervised_training(tmp_path, run_dir, 3, "train.n_shards=1", f"train.steps={steps}", *RHYTHM) as proc:
        pids = wait_until_training(run_dir, 3, proc)
        segments = job_segments(pids)
        os.kill(pids[1], signal.SIGKILL)
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert json.loads((run_dir / "summary.json").read_text())["failed_replicas"] == [1]
    assert segments and all(p.startswith("/dev/shm/mpich_") for p in segments), segments
    assert removed(segments), segments
    assert none_left(str(run_dir))


def test_when_every_replica_fails_the_job_ends_and_says_so(tmp_path):
    """The only replica is killed: nothing can finish. The shard ends the job (non-zero)
    with a summary that names the failure; there is no final checkpoint to write."""
    run_dir = tmp_path / "run"
    with supervised_training(tmp_path, run_dir, 2, "train.n_replicas=1", "train.n_shards=1",
                             "train.steps=100000000", "train.checkpoint_every=300", *RHYTHM) as proc:
        pids = wait_until_training(run_dir, 2, proc)
        killed = time.monotonic()
        os.kill(pids[0], signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
        ended_s = time.monotonic() - killed
    assert proc.returncode != 0 and ended_s < 60
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failed_replicas"] == [0] and summary["steps_by_replica"] == [None]
    assert summary["final_checkpoint"] is None and summary["test_accuracy"] is None
    assert "every replica failed" in out
    verified_checkpoints(run_dir)
    assert none_left(str(run_dir))


def test_a_stalled_replica_declared_failed_leaves_when_it_wakes(tmp_path):
    """A replica stopped (SIGSTOP) longer than the timeout is declared failed although it is
    alive; continued, it learns so from its heartbeat and leaves (status 1) instead of
    counting itself finished. The others finish; nothing is killed."""
    run_dir, steps = tmp_path / "run", 20000
    with supervised_training(tmp_path, run_dir, 4, f"train.steps={steps}", *RHYTHM) as proc:
        pids = wait_until_training(run_dir, 4, proc)
        os.kill(pids[1], signal.SIGSTOP)
        time.sleep(TIMEOUT_S + 2)  # declared failed after TIMEOUT_S (its own watchdog waits 2 x)
        os.kill(pids[1], signal.SIGCONT)
        out, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert "rank 1 (replica 1, partition 0): the shards declared replica 1 failed" in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failed_replicas"] == [1] and summary["steps_by_replica"] == [50 + steps, None]
    verified_checkpoints(run_dir)
    assert none_left(str(run_dir))


def test_without_disable_auto_cleanup_a_killed_rank_still_ends_the_job(tmp_path):
    """The supervisor changes nothing by default: hydra ends the whole job at the first
    death (non-zero, quickly), no rank is left behind, the checkpoints stay intact."""
    from dbmpi.io.checkpoint import list_checkpoints

    run_dir = tmp_path / "run"
    with supervised_training(tmp_path, run_dir, 4, "train.steps=100000000", "train.checkpoint_every=200",
                             disable_auto_cleanup=False) as proc:
        wait_until_training(run_dir, 4, proc)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list_checkpoints(run_dir / "checkpoints")) < 1:
            time.sleep(0.1)
        killed = time.monotonic()
        os.kill(rank_pids(str(run_dir))[1], signal.SIGKILL)
        proc.communicate(timeout=60)
        ended_s = time.monotonic() - killed
    assert proc.returncode != 0 and ended_s < 30
    assert none_left(str(run_dir))
    assert len(verified_checkpoints(run_dir)) >= 1


def test_under_the_supervisor_sigterm_to_mpiexec_still_stops_the_run_cleanly(tmp_path):
    """hydra passes SIGTERM on to every rank (its supervisor passes it to the rank): a
    graceful stop, the final checkpoint, exit 0, as without the supervisor."""
    from dbmpi.io.checkpoint import list_checkpoints, open_checkpoint

    run_dir = tmp_path / "run"
    with supervised_training(tmp_path, run_dir, 4, "train.steps=100000000", *RHYTHM) as proc:
        wait_until_training(run_dir, 4, proc)
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["stopped_by_signal"] is True and summary["failed_replicas"] == []
    with open_checkpoint(list_checkpoints(run_dir / "checkpoints")[-1]) as ckpt:
        assert ckpt.state["phase"] == "signal"


# The supervisor alone (no MPI) ------------------------------------------------------------------
def supervise(*command, **kwargs):
    return subprocess.Popen([sys.executable, "-m", "dbmpi.runtime.supervise", *command], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kwargs)


CHILD = """
import os, signal, sys, time
signal.signal(signal.SIGTERM, lambda *a: (print("child got SIGTERM", flush=True), os._exit(7)))
signal.signal(signal.SIGUSR1, lambda *a: (print("child got SIGUSR1", flush=True), os._exit(8)))
print(os.getpid(), os.getpgid(0) == os.getpid(), os.environ.get("DBMPI_SUPERVISED"), flush=True)
time.sleep(60)
"""


def child_of(proc):
    pid, own_group, supervised = proc.stdout.readline().split()
    assert own_group == "True" and supervised == "1"
    return int(pid)


def test_supervise_reports_the_status_and_passes_on_term_but_not_usr1():
    assert supervise("sh", "-c", "exit 3").wait(timeout=30) == 3
    assert supervise("sh", "-c", "kill -9 $$").wait(timeout=30) == 128 + signal.SIGKILL
    assert supervise().wait(timeout=30) == 2  # usage
    proc = supervise(sys.executable, "-c", CHILD, start_new_session=True)  # as hydra starts a rank
    child_of(proc)
    os.kill(proc.pid, signal.SIGUSR1)  # hydra's notice that a peer died: not passed on
    time.sleep(0.5)
    assert proc.poll() is None
    os.killpg(proc.pid, signal.SIGUSR1)  # to the supervisor's process group: the child is not in it
    time.sleep(0.5)
    assert proc.poll() is None
    os.kill(proc.pid, signal.SIGTERM)  # a graceful stop: passed on
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 7 and "child got SIGTERM" in out and "SIGUSR1" not in out


def test_the_rank_dies_with_its_supervisor():
    proc = supervise(sys.executable, "-c", CHILD)
    child = child_of(proc)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            return
        if Path(f"/proc/{child}/stat").read_text().split(")")[-1].split()[0] == "Z":
            return  # dead, waiting to be reaped by init
        time.sleep(0.05)
    pytest.fail("the child outlived its supervisor")


def test_replica_timeout_is_validated():
    from dbmpi import config as configuration
    from dbmpi.config import ConfigError

    assert configuration.load(CONFIG)["train"]["replica_timeout_s"] == 30.0
    assert configuration.load(CONFIG, ["train.replica_timeout_s=2"])["train"]["replica_timeout_s"] == 2.0
    for bad in ("0.5", "-1", "true", '"soon"'):
        with pytest.raises(ConfigError, match="train.replica_timeout_s: must be a number of at least 1"):
            configuration.load(CONFIG, [f"train.replica_timeout_s={bad}"])


PARTNER_ERROR = """
import types
from mpi4py import MPI
from dbmpi.runtime.failover import Liveness
me = types.SimpleNamespace(layout=types.SimpleNamespace(n_partitions={P}), rank=0, role="replica 0 partition 0")
with Liveness.partition_errors(me):
    raise MPI.Exception(MPI.ERR_OTHER)
"""


@pytest.mark.parametrize("partitions,supervised", [(2, "1"), (2, ""), (1, "1")])
def test_an_mpi_error_from_a_dead_partition_makes_its_sibling_leave_not_abort(partitions, supervised):
    """The other documented path of a dead partition (see the test above), forced: under
    the supervisor with P > 1 an MPI error in a worker's training is a dead peer: one line,
    status 5 (as the watchdog's), no traceback. Otherwise the error propagates (the caller
    aborts the job, as for any error)."""
    env = {**os.environ, "DBMPI_SUPERVISED": supervised, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", PARTNER_ERROR.format(P=partitions)], env=env,
                          capture_output=True, text=True, timeout=60)
    if partitions > 1 and supervised:
        assert done.returncode == 5 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("dbmpi: rank 0 (replica 0 partition 0): MPI error ("), done.stderr
    else:
        assert done.returncode == 1 and "Traceback" in done.stderr and "mpi4py.MPI.Exception" in done.stderr


MAPPER = """
import mmap, os, sys, time
with open(sys.argv[1], "r+b") as f:
    segment = mmap.mmap(f.fileno(), 4096)
print(os.getpid(), flush=True)
time.sleep(120)
"""


def test_supervise_removes_the_mpich_files_its_rank_mapped_once_unused_and_no_others():
    """The supervisor's sweeper, without MPI: a rank that maps a /dev/shm/mpich_shm_* file
    and is killed. While another process still maps the file it is kept (a rank of the job
    still runs); the last one's supervisor removes it. A file the rank never mapped (another
    job's) stays."""
    tag = f"dbmpitest{os.getpid()}"
    shared, other = Path(f"/dev/shm/mpich_shm_{tag}_0"), Path(f"/dev/shm/mpich_shm_{tag}_1")
    for path in (shared, other):
        path.write_bytes(bytes(4096))
    try:
        first, last = (supervise(sys.executable, "-c", MAPPER, str(shared)) for _ in range(2))
        ranks = {proc: int(proc.stdout.readline()) for proc in (first, last)}  # once mapped
        time.sleep(3)  # the sweepers read their rank's maps every 0.2 s
        os.kill(ranks[first], signal.SIGKILL)
        assert first.wait(timeout=60) == 128 + signal.SIGKILL
        assert shared.exists()  # the other rank still maps it
        os.kill(ranks[last], signal.SIGKILL)
        assert last.wait(timeout=60) == 128 + signal.SIGKILL
        assert not shared.exists() and other.exists()
    finally:
        for path in (shared, other):
            path.unlink(missing_ok=True)



def test_procfs_tells_an_ended_process_from_a_live_one():
    """What the dead-shard check relies on: a live process is never `gone`; a killed one is,
    zombie (not yet reaped) or reaped; a reused pid (another start time) is another process."""
    from dbmpi.runtime import procfs

    proc = subprocess.Popen(["sleep", "60"])
    ident = procfs.identity(proc.pid)
    assert ident[1] is not None and not procfs.gone(ident)
    assert procfs.gone((proc.pid, ident[1] + 1))
    os.kill(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while not procfs.gone(ident) and time.monotonic() < deadline:  # a zombie until reaped
        time.sleep(0.05)
    assert procfs.gone(ident)
    proc.wait(timeout=30)
    assert procfs.gone(ident) and not procfs.gone(procfs.identity())


def test_supervise_turns_mpich_single_copy_transfers_off_unless_set():
    """With CMA a partner's death mid-transfer is fatal to the whole job in MPICH (see
    dbmpi.runtime.supervise): the rank runs without it, unless the user chose otherwise."""
    show = [sys.executable, "-c", "import os; print(os.environ['MPIR_CVAR_CH4_CMA_ENABLE'])"]
    assert supervise(*show).communicate(timeout=60)[0].strip() == "0"
    env = {**os.environ, "MPIR_CVAR_CH4_CMA_ENABLE": "1"}
    assert supervise(*show, env=env).communicate(timeout=60)[0].strip() == "1"
