"""Downpour's replica loop without MPI: dbmpi.algorithms.replica.ReplicaLoop driven with a fake
client, control and liveness (the way tests/test_portions.py drives the scheduler), so its
rhythm, sums, warmstart and budgets are checked in-process, call by call."""
import numpy as np
import pytest

from dbmpi.algorithms.replica import ReplicaData, ReplicaLoop, Seat


class FakeModel:
    """Gradient = the step number in every entry (1, 2, 3, ...): sums are easy to check."""

    def __init__(self, n_params=6):
        self.n_params = n_params
        self.params = np.zeros(n_params, np.float32)
        self.grad = np.zeros(n_params, np.float32)
        self.steps = 0

    def loss_and_grad(self, xb, yb):
        self.steps += 1
        self.grad[:] = self.steps
        return float(len(xb))

    def evaluate(self, x, y, batch):
        return 0.5, 0.75


class FakeClient:
    """Records every call, in order, with a copy of what was pushed."""

    def __init__(self, calls, rejected_every=0):
        self.calls, self.rejected_every = calls, rejected_every
        self.fetches = self.pushes = self.rejected = self.backlog_waits = 0
        self.bytes_fetched = self.bytes_pushed = 0
        self.staleness, self.shards, self.pushed = [], [0], []

    def fetch(self, out):
        self.fetches += 1
        self.calls.append(("fetch",))

    def push(self, grad, nonfinite=None):
        self.calls.append(("push",))
        if self.rejected_every and (self.pushes + self.rejected + 1) % self.rejected_every == 0:
            self.rejected += 1
            return False
        self.pushes += 1
        self.pushed.append(grad.copy())
        return True

    def finish_push(self):
        self.calls.append(("finish_push",))

    def shard_versions(self):
        return [self.pushes]

    def counts(self):
        return {"shards": self.shards, "pushes_by_shard": [self.pushes]}


class FakeControl:
    def __init__(self, calls, warmed=True):
        self.calls, self.is_warmed = calls, warmed
        self.stops = 0
        self.checkpoints, self.final = [], None

    def relay_stop(self):
        self.stops += 1
        self.calls.append(("relay_stop",))

    def stop_seen(self):
        return self.stops > 0

    def warmed(self):
        return self.is_warmed

    def mark_warmed(self):
        self.calls.append(("mark_warmed",))
        self.is_warmed = True

    def request_checkpoint(self, state):
        self.calls.append(("checkpoint", state["step"]))
        self.checkpoints.append(state)

    def any_partition(self, flag):
        return bool(flag)

    def hand_in(self, final):
        self.calls.append(("hand_in",))
        self.final = final
        return False


class FakeLiveness:
    def __init__(self, failed=()):
        self.failed, self.beats, self.waits = set(failed), 0, 0

    def beat(self, force=False):
        self.beats += 1

    def busy(self, alone=True):
        import contextlib
        return contextlib.nullcontext()

    def replica_failed(self, replica):
        return replica in self.failed

    def wait(self, done, low=None, high=None):
        self.waits += 1
        assert done(), "a fake wait must be satisfied at once"

    def leave_released(self):
        raise AssertionError("not declared failed here")


class FakeMetrics:
    """A worker's metrics file (dbmpi.io.rundir.RankMetrics), in memory."""

    started = 1000.0

    def __init__(self):
        self.logged, self.closed = [], False

    def log(self, record):
        self.logged.append(record)

    def close(self):
        self.closed = True


class Clock:
    def __init__(self, tick=0.0):
        self.now, self.tick = 0.0, tick

    def __call__(self):
        self.now += self.tick
        return self.now


TCFG = {"batch_size": 4, "steps": 12, "epochs": None, "time_budget_s": None, "n_fetch": 3, "n_push": 4,
        "warmstart_steps": 0, "eval_every": 1000, "seed": 1, "local_learning_rate": 0.0, "log_every": 5,
        "checkpoint_every": None, "checkpoint_every_s": None, "max_rejected_fraction": 0.5,
        "optimizer": "sgd", "learning_rate": 0.1, "eval_batch_size": 8}


def make_loop(replica=0, n_replicas=1, rank=None, clock=None, failed=(), rejected_every=0, warmed=True, **over):
    calls = []
    tcfg = {**TCFG, **over}
    x = np.arange(40 * 2, dtype=np.float32).reshape(40, 2)
    y = np.arange(40, dtype=np.int32) % 3
    data = ReplicaData(FakeModel(), x, y, test=(x[:8], y[:8]), input_rows=[0, 2])
    seat = Seat(rank=replica if rank is None else rank, replica=replica, partition=0, n_replicas=n_replicas,
                n_partitions=1)
    loop = ReplicaLoop(tcfg, seat, data, FakeClient(calls, rejected_every), FakeControl(calls, warmed),
                       FakeLiveness(failed), metrics=FakeMetrics(), clock=clock or Clock())
    return loop, calls


def test_fetch_every_n_fetch_and_push_every_n_push_steps():
    loop, calls = make_loop(steps=12, n_fetch=3, n_push=4)
    loop.run()
    fetch_push = [c[0] for c in calls if c[0] in ("fetch", "push")]
    # Step s fetches before it computes when s % 3 == 0; after step s, a push when s % 4 == 0.
    expected = []
    for s in range(12):
        if s % 3 == 0:
            expected.append("fetch")
        if (s + 1) % 4 == 0:
            expected.append("push")
    assert fetch_push == expected
    assert loop.client.fetches == 4 and loop.client.pushes == 3
    assert calls[-2:] == [("finish_push",), ("hand_in",)]  # the last push is counted before the hand-in


def test_the_pushed_accrued_gradient_is_the_sum_of_the_steps_gradients():
    loop, _ = make_loop(steps=10, n_push=4)
    loop.run()
    pushed = loop.client.pushed
    # Steps 1-4, 5-8, then 9-10 pushed at the end (10 % 4 != 0).
    assert [float(p[0]) for p in pushed] == [1 + 2 + 3 + 4, 5 + 6 + 7 + 8, 9 + 10]
    assert all(np.all(p == p[0]) for p in pushed)


def test_records_and_final_state():
    loop, _ = make_loop(steps=10, log_every=5)
    loop.run()
    final = loop.control.final
    assert final["state"]["step"] == 10 and final["state"]["phase"] == "end"
    record = loop.metrics.logged[-1]  # the worker's own file ends with its replica record
    assert record["kind"] == "replica" and record["steps"] == 10 and record["pushes"] == 3
    assert record["input_rows"] == [0, 2] and record["batch"] == 4
    assert record["peak_rss_bytes"] > 10 * 2**20 and record["run_started"] == FakeMetrics.started
    # shard 0 gets a fixed set of totals, not the records (O(1) whatever the run's length)
    assert final["totals"] == {key: record[key] for key in final["totals"]}
    assert set(final["totals"]) == {"rank", "replica", "partition", "steps", "wall_s", "batch", "pushes",
                                    "rejected", "bytes_fetched", "mean_staleness", "stopped_by_signal", "diverged"}
    logged = [r for r in loop.metrics.logged if r["kind"] == "train"]  # logged as it goes
    assert [r["step"] for r in logged] == [5, 10] and loop.metrics.closed


def test_every_worker_logs_its_own_train_records():
    loop, _ = make_loop(replica=1, n_replicas=2, steps=10, log_every=5, warmed=True)
    loop.run()
    train = [r for r in loop.metrics.logged if r["kind"] == "train"]
    assert [(r["replica"], r["step"]) for r in train] == [(1, 5), (1, 10)]
    assert "shard_updates" not in train[0]  # only the lead reads the shards' versions


def test_replica_0_evaluates_its_copy_a_batch_at_a_time_with_a_heartbeat_between():
    loop, _ = make_loop(steps=4, eval_every=2, eval_batch_size=3)  # 8 test rows: batches of 3, 3, 2
    beats = []
    loop.liveness.beat = lambda force=False: beats.append(force)
    loop.evaluate(2, "downpour")
    evals = [r for r in loop.metrics.logged if r["kind"] == "eval"]
    assert evals == [{"kind": "eval", "source": "replica 0", "step": 2, "test_loss": 0.5, "test_accuracy": 0.75}]
    assert len(beats) == 3


def test_warmstart_replica_0_trains_alone_then_releases_the_others():
    lead, calls = make_loop(replica=0, n_replicas=2, steps=10, warmstart_steps=6, n_push=4)
    lead.run()
    names = [c[0] for c in calls]
    released = names.index("mark_warmed")
    # Warmstart's 6 steps: one push at step 4, then its last push counted before the release.
    assert names[:released].count("push") == 1 and names[released - 1] == "finish_push"
    assert lead.control.final["state"]["step"] == 6 + 10  # the step budget comes after warmstart
    other, calls = make_loop(replica=1, n_replicas=2, steps=10, warmstart_steps=6, warmed=False, failed=[0])
    other.run()  # replica 0 failed: released at once
    assert other.liveness.waits >= 1 and other.control.final["state"]["step"] == 10


def test_a_run_resumed_between_two_fetches_fetches_before_its_first_step():
    """Resumed at step 4 with n_fetch = 3: step 4 must not train on the freshly built model."""
    loop, calls = make_loop(steps=8, n_fetch=3, n_push=4)
    loop.first_step, loop.resumed = 4, True
    loop.run()
    kinds = [c[0] for c in calls if c[0] in ("fetch", "push")]
    assert kinds[0] == "fetch"  # before step 4 computes
    assert kinds.count("fetch") == 2  # step 4, then step 6 on the rhythm


def test_a_resumed_run_skips_warmstart():
    loop, calls = make_loop(replica=0, n_replicas=2, steps=10, warmstart_steps=6)
    loop.first_step, loop.resumed = 4, True
    loop.run()
    assert ("mark_warmed",) not in calls
    assert loop.control.final["state"]["step"] == 10


@pytest.mark.parametrize("over,steps", [({"steps": 7}, 7), ({"steps": None, "epochs": 2}, 20)])
def test_step_and_epoch_budgets(over, steps):
    loop, _ = make_loop(**over)  # 40 examples, batch 4: 10 steps per epoch
    loop.run()
    assert loop.control.final["state"]["step"] == steps


def test_the_time_budget_stops_the_loop():
    clock = Clock(tick=1.0)  # every clock reading moves one second on
    loop, _ = make_loop(steps=None, epochs=None, time_budget_s=30.0, clock=clock)
    loop.run()
    assert 0 < loop.control.final["state"]["step"] < 30


def test_a_stop_signal_is_relayed_once_and_stops_every_replica():
    class Signal:
        requested = False

    loop, calls = make_loop(steps=100)
    loop.stop_request = Signal()
    original = loop.step

    def step(s):
        if s == 5:
            loop.stop_request.requested = True
        return original(s)

    loop.step = step
    loop.run()
    assert calls.count(("relay_stop",)) == 1
    state = loop.control.final["state"]
    assert (state["step"], state["phase"]) == (6, "signal")
    assert loop.control.final["totals"]["stopped_by_signal"]


def test_periodic_checkpoints_by_the_acting_lead_only():
    lead, calls = make_loop(steps=12, checkpoint_every=5)
    lead.run()
    assert [c for c in calls if c[0] == "checkpoint"] == [("checkpoint", 5), ("checkpoint", 10)]
    other, calls = make_loop(replica=1, n_replicas=2, steps=12, checkpoint_every=5)
    other.run()
    assert not [c for c in calls if c[0] == "checkpoint"]
    acting, calls = make_loop(replica=1, n_replicas=2, steps=12, checkpoint_every=5, failed=[0])
    acting.run()  # replica 0 failed: replica 1 asks
    assert [c for c in calls if c[0] == "checkpoint"] == [("checkpoint", 5), ("checkpoint", 10)]


def test_mostly_withheld_pushes_stop_the_replica_as_diverged():
    loop, _ = make_loop(steps=400, n_push=1, rejected_every=1)  # every push withheld
    loop.run()
    record = loop.control.final["totals"]
    assert record["diverged"] and record["rejected"] == 10 and record["steps"] == 10
