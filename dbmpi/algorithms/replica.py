"""One Downpour worker's training loop (MPI-free): the paper's client loop, with its budget,
warmstart, periodic checkpoint requests, progress records (each worker into its own metrics
file), replica 0's evaluations and the hand-in at the end (its totals and state: O(1)).

Per step: a heartbeat; every `n_fetch` steps fetch the parameters; a minibatch gradient
added to the accrued gradient (and, with a local learning rate, applied to this copy); every
`n_push` steps push the accrued gradient. Two accrued buffers alternate: a push completes
while the next steps run (ShardClient.push), so the buffer just pushed is left alone until the
next push starts, and only then zeroed.

The seam. ReplicaLoop does no communication itself; its collaborators do, and tests replace
them with in-memory fakes (tests/test_replica_loop.py):

- `client` (dbmpi.ps.client.ShardClient): fetch(params), push(accrued, nonfinite),
  finish_push(), shard_versions(), counts() (per-shard push counts for the records);
  counters fetches, pushes, rejected, backlog_waits, bytes_fetched, bytes_pushed, the list staleness, the list shards.
- `control` (dbmpi.runtime.runcontrol.ReplicaControl): the run protocol with shard 0 and the
  replica's partitions: relay_stop(), stop_seen(), warmed(), mark_warmed(),
  request_checkpoint(state), any_partition(flag) (the stop verdict shared by the partitions,
  a collective when P > 1: every partition calls it at the same steps), hand_in(final) (the
  totals and state delivered, then this worker marked done; True if shard 0 had declared its
  replica failed meanwhile).
- `metrics` (dbmpi.io.rundir.RankMetrics, the lead's RunDirectory): this worker's own
  metrics file, log(record), close(), started (the run's start, seconds since the epoch).
- `liveness` (dbmpi.runtime.failover.Liveness): beat(force=False), busy(alone=True),
  replica_failed(replica), wait(done, low, high), leave_released().
- `clock`: seconds (time.perf_counter) for the time budget, periodic checkpoints, records.
- `stop_request` (dbmpi.runtime.signals.StopRequest or None): `.requested`.

The order of the collaborators' calls is the protocol (the fetch before a step, the push
after it, the checkpoint request after the push of its step, the hand-in after the last
push is counted); keep it when changing this file.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dbmpi import config as configuration
from dbmpi import kernels
from dbmpi.algorithms.divergence import DivergenceWatch, emit
from dbmpi.algorithms.minibatches import Budget, Minibatches, SplitMinibatches
from dbmpi.evaluation import mean_score, score
from dbmpi.io.rundir import peak_rss_bytes

MIN_REJECTED = 10  # a replica stops as diverged only after this many withheld pushes
DATA_ORDER = "each replica shuffles its slice with seed + 7919 * replica + 104729 * step"


def _silent(_msg: str) -> None:
    pass


def mean(values) -> float | None:
    """The mean of `values`; None when there are none."""
    return sum(values) / len(values) if values else None


@dataclass(frozen=True)
class Seat:
    """Where a worker sits: its world rank, replica and partition, and how many of each."""

    rank: int
    replica: int
    partition: int
    n_replicas: int
    n_partitions: int

    @property
    def is_lead(self) -> bool:
        """Rank 0 (replica 0, partition 0): prints progress and logs its records as it goes."""
        return self.rank == 0


@dataclass
class ReplicaData:
    """A worker's model block and data: its replica's slice of the training set (the input
    rows `input_rows` its partition needs), and for replica 0 the test set.

    Split (a dense first layer, P > 1): `x`, `y` are only this partition's piece of the
    slice, the examples from `bounds[partition]` on, `bounds` where each partition's piece
    starts then the slice's length; `exchange` joins the pieces of each batch (BatchShare)."""

    model: object
    x: np.ndarray
    y: np.ndarray
    test: tuple | None = None
    input_rows: list | None = None
    ranges: list | None = None  # the canonical parameter ranges of its block (the shards' client)
    bounds: list | None = None  # split: where each partition's piece of the slice starts, then its length
    first: int = 0  # split: where this partition's piece starts in the slice
    exchange: Callable | None = None  # split: SplitMinibatches' exchange

    @property
    def examples(self) -> int:
        """The examples of the replica's slice (all partitions' pieces together)."""
        return len(self.x) if self.bounds is None else int(self.bounds[-1])

    def minibatches(self, batch: int, seed: int) -> Minibatches:
        """The replica's shuffled batches of its slice: the same on every partition."""
        if self.bounds is None:
            return Minibatches(self.x, self.y, batch, seed)
        return SplitMinibatches(self.x, self.y, batch, seed, bounds=self.bounds, first=self.first,
                                exchange=self.exchange)


class ReplicaLoop:
    """A worker's run: train, then hand its totals to shard 0 (see the module docstring).
    `first_step`: the step a resumed run starts at (then no warmstart); `metrics`: this
    worker's metrics file; `say`: the lead's (silent elsewhere); `fail_at`: a step at which
    to fail (tests)."""

    def __init__(self, tcfg: dict, seat: Seat, data: ReplicaData, client, control, liveness, *,
                 metrics, stop_request=None, say: Callable[[str], None] = _silent,
                 first_step: int = 0, resumed: bool = False, fail_at: int | None = None,
                 step_sleep_s: float = 0.0, clock: Callable[[], float] = time.perf_counter):
        self.tcfg, self.seat, self.data, self.model = tcfg, seat, data, data.model
        self.client, self.control, self.liveness = client, control, liveness
        self.stop_request, self.metrics, self.say = stop_request, metrics, say
        self.first_step, self.resumed, self.fail_at, self.clock = first_step, resumed, fail_at, clock
        self.step_sleep_s = step_sleep_s  # a test hook (DBMPI_STEP_SLEEP): compute stood in by a sleep
        self.batch = min(tcfg["batch_size"], data.examples)
        self.budget = Budget.of(tcfg, data.examples, self.batch, clock).start()
        self.n_fetch, self.n_push = tcfg["n_fetch"], tcfg["n_push"]
        self.fetched = False  # whether the model holds the shards' parameters yet
        self.warmstart = tcfg["warmstart_steps"] if seat.n_replicas > 1 else 0
        # Replica 0 evaluates its copy as it goes; with partitions, all of them take part.
        self.eval_every = (configuration.eval_interval(tcfg, self.budget.steps_per_epoch)
                           if seat.replica == 0 else None)
        self.divergence = DivergenceWatch(tcfg["optimizer"], tcfg["learning_rate"])  # replica 0's lead
        # Every partition of a replica shuffles with the replica's seed (and, resumed, the
        # step it resumes at): the same examples.
        self.batches = data.minibatches(self.batch, tcfg["seed"] + 7919 * seat.replica + 104729 * first_step)
        self.last_checkpoint = clock()
        self.accrued = [np.zeros(self.model.n_params, np.float32), np.zeros(self.model.n_params, np.float32)]
        self.current = 0  # the accrued buffer steps add to
        self.nonfinite = 0  # NaN/Inf entries in it
        self.rejected_then = 0  # client.rejected at the last periodic checkpoint
        self.relayed = self.signalled = False  # this rank relayed a stop signal / one was seen
        self.started = clock()
        self._open_window()
        if seat.is_lead:
            say(f"downpour: {seat.n_replicas} replicas x {seat.n_partitions} partition(s), {data.examples} examples "
                f"each, batch {self.batch}, budget {self.budget.steps} steps per replica, n_fetch {self.n_fetch}, "
                f"n_push {self.n_push}, warmstart {self.warmstart} steps, shard optimizer {tcfg['optimizer']} "
                f"lr {tcfg['learning_rate']}")

    # The run ---------------------------------------------------------------------------------
    def run(self):
        """Warmstart (replica 0 trains alone first), train to the budget, hand in. Returns the
        client (its epochs are closed in the teardown)."""
        self.started = self.clock()
        step = self.first_step
        if self.warmstart and not self.resumed:
            step = self.warm_start()
        step = self.train_steps(step, max(0, self.budget.steps - self.first_step), "downpour")
        if step % self.n_push != 0:  # push what was accrued since the last push
            self.client.push(self.accrued[self.current], self.nonfinite)
        self.client.finish_push()
        self.finish(step)
        return self.client

    def warm_start(self) -> int:
        """Replica 0: train `warmstart_steps` alone, then release the others; the others wait
        (politely) for that, or for replica 0 to fail. The step the run goes on from."""
        if self.seat.replica == 0:
            step = self.train_steps(0, self.warmstart, "warmstart")
            self.client.finish_push()  # warmstart's last push is counted before the others start
            if self.seat.partition == 0:
                self.control.mark_warmed()
            self.say(f"warmstart done after {step} steps; starting {self.seat.n_replicas - 1} more replicas")
            return step
        self.liveness.wait(self._released, low=1e-3, high=1e-2)
        return self.first_step

    def _released(self) -> bool:
        self.stop_requested()  # relays a signal that arrives while waiting
        return self.control.warmed() or self.liveness.replica_failed(0)

    def train_steps(self, first: int, count: float, phase: str) -> int:
        """Steps from `first` until `count` more are done or the run must stop; the step reached."""
        step = first
        self._open_window()
        while self.keep_going(step, first + count):
            step = self.step(step)
            self.maybe_checkpoint(step, phase)
            if step % self.tcfg["log_every"] == 0:
                self.log(step, phase)
            if self.eval_every and step % self.eval_every == 0:
                self.evaluate(step, phase)
        return step

    def step(self, step: int) -> int:
        """One training step (fetch first, push after, on their rhythm); returns step + 1."""
        self.liveness.beat()
        if step == self.fail_at:
            raise RuntimeError(f"failure injected at step {step} (DBMPI_FAIL_AT)")
        model = self.model
        if step % self.n_fetch == 0 or not self.fetched:  # a resumed run fetches at its first step
            self.client.fetch(model.params)
            self.fetched = True
        xb, yb = self.batches.next()
        loss = model.loss_and_grad(xb, yb)
        if self.step_sleep_s:
            time.sleep(self.step_sleep_s)
        self.nonfinite += kernels.axpy_count_nonfinite(1.0, model.grad, self.accrued[self.current])
        if self.tcfg["local_learning_rate"]:
            kernels.sgd_step(model.params, model.grad, self.tcfg["local_learning_rate"])
        step += 1
        if step % self.n_push == 0:
            self.client.push(self.accrued[self.current], self.nonfinite)
            self.current ^= 1
            self.accrued[self.current][:] = 0.0  # its push completed when this one started
            self.nonfinite = 0
        self.window_loss += loss
        self.window_steps += 1
        return step

    # When to stop ------------------------------------------------------------------------------
    def keep_going(self, step: int, last: float) -> bool:
        """Below `last`, and no partition of the replica out of time, signalled or diverging.
        A replica's partitions step in lockstep, so only a time budget or a stop signal could
        split them: the verdict is shared."""
        if step >= last:
            return False
        stop = self.budget.out_of_time() or self.stop_requested() or self.diverging()
        return not self.control.any_partition(stop)

    def stop_requested(self) -> bool:
        """A stop signal on any rank reaches every worker through shard 0: relay one seen
        here, and look whether one was relayed."""
        if self.stop_request is None:
            return False
        if self.stop_request.requested and not self.relayed:
            self.control.relay_stop()
            self.relayed = True
        if not self.signalled:
            self.signalled = self.control.stop_seen()
        return self.signalled

    def diverging(self) -> bool:
        """This worker's pushes were mostly withheld as non-finite: stop (shard 0 fails the run)."""
        rejected = self.client.rejected
        return rejected >= MIN_REJECTED and rejected > self.tcfg["max_rejected_fraction"] * (
            self.client.pushes + rejected)

    # Checkpoints -------------------------------------------------------------------------------
    def checkpoint_state(self, step: int, phase: str) -> dict:
        """The state a checkpoint records, as this replica sees it."""
        return {"step": step, "phase": phase, "seed": self.tcfg["seed"], "n_replicas": self.seat.n_replicas,
                "replica": self.seat.replica, "replica_examples": self.data.examples,
                "elapsed_s": round(self.clock() - self.started, 3), "data_order": DATA_ORDER}

    def acting_lead(self) -> bool:
        """Replica 0's first partition asks for periodic checkpoints; if replica 0 failed,
        the lowest replica that did not."""
        if self.seat.partition != 0:
            return False
        return all(self.liveness.replica_failed(r) for r in range(self.seat.replica))

    def maybe_checkpoint(self, step: int, phase: str) -> None:
        """The acting lead asks for a checkpoint when one is due (train.checkpoint_every
        steps or train.checkpoint_every_s seconds), unless pushes were withheld since the last."""
        every, every_s = self.tcfg["checkpoint_every"], self.tcfg["checkpoint_every_s"]
        due = (every and step % every == 0) or (every_s and self.clock() - self.last_checkpoint >= every_s)
        if not (due and self.acting_lead()):
            return
        client = self.client
        if client.rejected == self.rejected_then:  # no checkpoint of a diverging run
            self.control.request_checkpoint(self.checkpoint_state(step, phase))
        else:
            self.say(f"[{phase}] step {step:>7}  no checkpoint: {client.rejected - self.rejected_then} "
                     f"non-finite push(es) withheld since the last one")
        self.rejected_then = client.rejected
        self.last_checkpoint = self.clock()

    # Records -----------------------------------------------------------------------------------
    def _open_window(self, now: float | None = None) -> None:
        """Start a new window of steps for the next `train` record."""
        self.window_loss, self.window_steps = 0.0, 0
        self.window_start = self.clock() if now is None else now
        self.staleness_seen = len(self.client.staleness)

    def log(self, step: int, phase: str) -> None:
        """A `train` record of the steps since the last one, into this worker's metrics file;
        the lead prints it too."""
        client, seat = self.client, self.seat
        now = self.clock()
        recent = client.staleness[self.staleness_seen:]
        record = {"kind": "train", "rank": seat.rank, "replica": seat.replica, "partition": seat.partition,
                  "phase": phase, "elapsed_s": round(now - self.started, 4),
                  "step": step, "epoch": round(step / self.budget.steps_per_epoch, 4),
                  "loss": self.window_loss / self.window_steps,
                  "samples_per_s": round(self.window_steps * self.batch / max(now - self.window_start, 1e-9), 1),
                  "staleness": mean(recent),
                  "pushes": client.pushes, "rejected": client.rejected}
        if seat.is_lead:
            record["shard_updates"] = client.shard_versions()
        self.metrics.log(record)
        if seat.is_lead:
            staleness = record["staleness"] if record["staleness"] is None else round(record["staleness"], 2)
            self.say(f"[{phase}] step {step:>7}  loss {record['loss']:.4f}  "
                     f"{record['samples_per_s']:8.0f} samples/s (replica 0)  "
                     f"shard updates {sum(record['shard_updates'])}  staleness {staleness}")
        self._open_window(now)

    def evaluate(self, step: int, phase: str) -> None:
        """Replica 0: its own copy on the test set (all its partitions take part), a batch
        at a time with a heartbeat between: it cannot trip the failure detector."""
        test_loss, test_acc = mean_score([score(self.model, self.data.test[0], self.data.test[1],
                                                self.tcfg["eval_batch_size"], between=self.liveness.beat)])
        if self.seat.is_lead:
            self.metrics.log({"kind": "eval", "source": "replica 0", "step": step,
                              "test_loss": test_loss, "test_accuracy": test_acc})
            self.say(f"[{phase}] step {step:>7}  test accuracy {test_acc:.4f} (replica 0's copy)")
            if warning := self.divergence.observe(step, test_loss):
                emit({**warning, "rank": self.seat.rank, "replica": self.seat.replica}, self.metrics.log)

    def replica_record(self, step: int, elapsed: float) -> dict:
        """The `replica` record: what this worker did over the whole run."""
        client, model, seat = self.client, self.model, self.seat
        return {"kind": "replica", "rank": seat.rank, "replica": seat.replica, "partition": seat.partition,
                "steps": step, "wall_s": round(elapsed, 3),
                "samples_per_s": round(step * self.batch / max(elapsed, 1e-9), 1),
                "fetches": client.fetches, "pushes": client.pushes, "rejected": client.rejected,
                "backlog_waits": client.backlog_waits, "n_params": model.n_params, "shards": client.shards,
                "input_rows": self.data.input_rows,
                "bytes_fetched": client.bytes_fetched, "bytes_pushed": client.bytes_pushed,
                "activation_bytes_sent": getattr(model, "bytes_sent", 0),
                "activation_bytes_received": getattr(model, "bytes_received", 0),
                "mean_staleness": mean(client.staleness),
                "examples": self.data.examples, "batch": self.batch,
                "stopped_by_signal": self.signalled, "diverged": self.diverging(), **client.counts(),
                "peak_rss_bytes": peak_rss_bytes(), "run_started": self.metrics.started}

    def finish(self, step: int) -> None:
        """After the last push was counted: this worker's `replica` record into its metrics
        file; its totals (`totals`, O(1)) and, from a replica's first partition, the state for
        the final checkpoint to shard 0; once they are delivered, this worker counts as
        finished. Leaves if its replica was declared failed meanwhile."""
        phase = "signal" if self.signalled else "end"
        if self.seat.is_lead and self.signalled:
            self.say(f"stop signal: checkpointing at step {step} and exiting")
        elapsed = self.clock() - self.started
        self.batches.close()
        record = self.replica_record(step, elapsed)
        self.metrics.log(record)
        self.metrics.close()
        final = {"totals": totals(record),
                 "state": self.checkpoint_state(step, phase) if self.seat.partition == 0 else None}
        if self.control.hand_in(final):  # declared failed meanwhile: shard 0 no longer counts it
            self.liveness.leave_released()


TOTALS = ("rank", "replica", "partition", "steps", "wall_s", "batch", "pushes", "rejected", "bytes_fetched",
          "mean_staleness", "stopped_by_signal", "diverged")


def totals(record: dict) -> dict:
    """What shard 0's summary needs of a worker's `replica` record: a fixed set of numbers
    (the per-shard counts stay in the worker's metrics file)."""
    return {key: record[key] for key in TOTALS}
