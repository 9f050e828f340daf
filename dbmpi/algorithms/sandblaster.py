"""Sandblaster L-BFGS: a coordinator drives L-BFGS through vector commands run on the shards,
and the model replicas compute batch gradients portion by portion.

Ranks (dbmpi.runtime.layout with a coordinator): R x P workers, S shards, then the coordinator.

- **Shards** hold every L-BFGS vector (the iterate x, gradient, direction, trial point, the
  m (s, y) pairs): each its own slice. They wait for commands broadcast by the coordinator
  on `control` (coordinator + shards): dot (a float64 partial sum, reduced at the
  coordinator), axpy, scale, copy, multiply, publish (copy a vector into the RMA parameter
  window the replicas fetch from), collect (take the summed gradient the replicas pushed
  into the inbox window). Only scalars travel to the coordinator.
- **The coordinator** runs dbmpi.algorithms.lbfgs on a vector space whose vectors are those slices.
  To evaluate f and its gradient at a point it publishes the point, then hands out the
  batch's portions (dbmpi.algorithms.portions): two-sided messages with each replica's lead, backups
  near the end, a commit protocol so each portion counts once.
- **Replicas** fetch the published point once per evaluation (one-sided), compute each
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
empties the inboxes and computes the batch again. Test evaluations go to the lowest live
replica. The end is point to point: each live rank sends its records to the coordinator and
waits for the verdict; after a failure every rank leaves without collectives (os._exit),
and with P > 1 partitions the coordinator ends the dead one's stuck partners with
MPI_Abort(7) once the run is written. A shard or the coordinator cannot be lost: the ranks
on its host see its process end (VitalWatch) and the job ends with MPI_Abort(4).

Every rank that waits (shards for a command, replicas for a reply, the coordinator for a
request) polls with exponential back-off, so waiting ranks leave the cores to the ranks
computing. Test-only fault hooks (a straggler, a slow machine, a replica killed after a push)
come from dbmpi.runtime.faults.
"""
from __future__ import annotations

import math
import os
import signal
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
from mpi4py import MPI
from threadpoolctl import threadpool_limits

from dbmpi import config as configuration
from dbmpi import data as datasets
from dbmpi import kernels
from dbmpi.algorithms.downpour import AGREED_ERRORS, _set_aside
from dbmpi.algorithms.lbfgs import LBFGS, NotFinite, X, vector_names
from dbmpi.algorithms.portions import PortionScheduler, Reply, Silence, cut
from dbmpi.algorithms.sgd import EXIT_DIVERGED, DivergedError
from dbmpi.io.checkpoint import checkpoint_name, open_checkpoint
from dbmpi.io.rundir import RunDirectory
from dbmpi.model import Network
from dbmpi.model.partitioned import worker_model
from dbmpi.parallel.partition import PartitionPlan
from dbmpi.ps.checkpoint import ShardCheckpoints
from dbmpi.ps.client import ShardClient
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
from dbmpi.runtime import procfs
from dbmpi.runtime.comm import SPIN_S, Tag, Wait, abort_on_error, agree, poll, stderr_line, wait
from dbmpi.runtime.failover import ABORT_SHARD_LOST, EXIT_ALL_REPLICAS_FAILED, EXIT_REPLICA_LOST, leave
from dbmpi.runtime.faults import FAULTS
from dbmpi.runtime.layout import Layout, layout_for
from dbmpi.runtime.signals import StopRequest
from dbmpi.runtime.topology import Topology

STOPPED, DISMISSED = 1, 2  # a stop reply's first field: the run is over / declared failed
ABORT_PARTITIONS_LEFT = 7  # MPI_Abort code ending a failed run whose replicas have P > 1 partitions
# A reply within a replica, as int64s: stop, discard, commit, flush, index, start, stop,
# evaluation, n, test (evaluate the published point on the test set)
REPLY_FIELDS = 10


class VitalWatch:
    """Ends the job (MPI_Abort(4)) when the process of a shard or of the coordinator on this
    host has ended: they hold the optimizer's vectors and state, and a collective over a dead
    one never returns, so under the failover launcher the job would otherwise hang. A thread
    looks at their processes (dbmpi.runtime.procfs) every `period` s; the lowest live rank on the
    host says so in one line, the others abort quietly a moment later. Construction is
    collective (the ranks' hosts and processes); `stop()` once this rank's part of the run
    is over (the others may leave from then on)."""

    def __init__(self, comm: MPI.Intracomm, layout: Layout, period: float = 0.25):
        self.comm, self.layout, self.period = comm, layout, period
        self.local = procfs.host_peers(comm)
        self.vital = [r for r in (*layout.shard_ranks, layout.coordinator_rank) if r in self.local and r != comm.rank]
        self.lock = threading.Lock()
        self.stopped = False

    def start(self) -> "VitalWatch":
        threading.Thread(target=self._loop, name="dbmpi-vital-watch", daemon=True).start()
        return self

    def stop(self) -> None:
        with self.lock:
            self.stopped = True

    def _loop(self) -> None:
        while True:
            time.sleep(self.period)
            dead = [r for r in self.vital if procfs.gone(self.local[r])]
            with self.lock:
                if self.stopped:
                    return
                if dead:
                    self._abort(dead[0])

    def _abort(self, rank: int) -> None:
        role = self.layout.role(rank)
        what = "the coordinator" if role.is_coordinator else f"shard {role.shard}"
        if procfs.lowest_alive(self.local, self.comm.rank) == self.comm.rank:
            stderr_line(f"dbmpi: {what} (rank {rank}) died (its process {self.local[rank][0]} ended): it cannot "
                        "be recovered, so the job ends; resume from the last checkpoint")
        time.sleep(0.5)  # let the launcher forward the line
        self.comm.Abort(ABORT_SHARD_LOST)


# The coordinator ----------------------------------------------------------------------------
class ShardSpace:
    """dbmpi.algorithms.lbfgs's vector space over the shards' slices; `evaluate` runs a batch through
    the replicas."""

    def __init__(self, control: MPI.Intracomm, world: MPI.Intracomm, layout: Layout,
                 names: list[str], batches: list[tuple[int, int]], tcfg: dict):
        self.control, self.world, self.layout = control, world, layout
        self.root = control.rank
        self.index = {name: i for i, name in enumerate(names)}
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
        self.dismissals: list[MPI.Request] = []
        self.events: list[dict] = []
        self.started = time.monotonic()

    def _send(self, op, alpha=0.0, a=None, b=None, c=None) -> None:
        ids = [self.index[n] if n is not None else -1 for n in (a, b, c)]
        command = np.array([op, alpha, *ids], np.float64)
        self.control.Bcast(command, root=self.root)

    def _reduce(self) -> float:
        total = np.zeros(1)
        self.control.Reduce(np.zeros(1), total, op=MPI.SUM, root=self.root)
        return float(total[0])

    # The vector commands ------------------------------------------------------------------
    def dot(self, a: str, b: str) -> float:
        self._send(DOT, 0.0, a, b)
        return self._reduce()

    def axpy(self, alpha: float, x: str, y: str) -> None:
        self._send(AXPY, alpha, x, y)

    def scale(self, alpha: float, x: str) -> None:
        self._send(SCALE, alpha, x)

    def copy(self, src: str, dst: str) -> None:
        self._send(COPY, 0.0, src, dst)

    def multiply(self, a: str, b: str, out: str) -> None:
        self._send(MULTIPLY, 0.0, a, b, out)

    def stop_shards(self) -> None:
        self._send(STOP)

    def checkpoint(self, vectors: list[tuple[str, str]], **attrs) -> None:
        """Have the shards write a checkpoint of `vectors` ((name in the file, vector)) with
        the file attributes `attrs` (dbmpi.ps.checkpoint.ShardCheckpoints.write)."""
        self._send(CHECKPOINT)
        self.control.bcast({"vectors": vectors, **attrs}, root=self.root)
        self._reduce()  # written and renamed into place

    def shards_signalled(self) -> bool:
        """Whether a stop signal reached any shard."""
        self._send(SIGNALLED)
        return self._reduce() > 0

    # Batch gradients ----------------------------------------------------------------------
    def evaluate(self, point: str, grad: str) -> float:
        """Mean loss over the current batch at `point`; its gradient into `grad`. A replica
        that fails meanwhile has its portions reissued to the others; if it may have landed
        part of a push (dbmpi.algorithms.portions), the batch is computed again from empty inboxes."""
        started = time.perf_counter()
        while True:
            scheduler, n = self._batch(point)
            for shard in range(self.control.size - 1):
                self.control.Send(np.zeros(1), dest=shard, tag=Tag.WAKE)
            self._send(COLLECT, 0.0, grad)  # also empties the inboxes
            nonfinite = self._reduce() + scheduler.stats.nonfinite
            if not self.inbox_spoiled:
                break
            self.inbox_spoiled = False
            self.recomputed += 1
        s = scheduler.stats
        self.stats_log.append({
            "evaluation": self.evaluation, "batch": self.batch, "examples": s.examples,
            "portions": s.portions, "portions_by_replica": [s.committed_by.get(r, 0) for r in range(self.layout.n_replicas)],
            "backups_issued": s.backups_issued, "backups_won": s.backups_won,
            "duplicates_rejected": s.duplicates_rejected, "revoked": s.revoked, "reissued": s.reissued,
            "seconds": time.perf_counter() - started})
        if s.examples != n:  # the commit protocol's invariant; never expected
            raise RuntimeError(f"batch gradient counted {s.examples} examples, expected {n}")
        loss = s.loss
        if self.weight_decay:  # + weight_decay/2 |x|^2, computed where x lives
            loss += 0.5 * self.weight_decay * self.dot(point, point)
            self.axpy(self.weight_decay, point, grad)
        return loss if nonfinite == 0 and math.isfinite(loss) else math.inf

    def _batch(self, point: str) -> tuple[PortionScheduler, int]:
        """Publish `point` and hand out the current batch's portions until every one is
        counted, or until a failure spoiled the inboxes (then only until no live replica's
        push is in flight; their requests wait for the next attempt). The shards sleep."""
        self._send(PUBLISH, 0.0, point)
        self._reduce()  # every shard has published
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
        for replica in sorted(self.parked):
            reply = scheduler.handle(replica)
            if reply is not None:
                self._reply(replica, reply, n)

    def _reply(self, replica: int, reply: Reply | None, n: int) -> None:
        if reply is None:
            self.parked.add(replica)
            return
        self.parked.discard(replica)
        message = reply.as_message(self.batch)
        message.update(evaluation=self.evaluation, n=n, stop=False)
        self.world.send(message, dest=self.leads[replica], tag=Tag.REPLY)
        self.silence.asked(replica, time.monotonic())

    def _stash(self, message: dict) -> None:
        """A request to answer later (when the next evaluation starts, or with stop)."""
        self.stashed[message["replica"]] = message
        self.replica_signalled |= bool(message.get("signal"))

    # Failures -------------------------------------------------------------------------------
    def _receive(self, tag: int = Tag.REQUEST, source: int = MPI.ANY_SOURCE) -> dict | None:
        """The next message with `tag` from `source`, or None once a replica was declared
        failed meanwhile (the caller checks again what it waits for). Requests that come
        while it waits for something else are stashed. Polled (dbmpi.algorithms.sandblaster._poll)."""
        got: list[dict] = []

        def arrived() -> bool:
            message = self._probe(tag, source)
            if message is not None:
                got.append(message)
                return True
            if tag != Tag.REQUEST and (request := self._probe(Tag.REQUEST, MPI.ANY_SOURCE)) is not None:
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
        status = MPI.Status()
        found = self.world.improbe(source=source, tag=tag, status=status)
        if found is None:
            return None
        message = found.recv()
        role = self.layout.role(status.Get_source())
        if not role.is_worker:
            return message
        if role.replica in self.silence.failed:
            if tag == Tag.REQUEST:
                self.inbox_spoiled |= message.get("flushed") is not None
                self._dismiss(role.replica)
            elif tag == Tag.RECORDS:  # stopped, then silent too long: it leaves without collectives
                self.world.send(False, dest=status.Get_source(), tag=Tag.VERDICT)
            return None
        self.silence.heard(role.replica)
        return message

    def _dismiss(self, replica: int) -> None:
        """Tell a replica declared failed to leave, in reply to its next request."""
        if replica not in self.dismissed:
            self.dismissed.add(replica)  # never waited for (it may be dead): kept, not freed
            self.dismissals.append(self.world.isend({"stop": True, "dismissed": True},
                                                    dest=self.leads[replica], tag=Tag.REPLY))

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
            self.world.Abort(EXIT_ALL_REPLICAS_FAILED)

    def test(self, point: str) -> tuple[float, float]:
        """(loss, accuracy) of `point` on the test set, computed between two evaluations by
        the lowest live replica (replica 0 unless it failed): the shards publish the point,
        the replica fetches and evaluates it; another one does if it fails meanwhile."""
        self._send(PUBLISH, 0.0, point)
        self._reduce()
        result = None
        while result is None:
            chosen = self.silence.live[0]
            if chosen not in self.parked and chosen not in self.stashed:
                message = self._receive()
                if message is not None:
                    self._stash(message)
                continue
            # A stashed request reports work of an evaluation that is over: discard it, as
            # the next evaluation would.
            discard = self.stashed.pop(chosen, None) is not None
            self.parked.discard(chosen)
            self.world.send({"stop": False, "test": True, "discard": discard, "commit": False, "flush": False,
                             "portion": None, "evaluation": self.evaluation, "n": 1},
                            dest=self.leads[chosen], tag=Tag.REPLY)
            self.silence.asked(chosen, time.monotonic())
            while result is None and chosen not in self.silence.failed:
                result = self._receive(tag=Tag.RESULT, source=self.leads[chosen])
        for shard in range(self.control.size - 1):
            self.control.Send(np.zeros(1), dest=shard, tag=Tag.WAKE)
        return result

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
            waiting &= set(self.silence.live)
        for replica in sorted(self.silence.failed):
            self._dismiss(replica)

    def _stop(self, replica: int) -> None:
        self.world.send({"stop": True}, dest=self.leads[replica], tag=Tag.REPLY)
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
            self.world.send(clean, dest=rank, tag=Tag.VERDICT)
        return [received[r] for r in sorted(received)] + [self.events]


# Replicas -----------------------------------------------------------------------------------
def _encode(message: dict) -> np.ndarray:
    out = np.zeros(REPLY_FIELDS, np.int64)
    if message.get("stop"):
        out[0] = DISMISSED if message.get("dismissed") else STOPPED
        return out
    portion = message["portion"] or (-1, 0, 0)
    out[1:] = [message["discard"], 1 if message["commit"] else 0, message["flush"],
               portion[0], portion[1], portion[2], message["evaluation"], message["n"],
               1 if message.get("test") else 0]
    return out


def _leave_dismissed(topo: Topology) -> None:
    role = topo.role
    stderr_line(f"dbmpi: rank {topo.rank} (replica {role.replica}, partition {role.partition}): the coordinator "
                f"declared replica {role.replica} failed; this rank leaves, the others go on")
    leave(EXIT_REPLICA_LOST)


def _replica(cfg, network, layout, plan, topo, windows, signals: StopRequest) -> dict:
    """A worker's loop: ask the coordinator for work, compute portions, accrue what it
    commits, push when told to. A replica's partitions follow their lead's replies."""
    replica, partition = topo.role.replica, topo.role.partition
    lead = partition == 0
    coordinator = layout.coordinator_rank
    model, ranges, rows = worker_model(network, topo.replica, plan)
    client = ShardClient(windows, replica, ranges)
    accrued = np.zeros(model.n_params, np.float32)
    factor, fixed_delay = FAULTS.slowdown(replica), FAULTS.portion_delay_s
    die_after_push = FAULTS.pushes_before_death(replica)
    fetched = -1  # the evaluation whose point model.params holds
    loss_acc, nonfinite, committed = 0.0, 0, []
    done, done_evaluation, flushed = None, 0, None  # what the next request reports
    last_loss, last_n = 0.0, 0
    computed, busy = 0, 0.0
    reply = np.zeros(REPLY_FIELDS, np.int64)
    signalled = np.zeros(1, np.int64)  # a stop signal on any partition, shared at flushes
    test_data = None
    with datasets.open_dataset(cfg["data"]["path"]) as dataset:
        while True:
            if lead:
                topo.world.send({"replica": replica, "evaluation": done_evaluation, "done": done,
                                 "flushed": flushed, "signal": bool(signalled[0]) or signals.requested},
                                dest=coordinator, tag=Tag.REQUEST)
                reply[:] = _encode(wait(topo.world.irecv(source=coordinator, tag=Tag.REPLY)))
            if layout.n_partitions > 1:  # point to point: polled nonblocking collectives are slow
                if lead:
                    for other in range(1, layout.n_partitions):
                        topo.replica.Send(reply, dest=other, tag=Tag.REPLY)
                else:
                    Wait(topo.replica.Irecv(reply, source=0, tag=Tag.REPLY))
            stop, discard, commit, flush, index, a, b, evaluation, n, test = (int(v) for v in reply)
            if stop == DISMISSED:  # silent too long: the others took over its portions
                _leave_dismissed(topo)
            if stop:
                break
            if discard:  # the coordinator revoked what this replica holds
                accrued[:] = 0.0
                loss_acc, nonfinite, committed = 0.0, 0, []
            if commit:  # the portion just reported counts: its gradient is in model.grad
                weight = last_n / n
                nonfinite += kernels.axpy_count_nonfinite(weight, model.grad, accrued)
                loss_acc += last_loss * weight
                committed.append(done)
            done, flushed = None, None
            if test:  # the point the shards published, on the test set (replica 0 only)
                client.fetch(model.params)
                fetched = -1
                if test_data is None:
                    test_data = dataset.load("test", rows=rows)
                result = model.evaluate(*test_data, cfg["train"]["eval_batch_size"])
                if lead:
                    topo.world.send(result, dest=coordinator, tag=Tag.RESULT)
                continue
            if flush:
                client.push(accrued, nonfinite)
                client.finish_push()  # in the shards' inboxes before the report says so
                if client.pushes == die_after_push:  # test hook: pushed, never reported
                    os.kill(os.getpid(), signal.SIGKILL)
                if layout.n_partitions > 1:  # every partition's share has landed
                    topo.replica.Allreduce(np.array([int(signals.requested)]), signalled, op=MPI.MAX)
                flushed = {"portions": committed, "loss": loss_acc, "nonfinite": nonfinite}
                accrued[:] = 0.0
                loss_acc, nonfinite, committed = 0.0, 0, []
                continue
            if index < 0:
                continue  # a verdict without work: report and ask again
            if evaluation != fetched:
                client.fetch(model.params)  # once per evaluation
                fetched = evaluation
            t0 = time.perf_counter()
            x, y = dataset.load("train", a, b, rows=rows)
            last_loss = float(model.loss_and_grad(x, y))
            last_n = b - a
            delay = (factor - 1.0) * (time.perf_counter() - t0) + fixed_delay * factor
            if delay > 0:
                time.sleep(delay)
            busy += time.perf_counter() - t0
            computed += 1
            done, done_evaluation = index, evaluation
    client.close()
    return {"kind": "replica", "rank": topo.rank, "replica": replica, "partition": partition,
            "portions_computed": computed, "busy_s": round(busy, 3), "fetches": client.fetches,
            "pushes": client.pushes, "bytes_fetched": client.bytes_fetched,
            "bytes_pushed": client.bytes_pushed, "n_params": model.n_params,
            "slowdown": factor}


# The run ------------------------------------------------------------------------------------
def run(cfg: dict, run_path: Path, comm: MPI.Intracomm = MPI.COMM_WORLD,
        say: Callable[[str], None] = print, resume: str | None = None,
        parameters_only: bool = False) -> dict | None:
    """Train with algorithm = "sandblaster" on every rank of `comm`; the coordinator writes
    the run directory and returns the summary. `resume`: a checkpoint path or "auto";
    `parameters_only`: take only its parameters (a warm start, as `dbmpi train --init`)."""
    from dbmpi.algorithms.downpour import _make_run_directory, _prepare_and_check_data, resolve_resume

    tcfg = cfg["train"]
    network = Network(cfg["model"])
    layout = layout_for(tcfg, network.n_params, coordinator=True)
    plan = PartitionPlan.for_network(network, layout.n_partitions)
    layout.check_world(comm.size)
    root = layout.coordinator_rank
    data_info = agree(comm, lambda: _prepare_and_check_data(cfg, network), AGREED_ERRORS, root=root)
    resumed = agree(comm, lambda: resolve_resume(resume, Path(run_path), network), AGREED_ERRORS, root=root)
    if resumed is not None and parameters_only:
        resumed.update(state={}, parameters_only=True)  # no L-BFGS state: x only
    made: list[RunDirectory] = []
    agree(comm, lambda: made.append(_make_run_directory(cfg, run_path, layout, resume is not None and not parameters_only)),
          AGREED_ERRORS, root=root)
    run_dir = made[0] if made else None
    lead_say = say if comm.rank == root else (lambda _msg: None)
    try:
        topo = Topology(layout, comm)
        with threadpool_limits(limits=tcfg["threads"], user_api="blas"), StopRequest() as stop:
            summary = _run(cfg, network, layout, plan, topo, run_dir, data_info, lead_say,
                           Path(run_path), resumed, stop)
        topo.free()
        return summary
    except DivergedError:  # every rank raises it, after the teardown
        raise
    except BaseException as exc:  # noqa: BLE001 - any failure must not leave peers waiting
        abort_on_error(comm, exc)


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


def _run(cfg, network, layout, plan, topo, run_dir, data_info, say, run_path, resumed, stop):
    tcfg = cfg["train"]
    role = topo.role
    names = vector_names(tcfg["history"])
    records: list[dict] = []
    summary = None
    watch = VitalWatch(topo.world, layout).start()
    if role.is_coordinator:
        say(network.summary())
        say(layout.describe("sgd", plan))
        say(f"run directory: {run_dir.path}")
        summary, gathered = _coordinate(cfg, network, layout, topo, names, run_dir, data_info, say, resumed, stop,
                                        watch)
        summary = _finish(summary, gathered, run_dir, say)
        if summary["failed_replicas"]:
            _leave_after_failure(summary, layout, topo, say)
    else:
        windows = ParameterWindows(topo.window, layout, role.shard if role.is_shard else None)
        if role.is_shard:
            lo, hi = layout.shard_ranges[role.shard]
            checkpoints = ShardCheckpoints(topo.control, list(range(layout.n_shards)), layout.shard_ranges,
                                           network.tensors, run_path / "checkpoints", tcfg["checkpoint_keep"])
            shard = ShardVectors(windows, topo.control, network.params[lo:hi], names, checkpoints, stop)
            if resumed:  # each shard reads only its own range of each vector
                with open_checkpoint(resumed["path"], verify=False) as ckpt:
                    for stored, name in _resumed_vectors(resumed):
                        ckpt.read_range(stored, lo, hi, out=shard.vector(name))
            shard.serve()
            records.append({"kind": "shard", "rank": topo.rank, "shard": role.shard,
                            "commands": shard.commands, "vectors": len(shard.vectors),
                            "checkpoints_written": checkpoints.written})
        else:
            records.append(_replica(cfg, network, layout, plan, topo, windows, stop))
        # Records to the coordinator, point to point; its verdict says how to end.
        topo.world.send({"rank": topo.rank, "records": records}, dest=layout.coordinator_rank, tag=Tag.RECORDS)
        watch.stop()  # the run is over for this rank; the others may leave from here on
        if not wait(topo.world.irecv(source=layout.coordinator_rank, tag=Tag.VERDICT), high=0.05):
            leave(0)  # a replica failed: no collective teardown (it would wait for the dead)
        if role.is_shard:
            shard.close()
        windows.free()
    failure = topo.world.bcast(summary["failure"] if role.is_coordinator else None, root=layout.coordinator_rank)
    if failure is not None:  # the same line on every rank (dbmpi.cli), the last good checkpoint kept
        raise DivergedError(failure)
    return summary


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


def _restore(lbfgs: LBFGS, space: "ShardSpace", resumed: dict, say) -> dict:
    """Continue from a checkpoint the shards have loaded: the L-BFGS scalars, the batch, the
    counters. A changed history size or batching keeps x (and the pairs that fit) and
    re-evaluates f and g; a Downpour checkpoint is a warm start from its parameters."""
    state = resumed["state"]
    saved = state.get("lbfgs")
    if saved is None:
        say(f"warm start from the parameters of {resumed['path']} (it holds no L-BFGS state)")
        lbfgs.start()
        return {"iteration": 0, "elapsed_s": 0.0}
    saved = dict(saved)
    fresh = False
    if int(saved["m"]) != lbfgs.m:
        say(f"history {lbfgs.m} instead of the checkpoint's {saved['m']}: keeping the newest pairs that fit")
        keep = [i for i in saved["slots"] if i < lbfgs.m][-lbfgs.m:]
        saved.update(m=lbfgs.m, slots=keep, rho=[r for i, r in zip(saved["slots"], saved["rho"]) if i in keep])
    lbfgs.load_state(saved)
    if state.get("batches") == [list(b) for b in space.batches]:
        space.batch = int(state["batch"])
    else:
        fresh = True
    space.evaluation = int(state.get("evaluation", 0))
    if fresh:
        say("the batches differ from the checkpoint's: evaluating f and g at x afresh")
        lbfgs.start()
    return {"iteration": lbfgs.iteration, "elapsed_s": float(state.get("elapsed_s", 0.0))}


def _coordinate(cfg, network, layout, topo, names, run_dir, data_info, say, resumed, stop, watch) -> dict:
    tcfg = cfg["train"]
    n_train = data_info["n_train"]
    size = min(tcfg["batch_size"], n_train)
    batches = [(a, min(a + size, n_train)) for a in range(0, n_train, size)]
    space = ShardSpace(topo.control, topo.world, layout, names, batches, tcfg)
    lbfgs = LBFGS(space, m=tcfg["history"], c1=tcfg["wolfe_c1"], c2=tcfg["wolfe_c2"],
                  max_evals=tcfg["max_line_search"])
    budget = tcfg["iterations"] if tcfg["iterations"] is not None else math.inf
    deadline = (time.perf_counter() + tcfg["time_budget_s"]) if tcfg["time_budget_s"] else math.inf
    portions = math.ceil(size / tcfg["portion_size"])
    say(f"sandblaster: {layout.n_replicas} replicas x {layout.n_partitions} partition(s), "
        f"{layout.n_shards} shards; batches of {size} examples ({len(batches)} per pass) in "
        f"{portions} portions of {tcfg['portion_size']}; history {tcfg['history']}, "
        f"backups {'on' if tcfg['backup_tasks'] else 'off'}")
    started = time.perf_counter()
    earlier_s = 0.0  # seconds trained before a resume, so times continue
    failure: list[str] = []  # why the training diverged

    def start() -> float:
        """f and g at x on the current batch; NaN (and a failure) when they are not finite."""
        try:
            return lbfgs.start()
        except NotFinite as exc:
            failure.append(f"iteration {lbfgs.iteration + 1}, batch {space.batch}: {exc}; check the data")
            return math.nan
    if resumed and resumed.get("parameters_only"):
        say(f"initial parameters from {resumed['path']}")
        run_dir.log({"kind": "init", "checkpoint": resumed["path"]})
        loss = start()
    elif resumed:
        say(f"resuming from {resumed['path']} at iteration {resumed['step']}")
        run_dir.log({"kind": "resume", "checkpoint": resumed["path"], "step": resumed["step"]})
        restored = _restore(lbfgs, space, resumed, say)
        earlier_s = restored["elapsed_s"]
        loss = lbfgs.f
    else:
        loss = start()
    seen = 0
    status, iteration = "budget", lbfgs.iteration
    iterations: list[dict] = []
    every, every_s = tcfg["checkpoint_every"], tcfg["checkpoint_every_s"]
    eval_every = configuration.eval_interval(tcfg, len(batches))  # iterations between test evaluations
    last_checkpoint, checkpointed_at = time.perf_counter(), None
    written: list[str] = []
    config_text = configuration.dumps(cfg)

    def elapsed() -> float:
        return earlier_s + time.perf_counter() - started

    def log(record: dict) -> None:
        nonlocal seen
        evals = space.stats_log[seen:]
        seen = len(space.stats_log)
        record.update({
            "kind": "iteration", "time_s": round(elapsed(), 4),
            "portions_by_replica": [sum(e["portions_by_replica"][r] for e in evals)
                                    for r in range(layout.n_replicas)],
            "examples_per_evaluation": [e["examples"] for e in evals],
            "backups_issued": sum(e["backups_issued"] for e in evals),
            "backups_won": sum(e["backups_won"] for e in evals),
            "duplicates_rejected": sum(e["duplicates_rejected"] for e in evals),
            "revoked": sum(e["revoked"] for e in evals),
            "batch_seconds": [round(e["seconds"], 4) for e in evals]})
        iterations.append(record)
        run_dir.log(record)

    def checkpoint(phase: str) -> None:
        nonlocal last_checkpoint, checkpointed_at
        state = lbfgs.state()
        vectors = [("params", X)] + [(f"lbfgs/{name}", name) for name in state["vectors"] if name != X]
        space.checkpoint(vectors, step=lbfgs.iteration, algorithm="sandblaster", config_text=config_text,
                         layout=layout.to_dict(),
                         state={"lbfgs": state, "batch": space.batch, "batches": batches,
                                "evaluation": space.evaluation, "elapsed_s": round(elapsed(), 4),
                                "phase": phase, "iteration": lbfgs.iteration})
        name = checkpoint_name(lbfgs.iteration)
        written.append(name)
        run_dir.log({"kind": "checkpoint", "step": lbfgs.iteration, "file": f"checkpoints/{name}",
                     "phase": phase, "time_s": round(elapsed(), 4)})
        say(f"checkpoint {name} ({phase})")
        last_checkpoint, checkpointed_at = time.perf_counter(), lbfgs.iteration

    log({"iteration": lbfgs.iteration, "loss": loss, "step_length": 0.0, "evaluations": 1,
         "status": "resume" if resumed and not resumed.get("parameters_only") else "start"})
    say(f"[lbfgs] iteration {lbfgs.iteration:>5}  loss {loss:.6f}")
    while not failure and iteration < budget and time.perf_counter() < deadline:
        if len(batches) > 1:  # the next batch: f and g at x on it
            space.batch = (space.batch + 1) % len(batches)
            start()
            if failure:
                break
        record = lbfgs.step(tcfg["tolerance"])
        iteration += 1
        log(dict(record))
        say(f"[lbfgs] iteration {record['iteration']:>5}  loss {record['loss']:.6f}  "
            f"step {record['step_length']:.3g}  evaluations {record['evaluations']}  "
            f"portions {iterations[-1]['portions_by_replica']}  backups {iterations[-1]['backups_won']}"
            f"/{iterations[-1]['backups_issued']}")
        if record.get("status") in ("converged", "stalled"):
            status = record["status"]
            break
        if stop.requested or space.replica_signalled or space.shards_signalled():
            status = "signal"
            say("stop signal: checkpointing and exiting")
            break
        if eval_every and lbfgs.iteration % eval_every == 0:
            test_loss, test_accuracy = space.test(X)
            if not math.isfinite(test_loss):
                failure.append(f"iteration {lbfgs.iteration}: the test loss is {test_loss}")
            run_dir.log({"kind": "eval", "source": "replica 0", "iteration": lbfgs.iteration,
                         "time_s": round(elapsed(), 4), "test_loss": test_loss, "test_accuracy": test_accuracy})
            say(f"[lbfgs] iteration {lbfgs.iteration:>5}  test accuracy {test_accuracy:.4f}")
            if failure:
                break
        if (every and lbfgs.iteration % every == 0) or (every_s and time.perf_counter() - last_checkpoint >= every_s):
            checkpoint("periodic")
    if failure:
        status = "diverged"
        say(f"training diverged: {failure[0]}; no final checkpoint")
    elif checkpointed_at != lbfgs.iteration:
        checkpoint("signal" if status == "signal" else "final")
    # The final iterate on the test set, by the lowest live replica.
    result = dict(zip(("test_loss", "test_accuracy"), space.test(X)))
    space.stop_replicas()
    space.stop_shards()
    gathered = space.records(before_verdict=watch.stop)
    wall = time.perf_counter() - started
    if not failure and not math.isfinite(result["test_loss"]):
        status = "diverged"
        failure.append(f"the final test loss is {result['test_loss']}")
        _set_aside(run_dir.path / "checkpoints" / written[-1])  # --resume auto must not pick it
    summary = {"algorithm": "sandblaster", "layout": layout.to_dict(), "n_partitions": layout.n_partitions,
               "iterations": iteration, "status": status, "final_loss": lbfgs.f,
               "evaluations": space.evaluation, "batch_size": size, "portion_size": tcfg["portion_size"],
               "history": tcfg["history"], "backup_tasks": tcfg["backup_tasks"],
               "weight_decay": tcfg["weight_decay"],  # in final_loss (the objective), not in test_loss
               "backups_issued": sum(r["backups_issued"] for r in iterations),
               "backups_won": sum(r["backups_won"] for r in iterations),
               "wall_time_s": round(wall, 3), "n_params": network.n_params,
               "test_loss": result["test_loss"], "test_accuracy": result["test_accuracy"],
               "checkpoints_written": written, "stopped_by_signal": status == "signal",
               "failed_replicas": sorted(space.silence.failed), "batches_recomputed": space.recomputed,
               "portions_reissued": sum(e["reissued"] for e in space.stats_log),
               "failure": failure[0] if failure else None}
    if resumed and resumed.get("parameters_only"):
        summary["initial_parameters"] = resumed["path"]
    elif resumed:
        summary["resumed_from"] = {"checkpoint": resumed["path"], "step": resumed["step"]}
    return summary, gathered


def _finish(summary, gathered, run_dir, say) -> dict:
    records = [r for per_rank in gathered for r in per_rank]
    for record in records:
        run_dir.log(record)
    run_dir.log({"kind": "eval", "source": "shards", "test_loss": summary["test_loss"],
                 "test_accuracy": summary["test_accuracy"]})
    workers = sorted((r for r in records if r["kind"] == "replica"), key=lambda r: (r["replica"], r["partition"]))
    computed = {r["replica"]: r["portions_computed"] for r in workers if r["partition"] == 0}
    # None for a failed replica (it sent no records)
    summary["portions_computed_by_replica"] = [computed.get(r) for r in range(summary["layout"]["n_replicas"])]
    run_dir.write_json("summary.json", summary)
    run_dir.close()
    say(f"sandblaster: {summary['iterations']} iterations ({summary['status']}), "
        f"{summary['evaluations']} evaluations, final loss {summary['final_loss']:.6f}")
    return summary
