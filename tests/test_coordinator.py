"""Sandblaster's coordinator without MPI: dbmpi.algorithms.coordinator.Coordinator driven over an
in-process space, as tests/test_portions.py drives the PortionScheduler.

`FakeSpace` is dbmpi.algorithms.lbfgs.NumpyVectorSpace with what dbmpi.algorithms.sandblaster.ShardSpace
adds: batches of a least-squares problem, one statistics entry per evaluation (as the
portions of two replicas), checkpoints kept in memory, a scripted stop signal and test
loss, and the end-of-run exchange recorded. The checks are the coordinator's own logic:
the iterates are the serial L-BFGS's, the records and summary add up, checkpoints come when
due with what a resume needs, and a resume, a stop signal and a divergence end as specified.
"""
import json
import math
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

from dbmpi import config as configuration
from dbmpi.algorithms.coordinator import Coordinator
from dbmpi.algorithms.lbfgs import LBFGS, NumpyVectorSpace
from dbmpi.io.checkpoint import checkpoint_name
from dbmpi.io.rundir import RunDirectory, read_metrics
from dbmpi.runtime.layout import layout_for
from tests.test_sandblaster import CONFIG

N_EXAMPLES, N_PARAMS = 60, 5
RNG = np.random.default_rng(0)
A = RNG.standard_normal((N_EXAMPLES, N_PARAMS)).astype(np.float32)
B = (A @ RNG.standard_normal(N_PARAMS) + 0.1 * RNG.standard_normal(N_EXAMPLES)).astype(np.float32)


def least_squares(rows: slice):
    def fun(x):
        residual = A[rows] @ x - B[rows]
        return 0.5 * float(np.mean(residual.astype(np.float64) ** 2)), A[rows].T @ residual / len(B[rows])
    return fun


class FakeSpace(NumpyVectorSpace):
    def __init__(self, batches, x0=None, *, signal_at=None, test_loss=0.25, poison_batch=None):
        super().__init__(np.zeros(N_PARAMS, np.float32) if x0 is None else x0, self._objective)
        self.batches, self.batch, self.evaluation = batches, 0, 0
        self.stats_log: list[dict] = []
        self.replica_signalled = False
        self.recomputed = 0
        self.failed_replicas: list[int] = []
        self.checkpoints: list[dict] = []
        self.calls: list[str] = []  # the end-of-run protocol, in order
        self.signal_at, self.test_loss, self.poison_batch = signal_at, test_loss, poison_batch
        self.signal_checks = 0

    def _objective(self, x):
        a, b = self.batches[self.batch]
        loss, grad = least_squares(slice(a, b))(x)
        return (math.inf if self.batch == self.poison_batch else loss), grad

    def evaluate(self, point, grad):
        loss = super().evaluate(point, grad)
        self.evaluation += 1
        a, b = self.batches[self.batch]
        self.stats_log.append({"examples": b - a, "portions_by_replica": [2, 1], "backups_issued": 1,
                               "backups_won": 1, "duplicates_rejected": 0, "revoked": 0, "reissued": 0,
                               "seconds": 0.001})
        return loss

    def shards_signalled(self):
        self.signal_checks += 1
        return self.signal_at is not None and self.signal_checks >= self.signal_at

    def checkpoint(self, vectors, **attrs):
        attrs["state"] = json.loads(json.dumps(attrs["state"]))  # as a checkpoint file stores it
        self.checkpoints.append({"vectors": {stored: self.vector(name) for stored, name in vectors}, **attrs})

    def test(self, point):
        self.calls.append("test")
        return self.test_loss, 0.9

    def stop_replicas(self):
        self.calls.append("stop_replicas")

    def stop_shards(self):
        self.calls.append("stop_shards")

    def records(self, before_verdict):
        before_verdict()
        self.calls.append("records")
        return [[{"kind": "replica", "replica": 0, "partition": 0, "portions_computed": 7}],
                [{"kind": "replica", "replica": 1, "partition": 0, "portions_computed": 3}]]


def settings(*overrides):
    cfg = configuration.load(CONFIG, ["train.n_replicas=2", "train.n_shards=1", "train.weight_decay=0",
                                      "train.eval_every=1000", *overrides])
    return cfg, layout_for(cfg["train"], N_PARAMS, coordinator=True)


def coordinate(tmp_path, name, space, *overrides, resumed=None, stop_requested=False):
    """Run a Coordinator; (summary, metrics records, the coordinator, what set_aside got)."""
    cfg, layout = settings(*overrides)
    run_dir = RunDirectory(tmp_path / name)
    set_aside, said = [], []
    coordinator = Coordinator(cfg, space, layout, run_dir, said.append, stop=SimpleNamespace(requested=stop_requested),
                              n_params=N_PARAMS, resumed=resumed, set_aside=set_aside.append)
    verdicts = []
    summary = coordinator.run(before_verdict=lambda: verdicts.append(True))
    assert verdicts == [True]
    records = read_metrics(tmp_path / name)
    assert json.loads((tmp_path / name / "summary.json").read_text()).keys() == summary.keys()
    return summary, records, coordinator, set_aside


def serial_losses(n_iter, cfg):
    tcfg = cfg["train"]
    lbfgs = LBFGS(NumpyVectorSpace(np.zeros(N_PARAMS, np.float32), least_squares(slice(0, N_EXAMPLES))),
                  m=tcfg["history"], c1=tcfg["wolfe_c1"], c2=tcfg["wolfe_c2"], max_evals=tcfg["max_line_search"])
    return [lbfgs.start()] + [lbfgs.step()["loss"] for _ in range(n_iter)]


def test_the_iterates_records_and_summary_of_a_full_batch_run(tmp_path):
    space = FakeSpace([(0, N_EXAMPLES)])
    summary, records, _, set_aside = coordinate(tmp_path, "run", space, "train.iterations=5", "train.tolerance=0")
    its = [r for r in records if r["kind"] == "iteration"]
    assert [r["iteration"] for r in its] == [0, 1, 2, 3, 4, 5] and its[0]["status"] == "start"
    np.testing.assert_allclose([r["loss"] for r in its], serial_losses(5, settings()[0]), rtol=1e-12)
    # Each record sums the statistics of the evaluations since the previous one.
    assert sum(len(r["examples_per_evaluation"]) for r in its) == space.evaluation == summary["evaluations"]
    for r in its:
        n = len(r["examples_per_evaluation"])
        assert r["examples_per_evaluation"] == [N_EXAMPLES] * n and r["portions_by_replica"] == [2 * n, n]
    assert summary["backups_won"] == summary["backups_issued"] == space.evaluation
    # The end: one final checkpoint, the final x tested, the replicas then the shards stopped.
    assert [c["state"]["phase"] for c in space.checkpoints] == ["final"]
    assert summary["checkpoints_written"] == [checkpoint_name(5)]
    assert space.calls == ["test", "stop_replicas", "stop_shards", "records"]
    assert summary["status"] == "budget" and summary["iterations"] == 5 and summary["failure"] is None
    assert summary["final_loss"] == its[-1]["loss"] and summary["test_loss"] == 0.25
    assert summary["portions_computed_by_replica"] == [7, 3] and summary["batch_size"] == N_EXAMPLES
    # the ranks log their own replica records (their files); the coordinator logs its own
    assert not [r for r in records if r["kind"] == "replica"]
    assert [r["kind"] for r in records][-2:] == ["eval", "coordinator"] and records[-1]["peak_rss_bytes"] > 2**20
    assert [r for r in records if r["kind"] == "eval"][-1]["source"] == "shards"
    assert not set_aside


def test_periodic_checkpoints_hold_what_a_resume_needs_and_the_resume_continues_the_iterates(tmp_path):
    batches = [(0, 20), (20, 40), (40, 60)]  # each iteration moves to the next batch
    common = ["train.tolerance=0", "train.checkpoint_every=2"]
    straight = FakeSpace(batches)
    _, records, _, _ = coordinate(tmp_path, "straight", straight, "train.iterations=6", *common)
    losses = [r["loss"] for r in records if r["kind"] == "iteration"]
    assert [c["state"]["phase"] for c in straight.checkpoints] == ["periodic"] * 3  # 6 was due: no extra final
    saved = straight.checkpoints[0]
    assert saved["step"] == 2 and saved["state"]["batch"] == 2
    assert saved["state"]["batches"] == [list(b) for b in batches]
    state = saved["state"]["lbfgs"]
    assert sorted(saved["vectors"]) == sorted(["params", *(f"lbfgs/{v}" for v in state["vectors"] if v != "x")])

    resumed_space = FakeSpace(batches, x0=saved["vectors"]["params"])
    for stored, vector in saved["vectors"].items():
        resumed_space.vectors[stored.removeprefix("lbfgs/").replace("params", "x")] = vector.copy()
    resumed = {"path": "ckpt", "step": 2, "state": saved["state"]}
    summary, records, _, _ = coordinate(tmp_path, "resumed", resumed_space, "train.iterations=6", *common,
                                        resumed=resumed)
    its = [r for r in records if r["kind"] == "iteration"]
    assert its[0]["status"] == "resume" and [r["iteration"] for r in its] == [2, 3, 4, 5, 6]
    np.testing.assert_allclose([r["loss"] for r in its], losses[2:], rtol=1e-12)
    assert summary["resumed_from"] == {"checkpoint": "ckpt", "step": 2} and summary["iterations"] == 6
    assert resumed_space.evaluation == straight.evaluation  # the counter continues too


@pytest.mark.parametrize("where", ["shards", "replica", "coordinator"])
def test_a_stop_signal_ends_the_run_with_a_signal_checkpoint(tmp_path, where):
    space = FakeSpace([(0, N_EXAMPLES)], signal_at=3 if where == "shards" else None)
    space.replica_signalled = where == "replica"
    summary, _, coordinator, _ = coordinate(tmp_path, "run", space, "train.iterations=50", "train.tolerance=0",
                                            stop_requested=where == "coordinator")
    expected = 3 if where == "shards" else 1
    assert summary["status"] == "signal" and summary["stopped_by_signal"] and summary["iterations"] == expected
    assert [c["state"]["phase"] for c in space.checkpoints] == ["signal"]
    assert coordinator.lbfgs.iteration == expected


def test_test_evaluations_during_training_are_logged(tmp_path):
    space = FakeSpace([(0, N_EXAMPLES)])
    _, records, _, _ = coordinate(tmp_path, "run", space, "train.iterations=4", "train.tolerance=0",
                                  "train.eval_every=2")
    evals = [r for r in records if r["kind"] == "eval" and r["source"] == "replicas"]
    assert [r["iteration"] for r in evals] == [2, 4] and space.calls.count("test") == 3


def test_a_non_finite_objective_is_a_divergence_without_a_final_checkpoint(tmp_path):
    space = FakeSpace([(0, 30), (30, 60)], poison_batch=1)
    summary, records, _, set_aside = coordinate(tmp_path, "run", space, "train.iterations=5")
    assert summary["status"] == "diverged" and summary["iterations"] == 0
    assert summary["failure"].startswith("iteration 1, batch 1: the objective is not finite")
    assert not space.checkpoints and not summary["checkpoints_written"] and not set_aside
    assert space.calls == ["test", "stop_replicas", "stop_shards", "records"]  # the end is the same


def test_a_non_finite_final_test_loss_sets_the_final_checkpoint_aside(tmp_path):
    space = FakeSpace([(0, N_EXAMPLES)], test_loss=math.nan)
    summary, _, _, set_aside = coordinate(tmp_path, "run", space, "train.iterations=2")
    assert summary["status"] == "diverged" and summary["failure"] == "the final test loss is nan"
    assert set_aside == [tmp_path / "run" / "checkpoints" / checkpoint_name(2)]


def test_the_coordinator_imports_without_mpi4py():
    code = "import sys, dbmpi.algorithms.coordinator; sys.exit(3 if 'mpi4py' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120).returncode == 0


class ClimbingTestLoss(FakeSpace):
    """A space whose test loss falls, then climbs and stays up (one value per test)."""

    LOSSES = [1.0, 0.5, 2.0, 2.1, 2.2, 2.3, 2.4, 2.5, 2.6]

    def test(self, point):
        loss = self.LOSSES[min(self.calls.count("test"), len(self.LOSSES) - 1)]
        super().test(point)
        return loss, 0.5


def test_a_climbing_test_loss_warns_once_and_the_run_finishes(tmp_path, capsys):
    summary, records, _, _ = coordinate(tmp_path, "run", ClimbingTestLoss([(0, N_EXAMPLES)]), "train.iterations=6",
                                        "train.tolerance=0", "train.eval_every=1")
    warnings = [r for r in records if r["kind"] == "warning"]
    assert len(warnings) == 1 and warnings[0]["iteration"] == 5  # tests at 1..6: 1.0, 0.5, then 3 above 0.75
    err = capsys.readouterr().err
    assert err.count("dbmpi: warning:") == 1 and "at iteration 5" in err and "optimizer lbfgs)" in err
    assert summary["status"] == "budget" and summary["failure"] is None
