"""Sandblaster survives a failed replica (the paper: both algorithms tolerate "the wholesale
failure of model replicas"): `mpiexec -disable-auto-cleanup` with every rank under
`python -m dbmpi.runtime.supervise`, a replica SIGKILLed mid-run, every MPI launch under a timeout.

The batch is the whole training set (full batch), so the iterates are those of the serial
L-BFGS whichever replica computed which portion: a run that lost a replica must follow them
as closely as a run that did not (tests.test_sandblaster checks the same for runs without
failures). Every portion sleeps DBMPI_PORTION_DELAY, so the victim is almost always inside
a portion, or parked, when it dies, whatever the machine's load; where exactly does not
matter: its portions are reissued, or, if it died between pushing and reporting a flush, the
batch is computed again (dbmpi.algorithms.portions).
"""
import json
import os
import signal
import sys
import time

import numpy as np
import pytest

from tests.test_downpour import background_training, metrics_text, rank_pids, records
from tests.test_failover import none_left
from tests.test_sandblaster import CONFIG, serial_reference

TIMEOUT_S = 4  # train.replica_timeout_s in these runs
N_ITER = 14


def wait_for_iterations(run_dir, proc, n, ranks, timeout=120):
    """The rank pids once the coordinator has logged `n` iterations (all ranks running)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics_text(run_dir).count('"kind": "iteration"') >= n + 1 \
                and len(rank_pids(str(run_dir))) == ranks:
            return rank_pids(str(run_dir))
        time.sleep(0.05)
    _, err = proc.communicate(timeout=60) if proc.poll() is not None else ("", "")
    pytest.fail(f"training did not get to iteration {n}: {err[-2000:]}")


def failover_run(tmp_path, *sets, env=None, kill=None):
    """A supervised 5-rank run (3 replicas, 1 shard, full batch, N_ITER iterations) with
    `sets`; `kill`: SIGKILL that rank once iteration 2 is logged. Returns (proc, stderr,
    summary, records, seconds from the kill to the end)."""
    run_dir, ranks = tmp_path / "run", 5
    with background_training(tmp_path, run_dir, "train.n_replicas=3", "train.n_shards=1",
                             f"train.iterations={N_ITER}", "train.tolerance=0",
                             f"train.replica_timeout_s={TIMEOUT_S}", *sets, config=CONFIG, ranks=ranks,
                             env={"DBMPI_PORTION_DELAY": "0.05", **(env or {})}, budget=(),
                             mpiexec_args=["-disable-auto-cleanup"],
                             wrapper=[sys.executable, "-m", "dbmpi.runtime.supervise"]) as proc:
        killed = time.monotonic()
        if kill is not None:
            pids = wait_for_iterations(run_dir, proc, 2, ranks)
            killed = time.monotonic()
            os.kill(pids[kill], signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
        ended_s = time.monotonic() - killed
    summary = json.loads((run_dir / "summary.json").read_text()) if (run_dir / "summary.json").exists() else None
    assert summary is not None, err[-3000:]
    assert none_left(str(run_dir))
    return proc, err, summary, records(run_dir), ended_s


def check_survived(tmp_path, proc, err, summary, recs, victim):
    """The run completed without `victim`, said so once, and followed the serial L-BFGS's
    iterates with every example of every evaluation counted once; the job's status is the
    victim's (128 + SIGKILL, as its supervisor reports it)."""
    assert proc.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert summary["failed_replicas"] == [victim], err[-3000:]
    assert summary["iterations"] == N_ITER and summary["status"] == "budget"
    assert summary["test_accuracy"] > 0.9  # measured by a survivor
    failures = [r for r in recs if r["kind"] == "replica_failed"]
    assert len(failures) == 1 and failures[0]["replica"] == victim and failures[0]["ranks"] == [victim]
    assert failures[0]["silent_s"] >= TIMEOUT_S
    assert err.count(f"dbmpi: replica {victim} failed") == 1, err[-3000:]
    assert "Traceback" not in err
    # The survivors' records (the victim sent none).
    assert sorted(r["replica"] for r in recs if r["kind"] == "replica") == sorted({0, 1, 2} - {victim})
    assert summary["portions_computed_by_replica"][victim] is None
    iterations = [r for r in recs if r["kind"] == "iteration"]
    assert all(n == summary["batch_size"] for r in iterations for n in r["examples_per_evaluation"])
    reference, _, _ = serial_reference(tmp_path, [], N_ITER)
    np.testing.assert_allclose([r["loss"] for r in iterations], reference, rtol=2e-5)


@pytest.mark.parametrize("victim,backups", [(1, False), (0, True)], ids=["replica-1", "replica-0-with-backups"])
def test_a_killed_replica_has_its_portions_reissued_and_the_iterates_stay_exact(tmp_path, victim, backups):
    """Three replicas, one shard, full batch; one replica is SIGKILLed after iteration 2
    (replica 0 is the one that measured the test accuracy). The coordinator declares it
    failed after train.replica_timeout_s without the message it owed, the others compute
    its portions, and the run completes with the serial L-BFGS's iterates."""
    proc, err, summary, recs, ended_s = failover_run(
        tmp_path, f"train.backup_tasks={str(backups).lower()}", kill=victim)  # replica r is rank r
    check_survived(tmp_path, proc, err, summary, recs, victim)
    assert ended_s < 120
    if not backups:  # its portion had no other copy: reissued (or the batch computed again)
        assert summary["portions_reissued"] + summary["batches_recomputed"] >= 1, summary


def test_a_replica_dying_between_its_push_and_its_report_has_the_batch_computed_again(tmp_path):
    """Replica 2 dies right after its 10th push (about evaluation 4) landed in the shard's inbox, before it
    reported it: the coordinator cannot tell what of it landed, so once it declares the
    replica failed it empties the inbox and has the batch computed again. Counting that push
    and recomputing its portions would double them: the iterates show it."""
    proc, err, summary, recs, _ = failover_run(tmp_path, env={"DBMPI_DIE_AFTER_PUSH": "2:10"})
    check_survived(tmp_path, proc, err, summary, recs, victim=2)
    assert summary["batches_recomputed"] == 1, summary
    assert [r["batch_recomputed"] for r in recs if r["kind"] == "replica_failed"] == [True]


def test_a_killed_partition_takes_its_replica_out_and_the_job_ends_with_status_7(tmp_path):
    """Two replicas of two partitions: partition 1 of replica 1 is killed. Its partner waits
    in a collective and falls silent too, so replica 1 is declared failed and replica 0
    finishes with the exact iterates; the partner cannot be reached, so once the run is
    written the coordinator ends the job with MPI_Abort(7)."""
    run_dir = tmp_path / "run"
    with background_training(tmp_path, run_dir, "train.n_replicas=2", "train.n_partitions=2", "train.n_shards=1",
                             f"train.iterations={N_ITER}", "train.tolerance=0",
                             f"train.replica_timeout_s={TIMEOUT_S}", config=CONFIG, ranks=6,
                             env={"DBMPI_PORTION_DELAY": "0.05"}, budget=(), mpiexec_args=["-disable-auto-cleanup"],
                             wrapper=[sys.executable, "-m", "dbmpi.runtime.supervise"]) as proc:
        pids = wait_for_iterations(run_dir, proc, 2, 6)
        os.kill(pids[3], signal.SIGKILL)  # replica 1, partition 1
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 7, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failed_replicas"] == [1] and summary["iterations"] == N_ITER
    assert err.count("dbmpi: replica 1 failed") == 1 and "MPI_Abort 7" in err, err[-3000:]
    recs = records(run_dir)
    reference, _, _ = serial_reference(tmp_path, [], N_ITER)
    np.testing.assert_allclose([r["loss"] for r in recs if r["kind"] == "iteration"], reference, rtol=2e-5)
    assert none_left(str(run_dir))


@pytest.mark.parametrize("victim,who", [(3, "shard 0"), (4, "the coordinator")], ids=["shard", "coordinator"])
def test_a_killed_shard_or_coordinator_ends_the_job_with_status_4(tmp_path, victim, who):
    """They hold the vectors and the optimizer's state: not survivable. Under the failover
    launcher nothing else would end the job (a collective over a dead rank never returns):
    the ranks on its host see its process end, one says so, and the job ends with status 4
    within seconds; the checkpoints written so far all verify."""
    from dbmpi.io.checkpoint import list_checkpoints, open_checkpoint

    run_dir = tmp_path / "run"
    with background_training(tmp_path, run_dir, "train.n_replicas=3", "train.n_shards=1", "train.iterations=1000",
                             "train.tolerance=0", "train.checkpoint_every=1", f"train.replica_timeout_s={TIMEOUT_S}",
                             config=CONFIG, ranks=5, env={"DBMPI_PORTION_DELAY": "0.05"}, budget=(),
                             mpiexec_args=["-disable-auto-cleanup"],
                             wrapper=[sys.executable, "-m", "dbmpi.runtime.supervise"]) as proc:
        pids = wait_for_iterations(run_dir, proc, 2, 5)
        killed = time.monotonic()
        os.kill(pids[victim], signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        ended_s = time.monotonic() - killed
    assert proc.returncode == 4, err[-3000:]
    assert ended_s < 30
    assert err.count(f"dbmpi: {who} (rank {victim}) died") == 1, err[-3000:]
    kept = list_checkpoints(run_dir / "checkpoints")
    assert kept
    for path in kept:
        open_checkpoint(path).close()  # verifies every checksum
    assert none_left(str(run_dir))


def test_a_stalled_replica_is_declared_failed_then_dismissed(tmp_path):
    """SIGSTOP, not SIGKILL: replica 1 is declared failed after the timeout and its work goes
    to the others; when it runs again, its next request is answered with its dismissal: it
    leaves with one line and status 1 (the job's status), and the iterates stay exact.
    Without backups every evaluation needs replica 1 or its declaration, so three more
    iterations after the SIGSTOP mean it was declared failed."""
    run_dir, n_iter = tmp_path / "run", 30
    with background_training(tmp_path, run_dir, "train.n_replicas=3", "train.n_shards=1",
                             f"train.iterations={n_iter}", "train.tolerance=0", "train.backup_tasks=false",
                             f"train.replica_timeout_s={TIMEOUT_S}", config=CONFIG, ranks=5,
                             env={"DBMPI_PORTION_DELAY": "0.05"}, budget=(), mpiexec_args=["-disable-auto-cleanup"],
                             wrapper=[sys.executable, "-m", "dbmpi.runtime.supervise"]) as proc:
        pids = wait_for_iterations(run_dir, proc, 2, 5)
        os.kill(pids[1], signal.SIGSTOP)
        try:
            seen = metrics_text(run_dir).count('"kind": "iteration"')
            wait_for_iterations(run_dir, proc, seen + 2, 5)  # (seen - 1) + 3
        finally:
            os.kill(pids[1], signal.SIGCONT)
        _, err = proc.communicate(timeout=300)
    assert proc.returncode == 1, err[-3000:]
    assert err.count("dbmpi: replica 1 failed") == 1, err[-3000:]
    assert err.count("the coordinator declared replica 1 failed; this rank leaves") == 1, err[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failed_replicas"] == [1] and summary["iterations"] == n_iter
    reference, _, _ = serial_reference(tmp_path, [], n_iter)
    np.testing.assert_allclose([r["loss"] for r in records(run_dir) if r["kind"] == "iteration"], reference,
                               rtol=2e-5)
    assert none_left(str(run_dir))
