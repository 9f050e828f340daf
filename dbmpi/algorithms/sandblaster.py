"""Sandblaster L-BFGS: a coordinator drives L-BFGS through vector commands run on the shards,
and the model replicas compute batch gradients portion by portion.

Ranks (dbmpi.runtime.layout with a coordinator): R x P workers, S shards, then the coordinator.

- **Shards** hold every L-BFGS vector (the iterate x, gradient, direction, trial point, the
  m (s, y) pairs): each its own slice. They wait for commands broadcast by the coordinator
  on `control` (coordinator + shards): dot (a float64 partial sum, reduced at the
  coordinator), axpy, scale, copy, multiply, publish (copy a vector into the RMA parameter
  window the replicas fetch from), collect (take the summed gradient the replicas pushed
  into the inbox window). Only scalars travel to the coordinator.
- **The coordinator** runs dbmpi.algorithms.lbfgs on a vector space whose vectors are those slices
  (`ShardSpace`; the iteration loop, checkpoints and summary are dbmpi.algorithms.coordinator's).
  To evaluate f and its gradient at a point it publishes the point, then hands out the
  batch's portions (dbmpi.algorithms.portions): two-sided messages with each replica's lead, backups
  near the end, a commit protocol so each portion counts once. A test evaluation is split
  the same way: pieces of the test set handed to the live replicas, their (loss sum,
  correct, rows) summed at the coordinator (`ShardSpace.test`).
- **Replicas** (`Replica`) fetch the published point once per evaluation (one-sided), compute each
  portion's loss and gradient, accrue the committed ones and push them into the shards'
  inboxes (one-sided accumulate) when told to, then report the flush.

Failed replicas (under `mpiexec -disable-auto-cleanup` with each rank under
dbmpi.runtime.supervise, as for Downpour). The coordinator is the detector: a replica owes it a
message from when it is sent anything but a stop until its next message
(dbmpi.algorithms.portions.Silence); one that owes it for `train.replica_timeout_s` is declared failed
(one stderr line, a `replica_failed` record). Its portions go to the others
(PortionScheduler.fail); what it flushed stays counted, so every example counts once and a
full batch gives the same iterates. If it died told to flush and before its report, part of
its push may be in the inboxes: the coordinator waits for the live replicas' pushes,
empties the inboxes and computes the batch again; a test piece it held goes to another
replica. Every rank writes its own records into its own metrics file (dbmpi.io.rundir). The
end is point to point: each live rank sends its record (O(1)) to the coordinator and waits
for the verdict; after a failure every rank leaves without collectives (os._exit),
and with P > 1 partitions the coordinator ends the dead one's stuck partners with
MPI_Abort(7) once the run is written. A shard or the coordinator cannot be lost: the ranks
on its host see its process end (dbmpi.runtime.vitalwatch) and the job ends with MPI_Abort(4).

Every rank that waits (shards for a command, replicas for a reply, the coordinator for a
request) polls with exponential back-off, so waiting ranks leave the cores to the ranks
computing. Test-only fault hooks (a straggler, a slow machine, a replica killed after a push)
come from dbmpi.runtime.faults. MPI only through dbmpi.ps.commands (the shard commands) and
dbmpi.runtime.portion_channel (the point-to-point messages).
"""
from __future__ import annotations

import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from dbmpi import data as datasets
from dbmpi import kernels
from dbmpi.algorithms.coordinator import Coordinator
from dbmpi.algorithms.lbfgs import X, vector_names
from dbmpi.algorithms.portions import (
    DISMISSED,
    REPLY_FIELDS,
    REQUEST_FIELDS,
    BatchStats,
    Order,
    PortionScheduler,
    Reply,
    Silence,
    cut,
    decode_request,
    encode_request,
)
from dbmpi.algorithms.run import RunContext, prepare_run, run_committed, set_aside
from dbmpi.algorithms.sgd import EXIT_DIVERGED, DivergedError
from dbmpi.evaluation import mean_score, score
from dbmpi.io.checkpoint import open_checkpoint
from dbmpi.io.rundir import RankMetrics, peak_rss_bytes
from dbmpi.model.partitioned import worker_model
from dbmpi.ps.checkpoint import ShardCheckpoints
from dbmpi.ps.client import ShardClient
from dbmpi.ps.commands import ShardCommands
from dbmpi.ps.vectors import (
    AXPY,
    CHECKPOINT,
    COLLECT,
    COPY,
    DOT,
    MULTIPLY,
    PUBLISH,
    SCALE,
    SIGNALLED,
    STOP,
    ShardVectors,
)
from dbmpi.ps.windows import ParameterWindows
from dbmpi.runtime.comm import SPIN_S, Comm, Tag, poll, stderr_line, world_comm
from dbmpi.runtime.failover import EXIT_ALL_REPLICAS_FAILED, EXIT_REPLICA_LOST, leave
from dbmpi.runtime.faults import FAULTS
from dbmpi.runtime.layout import Layout
from dbmpi.runtime.portion_channel import ANY_SOURCE, CoordinatorChannel, PartitionRelay, RankChannel
from dbmpi.runtime.topology import Topology
from dbmpi.runtime.vitalwatch import VitalWatch

ABORT_PARTITIONS_LEFT = 7  # MPI_Abort code ending a failed run whose replicas have P > 1 partitions


# The coordinator ----------------------------------------------------------------------------
class ShardSpace:
    """dbmpi.algorithms.lbfgs's vector space over the shards' slices; `evaluate` runs a batch through
    the replicas."""

    def __init__(self, topo: Topology, layout: Layout, batches: list[tuple[int, int]], tcfg: dict,
                 n_test: int = 0):
        self.shards = ShardCommands(topo.control, vector_names(tcfg["history"]))
        self.test_pieces = cut(0, n_test, tcfg["eval_batch_size"]) if n_test else []
        self.ranks = CoordinatorChannel(topo.world, REQUEST_FIELDS, REPLY_FIELDS)
        self.layout = layout
        self.batches = batches
        self.batch = 0  # which batch evaluations use now
        self.evaluation = 0
        self.portion_size = tcfg["portion_size"]
        self.push_every = tcfg["push_every"]
        self.backups = tcfg["backup_tasks"]
        self.weight_decay = float(tcfg["weight_decay"])
        self.leads = [layout.worker_rank(r, 0) for r in range(layout.n_replicas)]
        self.parked: set[int] = set()
        self.stats_log: list[dict] = []
        self.replica_signalled = False  # a replica relayed a stop signal in a request
        # Requests that arrived between two evaluations, answered when the next one starts.
        self.stashed: dict[int, dict] = {}
        # Failures: who owes a message since when, the batch's scheduler while one runs,
        # whether a lost push may have spoiled the inboxes, one record per failure.
        self.silence = Silence(layout.n_replicas, tcfg["replica_timeout_s"], time.monotonic())
        self.scheduler: PortionScheduler | None = None
        self.inbox_spoiled = False
        self.recomputed = 0  # batches computed again because of a lost push
        self.dismissed: set[int] = set()
        self.events: list[dict] = []
        self.started = time.monotonic()

    @property
    def failed_replicas(self) -> list[int]:
        return sorted(self.silence.failed)

    # The vector commands ------------------------------------------------------------------
    def dot(self, a: str, b: str) -> float:
        self.shards.send(DOT, 0.0, a, b)
        return self.shards.total()

    def axpy(self, alpha: float, x: str, y: str) -> None:
        self.shards.send(AXPY, alpha, x, y)

    def scale(self, alpha: float, x: str) -> None:
        self.shards.send(SCALE, alpha, x)

    def copy(self, src: str, dst: str) -> None:
        self.shards.send(COPY, 0.0, src, dst)

    def multiply(self, a: str, b: str, out: str) -> None:
        self.shards.send(MULTIPLY, 0.0, a, b, out)

    def stop_shards(self) -> None:
        self.shards.send(STOP)

    def checkpoint(self, vectors: list[tuple[str, str]], **attrs) -> None:
        """Have the shards write a checkpoint of `vectors` ((name in the file, vector)) with
        the file attributes `attrs` (dbmpi.ps.checkpoint.ShardCheckpoints.write)."""
        self.shards.send(CHECKPOINT)
        self.shards.share({"vectors": vectors, **attrs})
        self.shards.total()  # written and renamed into place

    def shards_signalled(self) -> bool:
        """Whether a stop signal reached any shard."""
        self.shards.send(SIGNALLED)
        return self.shards.total() > 0

    # Batch gradients ----------------------------------------------------------------------
    def evaluate(self, point: str, grad: str) -> float:
        """Mean loss over the current batch at `point`; its gradient into `grad`. A replica
        that fails meanwhile has its portions reissued to the others; if it may have landed
        part of a push (dbmpi.algorithms.portions), the batch is computed again from empty inboxes."""
        started = time.perf_counter()
        while True:
            scheduler, n = self._batch(point)
            self.shards.wake()
            self.shards.send(COLLECT, 0.0, grad)  # also empties the inboxes
            nonfinite = self.shards.total() + scheduler.stats.nonfinite
            if not self.inbox_spoiled:
                break
            self.inbox_spoiled = False
            self.recomputed += 1
        s = scheduler.stats
        self._log_stats(s, time.perf_counter() - started)
        if s.examples != n:  # the commit protocol's invariant; never expected
            raise RuntimeError(f"batch gradient counted {s.examples} examples, expected {n}")
        loss = s.loss
        if self.weight_decay:  # + weight_decay/2 |x|^2, computed where x lives
            loss += 0.5 * self.weight_decay * self.dot(point, point)
            self.axpy(self.weight_decay, point, grad)
        return loss if nonfinite == 0 and math.isfinite(loss) else math.inf

    def _log_stats(self, s: BatchStats, seconds: float) -> None:
        """The evaluation's portion statistics (the coordinator's iteration records sum them)."""
        self.stats_log.append({
            "evaluation": self.evaluation, "batch": self.batch, "examples": s.examples, "portions": s.portions,
            "portions_by_replica": [s.committed_by.get(r, 0) for r in range(self.layout.n_replicas)],
            "backups_issued": s.backups_issued, "backups_won": s.backups_won, "backups_cancelled": s.backups_cancelled,
            "duplicates_rejected": s.duplicates_rejected, "revoked": s.revoked, "reissued": s.reissued,
            "seconds": seconds})

    def _batch(self, point: str) -> tuple[PortionScheduler, int]:
        """Publish `point` and hand out the current batch's portions until every one is
        counted, or until a failure spoiled the inboxes (then only until no live replica's
        push is in flight; their requests wait for the next attempt). The shards sleep."""
        self.shards.send(PUBLISH, 0.0, point)
        self.shards.total()  # every shard has published
        self.evaluation += 1
        start, stop = self.batches[self.batch]
        n = stop - start
        scheduler = self.scheduler = PortionScheduler(
            cut(start, stop, self.portion_size), self.layout.n_replicas, self.push_every, self.backups,
            failed=self.silence.failed)
        self._wake_parked(scheduler, n)
        for message in self.stashed.values():
            self._serve(scheduler, message, n)
        self.stashed.clear()
        while not scheduler.complete and not self.inbox_spoiled:
            message = self._receive()
            if message is not None:
                self._serve(scheduler, message, n)
            else:  # a replica failed: its portions are free for the parked ones
                self._wake_parked(scheduler, n)
        while self.inbox_spoiled and scheduler.flushing:
            message = self._receive()
            if message is not None:
                scheduler.flushing.discard(message["replica"])
                self._stash(message)
        self.scheduler = None
        return scheduler, n

    def _serve(self, scheduler: PortionScheduler, message: dict, n: int) -> None:
        replica = message["replica"]
        self.replica_signalled |= bool(message.get("signal"))
        if message["evaluation"] != self.evaluation:
            # A late result from an earlier evaluation (a straggler's duplicate): void.
            reply = scheduler.handle(replica)
            if reply is None:
                reply = Reply()
            reply.discard, reply.commit = True, False
            self._reply(replica, reply, n)
        else:
            reply = scheduler.handle(replica, message["done"], message["flushed"])
            self._reply(replica, reply, n)
        self._wake_parked(scheduler, n)  # work may have appeared (revoked commits)

    def _wake_parked(self, scheduler: PortionScheduler, n: int) -> None:
        """Offer work to parked replicas until one is refused: they hold nothing, so the
        others would be refused too (one refusal per message once the batch runs dry)."""
        while self.parked:
            replica = self.parked.pop()
            reply = scheduler.handle(replica)
            self._reply(replica, reply, n)
            if reply is None:
                return

    def _reply(self, replica: int, reply: Reply | None, n: int) -> None:
        if reply is None:
            self.parked.add(replica)
            return
        self.parked.discard(replica)
        self.ranks.reply(self.leads[replica], Order.of(reply, self.evaluation, n))
        self.silence.asked(replica, time.monotonic())

    def _stash(self, message: dict) -> None:
        """A request to answer later (when the next evaluation starts, or with stop)."""
        self.stashed[message["replica"]] = message
        self.replica_signalled |= bool(message.get("signal"))

    # Failures -------------------------------------------------------------------------------
    def _receive(self, tag: int = Tag.REQUEST, source: int = ANY_SOURCE) -> dict | None:
        """The next message with `tag` from `source`, or None once a replica was declared
        failed meanwhile (the caller checks again what it waits for). Requests that come
        while it waits for something else are stashed. Polled (dbmpi.runtime.comm.poll)."""
        got: list[dict] = []

        def arrived() -> bool:
            message = self._probe(tag, source)
            if message is not None:
                got.append(message)
                return True
            if tag != Tag.REQUEST and (request := self._probe(Tag.REQUEST, ANY_SOURCE)) is not None:
                self._stash(request)
            overdue = self.silence.overdue(time.monotonic())
            for replica, silent_s in overdue:
                self._declare(replica, silent_s)
            return bool(overdue)

        poll(arrived, spin=SPIN_S)
        return got[0] if got else None

    def _probe(self, tag: int, source: int) -> dict | None:
        """A message with `tag` from `source` if one is in. A failed replica's messages are
        not passed on: its requests are answered with its dismissal, and one reporting a
        flush spoils the inboxes (it was silent too long, not dead, and pushed)."""
        if tag == Tag.REQUEST:  # fixed-size, on the preposted receives
            found = self.ranks.request()
            found = None if found is None else (found[0], decode_request(found[1]))
        else:
            found = self.ranks.receive(tag, source)
        if found is None:
            return None
        sender, message = found
        role = self.layout.role(sender)
        if not role.is_worker:
            return message
        if role.replica in self.silence.failed:
            if tag == Tag.REQUEST:
                self.inbox_spoiled |= message.get("flushed") is not None
                self._dismiss(role.replica)
            elif tag == Tag.RECORDS:  # stopped, then silent too long: it leaves without collectives
                self.ranks.verdict(sender, False)
            return None
        self.silence.heard(role.replica)
        return message

    def _dismiss(self, replica: int) -> None:
        """Tell a replica declared failed to leave, in reply to its next request."""
        if replica not in self.dismissed:
            self.dismissed.add(replica)
            self.ranks.reply_unwaited(self.leads[replica], Order.stopped(DISMISSED))  # it may be dead

    def _declare(self, replica: int, silent_s: float) -> None:
        """A replica that owed a message for `train.replica_timeout_s` is failed: the
        others take over what it held; it is never waited for again."""
        self.silence.fail(replica)
        self.parked.discard(replica)
        self.stashed.pop(replica, None)
        intact = self.scheduler.fail(replica) if self.scheduler is not None else True
        self.inbox_spoiled |= not intact
        elapsed, live = time.monotonic() - self.started, self.silence.live
        ranks = [self.layout.worker_rank(replica, p) for p in range(self.layout.n_partitions)]
        self.events.append({"kind": "replica_failed", "replica": replica, "ranks": ranks,
                            "silent_s": round(silent_s, 2), "detected_s": round(elapsed, 2),
                            "detected_unix": round(time.time(), 3), "evaluation": self.evaluation,
                            "batch_recomputed": not intact})
        stderr_line(f"dbmpi: replica {replica} failed (no message for {silent_s:.1f} s, train.replica_timeout_s = "
                    f"{self.silence.timeout_s:g}) {elapsed:.1f} s into the run; {len(live)} replica(s) go on")
        if not live:
            stderr_line("dbmpi: every Sandblaster replica failed: nothing can finish; resume from the last checkpoint")
            time.sleep(0.5)  # let the launcher forward the lines
            self.ranks.abort(EXIT_ALL_REPLICAS_FAILED)

    def test(self, point: str) -> tuple[float, float]:
        """(loss, accuracy) of `point` on the test set, between two evaluations, split across
        the live replicas: the shards publish the point; pieces of `eval_batch_size` test rows
        go to replicas as they are free (each fetches the point once), their (loss sum,
        correct, rows) are summed here. A piece held by a replica that fails meanwhile goes
        to another; each piece counts once. Every message is a reply to a request or a
        result, as in an evaluation, so the failure detector (Silence) watches it the same."""
        self.shards.send(PUBLISH, 0.0, point)
        self.shards.total()
        todo, out, scores = list(self.test_pieces), {}, []
        while todo or out:
            for replica in [r for r in out if r in self.silence.failed]:
                todo.append(out.pop(replica))
            free = [r for r in self.silence.live if r not in out and (r in self.parked or r in self.stashed)]
            for replica in free[:len(todo)]:
                out[replica] = todo.pop()
                self._test_order(replica, out[replica])
            message = self._receive(tag=Tag.RESULT) if out else self._receive()
            if message is None:
                continue
            if not out:  # a replica asks: free for a piece
                self._stash(message)
            elif out.pop(message["replica"], None) is not None:
                scores.append(message["score"])
        self.shards.wake()
        return mean_score(scores)

    def _test_order(self, replica: int, piece: tuple[int, int]) -> None:
        """Have a free replica score test rows [start, stop) of the published point."""
        # A stashed request reports work of an evaluation that is over: discard it, as the
        # next evaluation would.
        discard = self.stashed.pop(replica, None) is not None
        self.parked.discard(replica)
        self.ranks.reply(self.leads[replica], Order.tested(self.evaluation, discard, *piece))
        self.silence.asked(replica, time.monotonic())

    def stop_replicas(self) -> None:
        """Answer every live replica's next request with stop (parked and stashed ones at
        once); dismiss the failed ones (in case one is alive after all)."""
        ready = self.parked | set(self.stashed)
        waiting = set(self.silence.live) - ready
        for replica in sorted(ready):
            self._stop(replica)
        self.parked.clear()
        self.stashed.clear()
        while waiting:
            message = self._receive()
            if message is not None:
                self._stop(message["replica"])
                waiting.discard(message["replica"])
            waiting -= self.silence.failed
        for replica in sorted(self.silence.failed):
            self._dismiss(replica)

    def _stop(self, replica: int) -> None:
        self.ranks.reply(self.leads[replica], Order.stopped())
        self.silence.asked(replica, time.monotonic())  # it owes its records now

    def records(self, before_verdict: Callable[[], None] = lambda: None) -> list[list[dict]]:
        """After stop: every live rank's records, point to point (a collective would wait
        for a dead rank forever), then the verdict to each: True, end with the collective
        teardown; False (a replica failed), leave without collectives. The failure records
        come last. Records are taken as they come, so a dead rank delays no one's."""
        layout, received = self.layout, {}

        def missing() -> list[int]:
            return [r for r in range(layout.coordinator_rank) if r not in received
                    and not (layout.role(r).is_worker and layout.role(r).replica in self.silence.failed)]

        while missing():
            message = self._receive(tag=Tag.RECORDS)
            if message is None:
                continue
            received[message["rank"]] = message["records"]
            role = layout.role(message["rank"])
            if role.is_worker and any(layout.role(r).replica == role.replica for r in missing()):
                self.silence.asked(role.replica, time.monotonic())  # its other partitions' are due
        clean = not self.silence.failed
        before_verdict()
        for rank in sorted(received):
            self.ranks.verdict(rank, clean)
        return [received[r] for r in sorted(received)] + [self.events]


# Replicas -----------------------------------------------------------------------------------
def _leave_dismissed(topo: Topology) -> None:
    role = topo.role
    stderr_line(f"dbmpi: rank {topo.rank} (replica {role.replica}, partition {role.partition}): the coordinator "
                f"declared replica {role.replica} failed; this rank leaves, the others go on")
    leave(EXIT_REPLICA_LOST)


class Accrual:
    """What a replica committed since its last flush: the portions' gradient, each weighted
    by its share of the batch, their loss, the non-finite gradient entries."""

    def __init__(self, n_params: int):
        self.grad = np.zeros(n_params, np.float32)
        self.clear()

    def clear(self) -> None:
        self.grad[:] = 0.0
        self.loss, self.nonfinite, self.portions = 0.0, 0, []

    def add(self, grad: np.ndarray, loss: float, weight: float, portion: int) -> None:
        self.nonfinite += kernels.axpy_count_nonfinite(weight, grad, self.grad)
        self.loss += loss * weight
        self.portions.append(portion)


class Replica:
    """A worker's part of a replica: ask the coordinator for work, compute portions, accrue
    what it commits, push when told to. The lead (partition 0) asks; a replica's other
    partitions follow its replies."""

    def __init__(self, ctx: RunContext, windows: ParameterWindows):
        self.cfg, self.layout, self.topo, self.signals = ctx.cfg, ctx.layout, ctx.topo, ctx.stop
        self.replica, self.partition = self.topo.role.replica, self.topo.role.partition
        self.lead = self.partition == 0
        self.model, ranges, self.rows = worker_model(ctx.network, self.topo.replica, ctx.plan,
                                                     ctx.tcfg["overlap_exchanges"])
        self.client = ShardClient(windows, self.replica, ranges)
        self.accrual = Accrual(self.model.n_params)
        self.factor, self.fixed_delay = FAULTS.slowdown(self.replica), FAULTS.portion_delay_s
        self.die_after_push = FAULTS.pushes_before_death(self.replica)
        self.fetched = -1  # the evaluation whose point model.params holds
        self.done, self.done_evaluation, self.flushed = None, 0, None  # what the next request reports
        self.last_loss, self.last_n = 0.0, 0  # the portion computed last
        self.computed, self.busy = 0, 0.0
        self.coordinator = RankChannel(self.topo.world, self.layout.coordinator_rank)
        self.partitions = PartitionRelay(self.topo.replica) if self.layout.n_partitions > 1 else None
        self.request = np.zeros(REQUEST_FIELDS, np.int64)
        self.reply = np.zeros(REPLY_FIELDS, np.int64)
        self.signalled = False  # a stop signal on any partition, shared at flushes

    def run(self) -> dict:
        """Follow the coordinator's replies until stop; this worker's record."""
        with datasets.open_dataset(self.cfg["data"]["path"]) as dataset:
            while self.follow(self.next_order(), dataset):
                pass
        self.client.close()
        client = self.client
        return {"kind": "replica", "rank": self.topo.rank, "replica": self.replica, "partition": self.partition,
                "portions_computed": self.computed, "busy_s": round(self.busy, 3), "fetches": client.fetches,
                "pushes": client.pushes, "bytes_fetched": client.bytes_fetched,
                "bytes_pushed": client.bytes_pushed, "n_params": self.model.n_params,
                "slowdown": self.factor, "peak_rss_bytes": peak_rss_bytes()}

    def next_order(self) -> Order:
        """The lead reports what it did and waits for the reply; the other partitions get
        it from the lead (point to point: polled nonblocking collectives are slow)."""
        if self.lead:
            encode_request(self.request, self.replica, self.done_evaluation, self.done, self.flushed,
                           self.signalled or self.signals.requested)
            self.coordinator.ask(self.request, self.reply)
        if self.partitions is not None:
            self.partitions.share(self.reply)
        return Order(*self.reply.tolist())

    def follow(self, order: Order, dataset) -> bool:
        """Do what `order` says; False once told to stop."""
        if order.stop == DISMISSED:  # silent too long: the others took over its portions
            _leave_dismissed(self.topo)
        if order.stop:
            return False
        if order.discard:  # the coordinator revoked what this replica holds
            self.accrual.clear()
        if order.commit:  # the portion just reported counts: its gradient is in model.grad
            self.accrual.add(self.model.grad, self.last_loss, self.last_n / order.n, self.done)
        self.done, self.flushed = None, None
        if order.test:
            self.test(order, dataset)
        elif order.flush:
            self.flush()
        elif order.index >= 0:  # else a verdict without work: report and ask again
            self.compute(order, dataset)
        return True

    def test(self, order: Order, dataset) -> None:
        """Test rows [begin, end) of the point the shards published (fetched once per test
        evaluation), scored as (loss sum, correct, rows) for the coordinator to sum."""
        tested = -2 - order.evaluation  # never an evaluation's number: compute() fetches again
        if self.fetched != tested:
            self.client.fetch(self.model.params)
            self.fetched = tested
        x, y = dataset.load("test", order.begin, order.end, rows=self.rows)
        result = score(self.model, x, y, self.cfg["train"]["eval_batch_size"])
        if self.lead:
            self.coordinator.send_result({"replica": self.replica, "score": result})

    def flush(self) -> None:
        """Push the accrual into the shards' inboxes; the next request reports it."""
        accrual = self.accrual
        self.client.push(accrual.grad, accrual.nonfinite)
        self.client.finish_push()  # in the shards' inboxes before the report says so
        if self.client.pushes == self.die_after_push:  # test hook: pushed, never reported
            os.kill(os.getpid(), signal.SIGKILL)
        if self.partitions is not None:  # every partition's share has landed
            self.signalled = self.partitions.any_signalled(self.signals.requested)
        self.flushed = {"portions": len(accrual.portions), "loss": accrual.loss, "nonfinite": accrual.nonfinite}
        accrual.clear()

    def compute(self, order: Order, dataset) -> None:
        """The loss and gradient of the portion (into model.grad), at the evaluation's point."""
        if order.evaluation != self.fetched:
            self.client.fetch(self.model.params)  # once per evaluation
            self.fetched = order.evaluation
        t0 = time.perf_counter()
        x, y = dataset.load("train", order.begin, order.end, rows=self.rows)
        self.last_loss = float(self.model.loss_and_grad(x, y))
        self.last_n = order.end - order.begin
        delay = (self.factor - 1.0) * (time.perf_counter() - t0) + self.fixed_delay * self.factor
        if delay > 0:  # test hooks: a straggler, a slow machine
            time.sleep(delay)
        self.busy += time.perf_counter() - t0
        self.computed += 1
        self.done, self.done_evaluation = order.index, order.evaluation


# The run ------------------------------------------------------------------------------------
def run(cfg: dict, run_path: Path, comm: Comm | None = None,
        say: Callable[[str], None] = print, resume: str | None = None,
        parameters_only: bool = False) -> dict | None:
    """Train with algorithm = "sandblaster" on every rank of `comm`; the coordinator writes
    the run directory and returns the summary. `resume`: a checkpoint path or "auto";
    `parameters_only`: take only its parameters (a warm start, as `dbmpi train --init`);
    `comm`: COMM_WORLD unless given."""
    comm = world_comm() if comm is None else comm
    ctx = prepare_run(cfg, run_path, comm, say, resume, coordinator=True, parameters_only=parameters_only)
    return run_committed(ctx, _run)


def _run(ctx: RunContext) -> dict | None:
    """Every rank's part of the committed run. A divergence raises DivergedError on every
    rank, after the teardown."""
    watch = VitalWatch(ctx.topo.world, ctx.layout).start()
    # The coordinator's start time is everyone's: one time axis in every rank's metrics file.
    started = ctx.comm.bcast(ctx.run_dir.started if ctx.run_dir is not None else None, root=ctx.root)
    if ctx.topo.role.is_coordinator:
        summary = _coordinate(ctx, watch)
    else:
        summary = _work(ctx, watch, RankMetrics(ctx.run_path, ctx.comm.rank, started))
    failure = ctx.topo.world.bcast(summary["failure"] if summary is not None else None,
                                   root=ctx.layout.coordinator_rank)
    if failure is not None:  # the same line on every rank (dbmpi.cli), the last good checkpoint kept
        raise DivergedError(failure)
    return summary


def _coordinate(ctx: RunContext, watch: VitalWatch) -> dict:
    """The coordinator's part: the run (dbmpi.algorithms.coordinator) over the shards' vectors;
    after a failed replica it leaves without collectives once the run is written."""
    say, tcfg, n_train = ctx.say, ctx.tcfg, ctx.data_info["n_train"]
    say(ctx.network.summary())
    say(ctx.layout.describe("sgd", ctx.plan, ctx.memory()))
    say(f"run directory: {ctx.run_dir.path}")
    space = ShardSpace(ctx.topo, ctx.layout, cut(0, n_train, min(tcfg["batch_size"], n_train)), tcfg,
                       n_test=ctx.data_info["n_test"])
    coordinator = Coordinator(ctx.cfg, space, ctx.layout, ctx.run_dir, say, stop=ctx.stop,
                              n_params=ctx.network.n_params, resumed=ctx.resumed, set_aside=set_aside)
    summary = coordinator.run(before_verdict=watch.stop)
    space.ranks.close()  # no more requests to serve
    if summary["failed_replicas"]:
        _leave_after_failure(summary, ctx.layout, ctx.topo, say)
    return summary


def _work(ctx: RunContext, watch: VitalWatch, metrics: RankMetrics) -> None:
    """A shard's or a worker's part: serve the vector commands, or compute portions; then
    its record into its own metrics file and (O(1)) to the coordinator, point to point, and
    the coordinator's verdict says how to end."""
    topo, layout, role = ctx.topo, ctx.layout, ctx.topo.role
    windows = ParameterWindows(topo.window, layout, role.shard if role.is_shard else None)
    if role.is_shard:
        shard, checkpoints = _shard_vectors(ctx, windows)
        shard.serve()
        record = {"kind": "shard", "rank": topo.rank, "shard": role.shard, "commands": shard.commands,
                  "vectors": len(shard.vectors), "checkpoints_written": checkpoints.written,
                  "peak_rss_bytes": peak_rss_bytes()}
    else:
        record = Replica(ctx, windows).run()
    metrics.log(record)
    metrics.close()
    coordinator = RankChannel(topo.world, layout.coordinator_rank)
    coordinator.send_records({"rank": topo.rank, "records": [record]})
    watch.stop()  # the run is over for this rank; the others may leave from here on
    if not coordinator.verdict():
        leave(0)  # a replica failed: no collective teardown (it would wait for the dead)
    if role.is_shard:
        shard.close()
    windows.free()


def _shard_vectors(ctx: RunContext, windows: ParameterWindows) -> tuple[ShardVectors, ShardCheckpoints]:
    """A shard's slice of every L-BFGS vector (x initialised for its range, or the vectors of the
    checkpoint resumed from: each shard reads only its own range), and its checkpoint writer."""
    layout, shard = ctx.layout, ctx.topo.role.shard
    lo, hi = layout.shard_ranges[shard]
    checkpoints = ShardCheckpoints(ctx.topo.control, list(range(layout.n_shards)), layout.shard_ranges,
                                   ctx.network.tensors, ctx.run_path / "checkpoints", ctx.tcfg["checkpoint_keep"])
    # Its range only, drawn directly (a resume reads it below instead).
    initial = np.zeros(hi - lo, np.float32) if ctx.resumed else ctx.network.initial_values(lo, hi)
    vectors = ShardVectors(windows, ctx.topo.control, initial, vector_names(ctx.tcfg["history"]),
                           checkpoints, ctx.stop)
    if ctx.resumed:
        with open_checkpoint(ctx.resumed["path"], verify=False) as ckpt:
            for stored, name in _resumed_vectors(ctx.resumed):
                ckpt.read_range(stored, lo, hi, out=vectors.vector(name))
    return vectors, checkpoints


def _resumed_vectors(resumed: dict | None) -> list[tuple[str, str]]:
    """(name in the checkpoint, L-BFGS vector) to load: x always; g and the history only
    from a Sandblaster checkpoint (a Downpour one gives a warm start)."""
    if resumed is None:
        return []
    pairs = [("params", X)]
    lbfgs_state = resumed["state"].get("lbfgs")
    if lbfgs_state is not None:
        pairs += [(f"lbfgs/{name}", name) for name in lbfgs_state["vectors"] if name != X]
    return pairs


def _leave_after_failure(summary: dict, layout: Layout, topo: Topology, say) -> None:
    """The coordinator, once the run is written: leave without collectives (the others
    have). Partitions of a failed replica may still wait in a collective with their dead
    partner: with P > 1 partitions, MPI_Abort ends them (and the job)."""
    say(f"replica(s) {summary['failed_replicas']} failed; the others finished the run")
    if layout.n_partitions > 1:
        stderr_line(f"dbmpi: ending the partitions of failed replica(s) {summary['failed_replicas']} "
                    f"(MPI_Abort {ABORT_PARTITIONS_LEFT}); the run is complete and written")
        time.sleep(0.5)  # let the launcher forward the line
        topo.world.Abort(ABORT_PARTITIONS_LEFT)
    if summary["failure"] is not None:  # the others left without knowing: this rank says it
        stderr_line(f"dbmpi: error: training diverged: {summary['failure']}")
        leave(EXIT_DIVERGED)
    leave(0)
