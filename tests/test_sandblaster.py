"""Sandblaster L-BFGS end to end: `mpiexec -n N dbmpi train` in a subprocess, under a timeout.

The reference is the serial L-BFGS of dbmpi.algorithms.lbfgs on a NumPy vector space whose objective
is the whole training set's mean loss (plus the L2 term) computed by one Network in one
call: the distributed run sums the same gradient from portions computed by several
replicas and pushed to several shards, so following the same iterates checks the portion
bookkeeping, the shard-side vector commands and the commit protocol together.
"""
import json
import os

import numpy as np
import pytest
import scipy.optimize

from dbmpi import config as configuration
from dbmpi.algorithms.lbfgs import LBFGS, NumpyVectorSpace
from dbmpi.data import open_dataset
from dbmpi.model import Network
from tests.test_downpour import ROOT, background_training, damaged_digits, error_lines, launch, metrics_text, records

CONFIG = ROOT / "configs/sandblaster_digits.toml"
# A Sandblaster run in the background (tests.test_downpour.background_training): an iteration
# budget it will not reach, portions slowed a little so signals land mid-run.
SANDBLASTER_BACKGROUND = dict(config=CONFIG, ranks=5, env={"DBMPI_PORTION_DELAY": "0.01"},
                              budget=("train.iterations=100000", "train.tolerance=0"))

def run_sandblaster(tmp_path, name, ranks, *sets, env=None, timeout=240):
    run_dir = tmp_path / name
    args = ["train", CONFIG, "--run-dir", run_dir, "--set", f"data.path={tmp_path / 'digits.h5'}"]
    for item in sets:
        args += ["--set", item]
    if env:
        os.environ.update(env)
    try:
        result, elapsed = launch(ranks, *args, cwd=tmp_path, timeout=timeout)
    finally:
        for key in env or ():
            os.environ.pop(key, None)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    iterations = [r for r in records(run_dir) if r["kind"] == "iteration"]
    return summary, iterations, run_dir


def serial_reference(tmp_path, overrides, iterations, config=CONFIG):
    """Losses per iteration of the serial L-BFGS on the full-batch objective."""
    cfg = configuration.load(config, [f"data.path={tmp_path / 'digits.h5'}", *overrides])
    network = Network(cfg["model"])
    with open_dataset(tmp_path / "digits.h5") as data:
        x, y = data.load("train")
    decay = cfg["train"]["weight_decay"]

    def fun(point):
        network.params[:] = point
        loss = network.loss_and_grad(x, y) + 0.5 * decay * float(np.dot(point.astype(np.float64), point))
        return loss, network.grad + np.float32(decay) * point

    tcfg = cfg["train"]
    lbfgs = LBFGS(NumpyVectorSpace(network.params.copy(), fun), m=tcfg["history"], c1=tcfg["wolfe_c1"],
                  c2=tcfg["wolfe_c2"], max_evals=tcfg["max_line_search"])
    losses = [lbfgs.start()]
    for _ in range(iterations):
        losses.append(lbfgs.step()["loss"])
    return np.array(losses), fun, network


@pytest.mark.parametrize("replicas,shards", [(1, 1), (2, 1), (3, 1), (1, 2), (2, 2), (3, 2)])
def test_iterates_match_serial_lbfgs_logistic_regression(tmp_path, replicas, shards):
    n_iter = 15
    summary, iterations, _ = run_sandblaster(
        tmp_path, "run", replicas + shards + 1, f"train.n_replicas={replicas}", f"train.n_shards={shards}",
        f"train.iterations={n_iter}")
    losses = np.array([r["loss"] for r in iterations])
    reference, _, _ = serial_reference(tmp_path, [], n_iter)
    assert len(losses) == n_iter + 1
    np.testing.assert_allclose(losses, reference, rtol=2e-5)
    # Every evaluation counted each example of the batch exactly once.
    n_train = summary["batch_size"]
    assert all(n == n_train for r in iterations for n in r["examples_per_evaluation"])
    assert sum(summary["portions_computed_by_replica"]) >= summary["evaluations"] * -(-n_train // 64)
    assert summary["test_accuracy"] > 0.9


def test_iterates_match_serial_lbfgs_mlp_and_model_parallel_replicas(tmp_path):
    """A small MLP, with whole replicas (P=1) and with replicas split in two (P=2)."""
    n_iter = 12
    config = tmp_path / "mlp.toml"
    text = CONFIG.read_text()
    assert '[[model.layers]]\ntype = "softmax"' in text
    config.write_text(text.replace(
        '[[model.layers]]\ntype = "softmax"',
        '[[model.layers]]\ntype = "dense"\nunits = 16\nactivation = "tanh"\n\n[[model.layers]]\ntype = "softmax"'))
    results = {}
    for P, ranks in ((1, 4), (2, 6)):
        run_dir = tmp_path / f"p{P}"
        result, _ = launch(ranks, "train", config, "--run-dir", run_dir, "--set", f"data.path={tmp_path / 'digits.h5'}",
                           "--set", "train.n_replicas=2", "--set", "train.n_shards=1",
                           "--set", f"train.n_partitions={P}", "--set", f"train.iterations={n_iter}",
                           cwd=tmp_path, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        results[P] = np.array([r["loss"] for r in records(run_dir) if r["kind"] == "iteration"])
    reference, _, _ = serial_reference(tmp_path, [], n_iter, config=config)
    np.testing.assert_allclose(results[1], reference, rtol=1e-4)
    np.testing.assert_allclose(results[2], reference, rtol=1e-4)
    assert results[1][-1] < 0.5 * results[1][0]


def test_final_loss_matches_scipy_lbfgsb(tmp_path):
    """Run to convergence; compare with SciPy's L-BFGS-B on the float64 objective."""
    summary, iterations, _ = run_sandblaster(tmp_path, "run", 5, "train.iterations=300", "train.tolerance=1e-6")
    _, fun, network = serial_reference(tmp_path, [], 0)

    def fun64(point):
        loss, grad = fun(point.astype(np.float32))
        return loss, grad.astype(np.float64)

    best = scipy.optimize.minimize(fun64, network.params.astype(np.float64), jac=True, method="L-BFGS-B",
                                   options={"maxiter": 2000, "ftol": 1e-15, "gtol": 1e-10})
    final = iterations[-1]["loss"]
    # final_loss is the objective, L2 term included (summary.json says with which weight);
    # test_loss is the plain test cross-entropy, no L2 term.
    assert summary["final_loss"] == final and summary["weight_decay"] == 1e-3
    assert summary["status"] in ("converged", "budget", "stalled")
    assert abs(final - best.fun) <= 1e-4 * abs(best.fun), (final, best.fun)


def test_a_slow_replica_is_covered_by_backups(tmp_path):
    """One replica 10x slower (injected): it gets few portions, backup copies of its portions
    win, and the iterates are those of the run with no straggler, with or without backups.
    How much time backups save is measured in bench/sandblaster.py, not here."""
    common = ["train.n_replicas=4", "train.n_shards=1", "train.iterations=4", "train.portion_size=32"]
    delay = {"DBMPI_PORTION_DELAY": "0.02"}
    base, base_it, _ = run_sandblaster(tmp_path, "none", 6, *common, env=delay)
    slow, slow_it, _ = run_sandblaster(tmp_path, "backup", 6, *common, env={**delay, "DBMPI_SLOW": "3:10"})
    plain, plain_it, _ = run_sandblaster(tmp_path, "plain", 6, *common, "train.backup_tasks=false",
                                         env={**delay, "DBMPI_SLOW": "3:10"})
    assert slow["backups_won"] >= 1 and plain["backups_issued"] == 0 and plain["backups_won"] == 0
    for run in (slow_it, plain_it):
        np.testing.assert_allclose([r["loss"] for r in run], [r["loss"] for r in base_it], rtol=1e-5)
        assert all(n == base["batch_size"] for r in run for n in r["examples_per_evaluation"])
        # Dynamic hand-out: the straggler is given fewer portions than any fast replica.
        shares = np.sum([r["portions_by_replica"] for r in run], axis=0)
        assert shares[3] < min(shares[:3]), shares


def test_bad_sandblaster_settings_end_every_rank_with_one_message(tmp_path):
    result, elapsed = launch(5, "train", CONFIG, "--run-dir", tmp_path / "run", "--set", "train.wolfe_c2=0.00001",
                             cwd=tmp_path, timeout=120)
    assert result.returncode != 0 and elapsed < 60
    lines = [line for line in result.stderr.splitlines() if line.startswith("dbmpi: error:")]
    assert len(lines) == 5 and len(set(lines)) == 1, result.stderr[-2000:]
    assert "wolfe_c1 < wolfe_c2" in lines[0]
    result, _ = launch(4, "train", CONFIG, "--run-dir", tmp_path / "run", cwd=tmp_path, timeout=120)
    assert result.returncode != 0
    assert "+ 1 coordinator = 5" in result.stderr


# Checkpoints, resume and stop signals --------------------------------------------------------
def test_checkpoints_hold_the_lbfgs_state_and_resume_continues_the_iterates(tmp_path):
    """A resumed run follows the uninterrupted one, up to float32 summation order (which
    replica computed which portion differs between runs), with the same or other numbers
    of shards and replicas."""
    from dbmpi.io.checkpoint import list_checkpoints, open_checkpoint

    n_iter = 8
    _, straight, run_dir = run_sandblaster(tmp_path, "straight", 5, f"train.iterations={n_iter}",
                                           "train.checkpoint_every=3")
    names = [p.name for p in list_checkpoints(run_dir / "checkpoints")]
    assert names == ["ckpt-000000003.h5", "ckpt-000000006.h5", "ckpt-000000008.h5"]
    ckpt_path = run_dir / "checkpoints" / names[0]
    with open_checkpoint(ckpt_path) as ckpt:  # checksums verified on open
        assert ckpt.algorithm == "sandblaster" and ckpt.step == 3
        lbfgs = ckpt.state["lbfgs"]
        assert lbfgs["iteration"] == 3 and len(lbfgs["slots"]) == 3
        assert sorted(ckpt.vectors()) == sorted(["params", "lbfgs/g", *(f"lbfgs/s{i}" for i in lbfgs["slots"]),
                                                 *(f"lbfgs/y{i}" for i in lbfgs["slots"])])
        assert ckpt.state["phase"] == "periodic"
        assert abs(lbfgs["f"] - straight[3]["loss"]) <= 1e-12 * abs(lbfgs["f"])
        # The stored g is the gradient at the stored x (the full-batch objective).
        _, fun, _ = serial_reference(tmp_path, [], 0)
        x = ckpt.read_range("params", 0, ckpt.n_params)
        g = ckpt.read_range("lbfgs/g", 0, ckpt.n_params)
    np.testing.assert_allclose(g, fun(x)[1], rtol=1e-4, atol=1e-6)
    reference = [r["loss"] for r in straight]

    for name, sets, rtol in (("same", [], 1e-6), ("other", ["train.n_shards=1", "train.n_replicas=3"], 1e-5)):
        result, _ = launch(5, "train", CONFIG, "--run-dir", tmp_path / name, "--resume", ckpt_path,
                           "--set", f"data.path={tmp_path / 'digits.h5'}", "--set", f"train.iterations={n_iter}",
                           *[arg for item in sets for arg in ("--set", item)], cwd=tmp_path, timeout=240)
        assert result.returncode == 0, result.stderr[-3000:]
        recs = records(tmp_path / name)
        assert [r for r in recs if r["kind"] == "resume"][0]["step"] == 3
        its = [r for r in recs if r["kind"] == "iteration"]
        assert [r["iteration"] for r in its] == list(range(3, n_iter + 1))
        np.testing.assert_allclose([r["loss"] for r in its], reference[3:], rtol=rtol)
        assert its[0]["time_s"] >= straight[3]["time_s"]  # time continues too
        summary = json.loads((tmp_path / name / "summary.json").read_text())
        assert summary["iterations"] == n_iter and summary["resumed_from"]["step"] == 3


def test_a_stop_signal_on_any_sandblaster_rank_checkpoints_and_resume_auto_finishes(tmp_path):
    """SIGTERM on a shard, SIGUSR1 on a replica (how Slurm announces a time limit): the
    coordinator checkpoints after the current iteration, every rank exits 0, and
    `--resume auto` continues from that checkpoint to the iteration budget."""
    import signal as signals
    import time

    from dbmpi.io.checkpoint import list_checkpoints, open_checkpoint
    from tests.test_downpour import rank_pids

    data = f"data.path={tmp_path / 'digits.h5'}"
    for signame, rank in (("SIGTERM", 3), ("SIGUSR1", 1)):
        run_dir = tmp_path / signame
        with background_training(tmp_path, run_dir, **SANDBLASTER_BACKGROUND) as proc:
            deadline = time.monotonic() + 240  # generous: a loaded machine starts 5 ranks slowly
            while time.monotonic() < deadline and proc.poll() is None:
                if '"iteration": 2' in metrics_text(run_dir) and len(rank_pids(str(run_dir))) == 5:
                    break
                time.sleep(0.2)
            pids = rank_pids(str(run_dir))
            assert len(pids) == 5 and '"iteration": 2' in metrics_text(run_dir), (pids, proc.poll())
            os.kill(pids[rank], getattr(signals, signame))
            _, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err[-3000:]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["stopped_by_signal"] is True and summary["status"] == "signal"
        last = list_checkpoints(run_dir / "checkpoints")[-1]
        with open_checkpoint(last) as ckpt:
            assert ckpt.state["phase"] == "signal" and ckpt.step == summary["iterations"] >= 2
            stopped_at = ckpt.step
    result, _ = launch(5, "train", CONFIG, "--run-dir", run_dir, "--set", data,
                       "--set", f"train.iterations={stopped_at + 3}", "--resume", "auto", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"at iteration {stopped_at}" in result.stdout
    its = [r["iteration"] for r in records(run_dir) if r["kind"] == "iteration"]
    assert its[-4:] == [stopped_at, stopped_at + 1, stopped_at + 2, stopped_at + 3]


def test_a_downpour_checkpoint_warm_starts_sandblaster(tmp_path):
    """L-BFGS from the parameters Downpour reached: the first loss is that of the
    checkpointed parameters, far below a fresh start's."""
    from dbmpi.io.checkpoint import list_checkpoints, open_checkpoint

    downpour = ROOT / "configs/downpour_digits.toml"
    result, _ = launch(4, "train", downpour, "--run-dir", tmp_path / "dp",
                       "--set", f"data.path={tmp_path / 'digits.h5'}", "--set", "train.steps=200", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    ckpt_path = list_checkpoints(tmp_path / "dp" / "checkpoints")[-1]
    config = downpour  # the Downpour model, trained by Sandblaster
    as_lbfgs = ['train.algorithm="sandblaster"', "train.batch_size=100000", "train.iterations=2"]
    _, fun, _ = serial_reference(tmp_path, as_lbfgs, 0, config=config)
    with open_checkpoint(ckpt_path) as ckpt:
        start_loss = fun(ckpt.read_range("params", 0, ckpt.n_params))[0]
    result, _ = launch(5, "train", config, "--run-dir", tmp_path / "sb", "--resume", ckpt_path,
                       "--set", f"data.path={tmp_path / 'digits.h5'}", *[a for s in as_lbfgs for a in ("--set", s)],
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "warm start" in result.stdout
    its = [r for r in records(tmp_path / "sb") if r["kind"] == "iteration"]
    assert its[0]["iteration"] == 0 and abs(its[0]["loss"] - start_loss) < 1e-4 * start_loss
    assert its[-1]["loss"] < its[0]["loss"]


def test_a_killed_sandblaster_rank_ends_the_job_and_keeps_the_checkpoints(tmp_path):
    """SIGKILL on a shard mid-run: the launcher ends the job non-zero within a bounded time;
    the checkpoints written so far all verify."""
    import signal as signals
    import time

    from dbmpi.io.checkpoint import list_checkpoints, open_checkpoint
    from tests.test_downpour import rank_pids

    run_dir = tmp_path / "run"
    with background_training(tmp_path, run_dir, "train.checkpoint_every=1", **SANDBLASTER_BACKGROUND) as proc:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(list_checkpoints(run_dir / "checkpoints")) < 2:
            time.sleep(0.1)
        pids = rank_pids(str(run_dir))
        assert len(pids) == 5, pids
        killed = time.monotonic()
        os.kill(pids[3], signals.SIGKILL)
        proc.communicate(timeout=90)
        assert time.monotonic() - killed < 60
    assert proc.returncode != 0
    kept = list_checkpoints(run_dir / "checkpoints")
    assert len(kept) >= 2
    for path in kept:
        open_checkpoint(path).close()  # verifies every checksum


@pytest.mark.parametrize("sets,env", [
    # replica 0 is slow, so it is often still busy with a backup copy when a batch completes
    (["train.n_replicas=4", "train.n_shards=1"], {"DBMPI_SLOW": "0:4"}),
    (["train.n_replicas=2", "train.n_shards=1", "train.n_partitions=2"], {}),
])
def test_test_accuracy_during_training_leaves_the_iterates_alone(tmp_path, sets, env):
    """train.eval_every = k: the test accuracy of x after every k iterations, measured by
    the live replicas between evaluations, each a piece of the test set (a replica's
    partitions together when it is split); the iterates are those of a run without it, the
    last measurement is the final one's, and that is `dbmpi evaluate`'s on the final
    checkpoint."""
    from dbmpi.evaluation import evaluate_checkpoint

    ranks = 6
    n_iter = 6
    _, plain, _ = run_sandblaster(tmp_path, "plain", ranks, *sets, f"train.iterations={n_iter}", env=env)
    summary, its, run_dir = run_sandblaster(tmp_path, "eval", ranks, *sets, f"train.iterations={n_iter}",
                                            "train.eval_every=1", env=env)
    np.testing.assert_allclose([r["loss"] for r in its], [r["loss"] for r in plain], rtol=1e-5)
    evals = [r for r in records(run_dir) if r["kind"] == "eval" and r["source"] == "replicas"]
    assert [r["iteration"] for r in evals] == list(range(1, n_iter + 1))
    assert abs(evals[-1]["test_accuracy"] - summary["test_accuracy"]) < 1e-9
    scored = evaluate_checkpoint(run_dir / "checkpoints" / summary["checkpoints_written"][-1], tmp_path / "digits.h5")
    assert summary["test_accuracy"] == scored["accuracy"]
    assert summary["test_loss"] == pytest.approx(scored["loss"], rel=1e-6)
    assert sorted(p.name for p in (run_dir / "metrics").iterdir()) == [f"rank-{r:05d}.jsonl" for r in range(ranks)]
    finals = [r for r in records(run_dir) if r["kind"] in ("replica", "shard", "coordinator")]
    assert sorted(r["rank"] for r in finals) == list(range(ranks)) and all(r["peak_rss_bytes"] for r in finals)
    accuracies = [r["test_accuracy"] for r in evals]
    assert accuracies[-1] > accuracies[0] and accuracies[-1] > 0.85
    assert all(r["time_s"] > 0 for r in evals)


def test_init_takes_only_the_parameters_of_a_checkpoint(tmp_path):
    """--init CKPT starts a new run at iteration 0 from the checkpoint's x, without its
    L-BFGS history: the first loss is f(x), the run directory is new."""
    from dbmpi.io.checkpoint import list_checkpoints, open_checkpoint

    _, first, run_dir = run_sandblaster(tmp_path, "first", 5, "train.iterations=4")
    ckpt = list_checkpoints(run_dir / "checkpoints")[-1]
    _, fun, _ = serial_reference(tmp_path, [], 0)
    with open_checkpoint(ckpt) as c:
        assert c.step == 4
        expected = fun(c.read_range("params", 0, c.n_params))[0]
    result, _ = launch(5, "train", CONFIG, "--run-dir", tmp_path / "second", "--init", ckpt,
                       "--set", f"data.path={tmp_path / 'digits.h5'}", "--set", "train.iterations=2", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    recs = records(tmp_path / "second")
    kinds = [r["kind"] for r in recs]  # the coordinator's file: init, then the iterations
    assert kinds.index("init") < kinds.index("iteration") and "resume" not in kinds
    its = [r for r in recs if r["kind"] == "iteration"]
    assert [r["iteration"] for r in its] == [0, 1, 2]
    assert abs(its[0]["loss"] - expected) < 1e-5 * expected
    # No history: the first step is along steepest descent again.
    assert its[1]["loss"] < its[0]["loss"]
    summary = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert summary["initial_parameters"] == str(ckpt) and "resumed_from" not in summary


# Failed trainings ------------------------------------------------------------------------------
def test_nan_in_the_data_is_one_line_on_every_sandblaster_rank(tmp_path):
    """NaN data used to end in `error on rank 4: ValueError: the objective is not finite`
    on one rank: now the data set is refused up front, naming the file, on every rank."""
    data = damaged_digits(tmp_path, "nan.h5", slice(700, 701), float("inf"))
    result, elapsed = launch(5, "train", CONFIG, "--run-dir", tmp_path / "run", "--set", f"data.path={data}",
                             cwd=tmp_path, timeout=120)
    assert result.returncode == 2 and elapsed < 60, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 5 and len(set(lines)) == 1, result.stderr[-3000:]
    assert f"{data}: /train/x holds NaN or Inf in 1 row(s), the first at row 700" in lines[0]
    assert not (tmp_path / "run").exists()


def test_a_non_finite_objective_later_exits_3_and_keeps_the_last_good_checkpoint(tmp_path):
    """Finite rows so large (3e38) that the loss overflows, in the third batch: iteration
    1 checkpoints, iteration 2's batch gives a non-finite objective. Every rank prints the
    same `training diverged` line and exits 3; no final checkpoint is written, so
    --resume auto would take iteration 1's; summary.json says why."""
    from dbmpi.io.checkpoint import list_checkpoints, newest_valid

    data = damaged_digits(tmp_path, "huge.h5", slice(1000, 1010), 3e38)
    run_dir = tmp_path / "run"
    result, _ = launch(5, "train", CONFIG, "--run-dir", run_dir, "--set", f"data.path={data}",
                       "--set", "train.batch_size=500", "--set", "train.checkpoint_every=1", cwd=tmp_path,
                       timeout=120)
    assert result.returncode == 3, result.stderr[-3000:]
    lines = error_lines(result.stderr)
    assert len(lines) == 5 and len(set(lines)) == 1, result.stderr[-3000:]
    assert "training diverged: iteration 2, batch 2: the objective is not finite" in lines[0]
    assert "Traceback" not in result.stderr and "final test accuracy" not in result.stdout
    assert [p.name for p in list_checkpoints(run_dir / "checkpoints")] == ["ckpt-000000001.h5"]
    assert newest_valid(run_dir / "checkpoints").name == "ckpt-000000001.h5"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "diverged" and lines[0].endswith(summary["failure"])
    assert summary["iterations"] == 1
