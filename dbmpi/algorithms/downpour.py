"""Downpour SGD: asynchronous model replicas around a sharded parameter server.

A model replica is P worker ranks, one per model partition (P = 1: one rank holds the whole
network; P > 1: dbmpi.model.partitioned, activations exchanged over the replica's
communicator). Each replica reads only its own slice of the training data (each partition
only the input rows it needs), with the next minibatch prepared by a helper thread, and
runs the paper's client loop: every `n_fetch` steps fetch the parameters from
the shards, compute a minibatch gradient, add it to the accrued gradient (and optionally
apply it to its own copy), every `n_push` steps push the accrued gradient. Shards apply the
updates themselves (dbmpi.ps.server). Replica 0 trains alone for `warmstart_steps`
before the others start. A replica stops after its step budget (or epochs over its slice)
or its time budget, pushes what it has accrued, sends its records to shard 0 and marks
itself done; the shards stop once every replica has finished or was declared failed
(dbmpi.runtime.failover: a killed replica does not stop the others). The lead rank (replica 0)
prints progress and logs its records as it goes. Shard 0 writes the final checkpoint (with
the state of the lowest replica that finished), then, once the others are released,
evaluates it (the parameters as the shards hold them at the end) and writes the remaining
records and the summary.

Input is validated identically on every rank before the first collective call, so a bad
config, layout, data file or run directory ends every rank with the same message.
"""
from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
from mpi4py import MPI

from dbmpi import config as configuration
from dbmpi import data as datasets
from dbmpi import kernels
from dbmpi.algorithms.minibatches import Minibatches
from dbmpi.algorithms.optimizers import make_optimizer
from dbmpi.algorithms.run import (  # noqa: F401 - dbmpi.algorithms.sandblaster's
    AGREED_ERRORS,
    RunContext,
    make_run_directory,
    prepare_and_check_data,
    prepare_run,
    resolve_resume,
    run_committed,
    set_aside,
)
from dbmpi.algorithms.sgd import EXIT_DIVERGED, DivergedError
from dbmpi.config import ConfigError
from dbmpi.io.checkpoint import open_checkpoint
from dbmpi.io.rundir import RunDirectory
from dbmpi.model.partitioned import worker_model
from dbmpi.ps.checkpoint import ServingProgress, ShardCheckpoints, SliceLost
from dbmpi.ps.client import ShardClient
from dbmpi.ps.control import DONE_MARK, FAILED_MARK, VERDICT_CLEAN, VERDICT_FAILED, Slot, bucket_label
from dbmpi.ps.shard import Shard
from dbmpi.ps.windows import ParameterWindows
from dbmpi.runtime.comm import Tag, receive, send, stderr_line
from dbmpi.runtime.failover import EXIT_ALL_REPLICAS_FAILED, Liveness, leave
from dbmpi.runtime.faults import FAULTS

# The names dbmpi.algorithms.sandblaster imported from here before dbmpi.algorithms.run existed.
_set_aside, _make_run_directory, _prepare_and_check_data = set_aside, make_run_directory, prepare_and_check_data
MIN_REJECTED = 10  # a replica stops as diverged only after this many withheld pushes


class ShardCheckpointer:
    """Shards' half of a checkpoint: shard 0 writes the file, the other shards stream their
    slices to it in order, one chunk at a time, so no rank holds the whole model. The lead
    asks shard 0 only (its state, then shard 0's CHECKPOINTS counter); shard 0 orders the
    other shards point to point, so a lead dying halfway through asking cannot leave the
    shards disagreeing on which checkpoint they are at.

    Each shard records a snapshot of its slices (a copy: memory for one more slice per
    vector) and keeps applying pushes while the snapshot is written: every wait serves
    (dbmpi.ps.checkpoint.ServingProgress) and keeps the heartbeat going
    (dbmpi.runtime.failover). Each checkpoint leaves a record: the shard's update count at the
    snapshot, the updates applied while it was written, the longest stall of updates and
    the most pushes one update merged meanwhile."""

    def __init__(self, cfg, network, layout, topo, shard: Shard, run_path: Path, liveness: Liveness):
        self.cfg, self.layout, self.topo, self.shard, self.liveness = cfg, layout, topo, shard, liveness
        self.progress = ServingProgress(liveness, shard.apply_pending)
        self.files = ShardCheckpoints(topo.world, layout.shard_ranks, layout.shard_ranges, network.tensors,
                                      run_path / "checkpoints", cfg["train"]["checkpoint_keep"], self.progress)
        self.last: Path | None = None  # the newest checkpoint this shard 0 wrote
        self.records: list[dict] = []  # one per checkpoint this shard took part in

    @property
    def written(self) -> list[str]:
        return self.files.written

    def _take(self, step: int, write: Callable[[list, int], None]) -> None:
        """Snapshot this shard's slices, then `write(snapshot, version)` while serving."""
        began, shard = time.perf_counter(), self.shard
        self.progress.begin()
        shard.max_merged_since = 0
        version = shard.version()
        write(shard.snapshot(), version)
        self.progress.serve_now()  # closes the stall measurement
        self.records.append({"step": step, "version": version, "updates_during": shard.version() - version,
                             "stall_s": round(self.progress.stall_s, 4),
                             "duration_s": round(time.perf_counter() - began, 4),
                             "max_merged_during": shard.max_merged_since})

    def _stream(self, vectors, version: int) -> None:
        """Shards but 0: send this shard's snapshot to shard 0."""
        self.files.write(vectors, version=version)

    def obey(self) -> None:
        """Shards but 0, while serving: stream a snapshot for every order shard 0 gave."""
        while self.topo.world.iprobe(source=self.layout.shard_rank(0), tag=Tag.CKPT_ORDER):
            step = receive(self.topo.world, self.layout.shard_rank(0), Tag.CKPT_ORDER, self.progress.wait)
            self._take(step, self._stream)

    def last_order(self) -> bool:
        """Shards but 0, after serving: obey orders until the last one; True if it asks for
        a final checkpoint (then streamed)."""
        shard0, got = self.layout.shard_rank(0), []

        def last() -> bool:
            self.obey()
            if self.topo.world.iprobe(source=shard0, tag=Tag.CKPT_LAST):
                got.append(receive(self.topo.world, shard0, Tag.CKPT_LAST, self.liveness.wait))
            return bool(got)

        self.liveness.wait(last)
        if got[0] is not False:
            self._take(got[0], self._stream)
        return got[0] is not False

    def __call__(self, state: dict | None = None) -> None:
        """Shard 0: one checkpoint, written with `state` (the final one: the other shards
        had their last order), or, for a periodic one, with the state the acting lead sent
        (Tag.CKPT_STATE) before it asked; the other shards are ordered to stream."""
        world = self.topo.world
        if state is None:
            state = receive(world, MPI.ANY_SOURCE, Tag.CKPT_STATE, self.progress.wait)
            for k in range(1, self.layout.n_shards):
                send(world, state["step"], self.layout.shard_rank(k), Tag.CKPT_ORDER, self.progress.wait)

        def write(vectors, version) -> None:
            try:
                self.last = self.files.write(vectors, step=state["step"], algorithm="downpour",
                                             config_text=configuration.dumps(self.cfg),
                                             layout=self.layout.to_dict(), state=state, version=version)
            except SliceLost as lost:  # e.g. the sender died mid-transfer
                self.liveness.shard_lost(lost.shard, lost.what)

        self._take(state["step"], write)
        self.records[-1]["file"] = self.last.name if self.last is not None else None
        self.records[-1]["time"] = time.time()


class FinalMessages:
    """Shard 0's receipt of the workers' FINAL messages (records and state) while it
    serves: a worker marks itself done only once its message is delivered, so the message of
    every done worker is here by the end, and one from a worker that dies meanwhile (counted
    failed) is left aside."""

    def __init__(self, comm: MPI.Intracomm):
        self.comm = comm
        self.pending: dict[int, MPI.Request] = {}
        self.received: dict[int, dict] = {}

    def poll(self) -> None:
        while True:
            status = MPI.Status()
            message = self.comm.improbe(source=MPI.ANY_SOURCE, tag=Tag.FINAL, status=status)
            if message is None:
                break
            self.pending[status.Get_source()] = message.irecv()
        for source, request in list(self.pending.items()):
            try:
                done, obj = request.test()
            except MPI.Exception:  # the worker died mid-transfer: its heartbeat stops too
                del self.pending[source]
                continue
            if done:
                self.received[source] = obj
                del self.pending[source]

    def of(self, workers, liveness: Liveness) -> dict[int, dict]:
        """The messages of `workers` (all done: delivered before they marked themselves)."""
        def complete() -> bool:
            self.poll()
            return all(w in self.received for w in workers)

        liveness.wait(complete)
        return {w: self.received[w] for w in workers}


def run(cfg: dict, run_path: Path, comm: MPI.Intracomm = MPI.COMM_WORLD,
        say: Callable[[str], None] = print, resume: str | None = None) -> dict | None:
    """Train with algorithm = "downpour" on every rank of `comm`; shard 0 returns the summary."""

    def enough_examples(data_info: dict) -> None:
        if cfg["train"]["n_replicas"] > data_info["n_train"]:
            raise ConfigError(f"train.n_replicas: {cfg['train']['n_replicas']} replicas for only "
                              f"{data_info['n_train']} training examples")

    return run_committed(prepare_run(cfg, run_path, comm, say, resume, check=enough_examples), _run_context)


def _run_context(ctx: RunContext) -> dict | None:
    """The committed run (every rank): the lead's run directory's start time is everyone's."""
    run_started = ctx.comm.bcast(ctx.run_dir.started if ctx.run_dir is not None else None, root=0)
    # Shard 0 writes the final records and summary (the lead may be the replica that failed).
    writer_say = ctx.speaker(ctx.layout.shard_rank(0))
    return _run(ctx.cfg, ctx.network, ctx.layout, ctx.plan, ctx.topo, ctx.run_dir, ctx.say, ctx.run_path,
                ctx.resumed, ctx.stop, writer_say, run_started)


def _run(cfg, network, layout, plan, topo, run_dir, say, run_path, resumed, stop, writer_say, run_started):
    tcfg = cfg["train"]
    role = topo.role
    if topo.is_lead:
        say(network.summary())
        if resumed:
            say(f"resuming from {resumed['path']} at step {resumed['step']}")
            run_dir.log({"kind": "resume", "checkpoint": resumed["path"], "step": resumed["step"]})
        say(layout.describe(tcfg["optimizer"], plan))
        if layout.n_partitions > 1:
            say(plan.describe(tcfg["batch_size"]))
        say(f"run directory: {run_dir.path}")
    windows = ParameterWindows(topo.window, layout, role.shard if role.is_shard else None)
    windows.lock_shards()
    liveness = Liveness(windows, layout, topo.world, tcfg["replica_timeout_s"], role)
    if role.is_worker:  # before the heartbeats start: loading may take long
        data = _load_replica_data(cfg, network, layout, plan, topo)
        topo.world.Barrier()
        liveness.start()
        with liveness.partition_errors():  # a dead partition: this replica leaves, not the job
            client = _replica(cfg, network, layout, topo, windows, run_dir, say, resumed, stop, liveness, data)
        _end(topo, windows, liveness, client.close)
        return None
    lo, hi = layout.shard_ranges[role.shard]
    initial = network.params[lo:hi]
    optimizer = make_optimizer(tcfg, hi - lo)
    if resumed:  # each shard reads only its own range of every vector
        with open_checkpoint(resumed["path"], verify=False) as ckpt:
            initial = ckpt.read_range("params", lo, hi)
            for key, value in optimizer.state.items():
                if f"{optimizer.name}/{key}" in resumed["vectors"]:
                    ckpt.read_range(f"{optimizer.name}/{key}", lo, hi, out=value)
    shard = Shard(windows, role.shard, initial, optimizer)
    checkpointer = ShardCheckpointer(cfg, network, layout, topo, shard, run_path, liveness)
    topo.world.Barrier()  # every shard has published its initial slice
    liveness.start()
    if role.shard == 0:
        return _shard0_end(cfg, network, layout, topo, windows, shard, checkpointer, liveness, stop,
                           run_path, writer_say, run_started)
    def tick() -> None:
        liveness.beat()
        checkpointer.obey()

    stats = shard.serve(None, stop, tick=tick)
    checkpointer.last_order()  # the final checkpoint, unless no replica survived to give it a state
    send(topo.world, {"records": [_shard_record(topo, stats, checkpointer)]}, layout.shard_rank(0), Tag.FINAL,
         liveness.wait)
    _end(topo, windows, liveness, shard.close)
    return None


def _shard_record(topo, stats, checkpointer) -> dict:
    return {"kind": "shard", "rank": topo.rank, "shard": topo.role.shard,
            "updates": stats.updates, "pushes": stats.pushes, "drains": stats.drains,
            "dropped": stats.dropped, "rejected": stats.rejected,
            "staleness_histogram": {bucket_label(b): n for b, n in enumerate(stats.staleness_histogram) if n},
            "pushes_by_replica": stats.pushes_by_replica, "first_push_after": stats.first_push_after,
            "workers_failed": stats.workers_failed,
            "busy_s": round(stats.busy_s, 3), "wall_s": round(stats.wall_s, 3),
            "merged_histogram": {bucket_label(b): n for b, n in enumerate(stats.merged_histogram) if n},
            "max_merged": stats.max_merged,
            "checkpoints_written": checkpointer.written, "checkpoints": checkpointer.records}


def _verdict(windows, layout, liveness: Liveness) -> int:
    """Wait for shard 0 to say how the run ends (everything is in the final checkpoint)."""
    shard0, seen = layout.shard_rank(0), []

    def decided() -> bool:
        seen.append(windows.block.read(shard0, Slot.VERDICT))
        return seen[-1] != 0

    liveness.wait(decided, high=0.02)
    return seen[-1]


def _end(topo, windows, liveness: Liveness, close) -> None:
    """Every rank but shard 0, once its part is done: without failures, the collective
    teardown; after one, tell shard 0 and leave without collectives."""
    verdict = _verdict(windows, topo.layout, liveness)
    diverged = receive(topo.world, topo.layout.shard_rank(0), Tag.OUTCOME, liveness.wait)
    liveness.stop()
    if verdict == VERDICT_FAILED:
        windows.block.add(topo.layout.shard_rank(0), Slot.RELEASED)
        if diverged is not None:
            _end_diverged(diverged, leaving=True)
        leave(0)
    close()
    windows.free()
    liveness.close()
    if diverged is not None:
        _end_diverged(diverged, leaving=False)


def _shard0_end(cfg, network, layout, topo, windows, shard, checkpointer, liveness, stop, run_path, say,
                run_started) -> dict | None:
    """Shard 0 serves, then writes the final checkpoint with the state of the lowest replica
    that finished and collects every rank's records (point to point: a collective would wait
    for a dead rank forever). Then it gives the verdict, lets the others go, and evaluates
    the final checkpoint and writes metrics and summary on its own."""
    world = topo.world
    messages = FinalMessages(world)

    def tick() -> None:
        liveness.beat()
        messages.poll()

    stats = shard.serve(checkpointer, stop, tick=tick)
    # Everyone is counted finished or failed now; the finished workers' messages are in.
    finals = messages.of(sorted(liveness.done_workers), liveness)
    states = sorted((layout.role(w).replica, msg["state"]) for w, msg in finals.items()
                    if msg["state"] is not None)
    failed = liveness.failed_replicas()
    records = [r for w in sorted(finals) for r in finals[w]["records"]]
    diverged = _divergence(records, cfg["train"])
    go = bool(states) and diverged is None  # a diverged run keeps its last good checkpoint
    for k in range(1, layout.n_shards):  # the final checkpoint's step, or False: none
        send(world, states[0][1]["step"] if go else False, layout.shard_rank(k), Tag.CKPT_LAST, liveness.wait)
    final_path = None
    if go:
        state = dict(states[0][1], lead_replica=states[0][0], failed_replicas=failed)
        checkpointer(state)  # the final checkpoint
        final_path = checkpointer.last
    records.append(_shard_record(topo, stats, checkpointer))
    for k in range(1, layout.n_shards):
        records.extend(receive(world, layout.shard_rank(k), Tag.FINAL, liveness.wait)["records"])
    records.extend(liveness.events)
    liveness.beat(force=True)  # the others wait for the verdict: the evaluation must take less than the timeout
    with liveness.busy():
        test = _evaluate_final(cfg, network, final_path)
    if test[0] is not None and not math.isfinite(test[0]):
        diverged = f"the final test loss is {test[0]}; lower train.learning_rate"
        final_path = _set_aside(final_path)
    told = _tell_outcome(world, layout, liveness, diverged)
    liveness.stop()
    if not failed:
        windows.block.add(topo.rank, Slot.VERDICT, VERDICT_CLEAN)
        liveness.wait(told)
        shard.close()
        windows.free()
    else:  # no collective: wait (bounded) until the others have read the verdict
        windows.block.add(topo.rank, Slot.VERDICT, VERDICT_FAILED)
        expected = len(liveness.done_workers) + layout.n_shards - 1
        liveness.wait(lambda: told() and windows.block.read(topo.rank, Slot.RELEASED) >= expected,
                      limit_s=liveness.timeout)
    liveness.close()
    summary = _finish(cfg, network, layout, final_path, records, failed, run_path, run_started, say, test, diverged)
    if diverged is not None:
        _end_diverged(diverged, leaving=bool(failed))
    if not failed:
        return summary
    if final_path is None:
        say(f"every replica failed; nothing to finish (summary in {run_path / 'summary.json'})")
        leave(EXIT_ALL_REPLICAS_FAILED)
    say(f"final test accuracy {summary['test_accuracy']:.4f} on the shards' parameters "
        f"({summary['wall_time_s']:.1f} s) without failed replica(s) {failed}; summary in "
        f"{run_path / 'summary.json'}")
    leave(0)


def _tell_outcome(world, layout, liveness: Liveness, diverged: str | None) -> Callable[[], bool]:
    """Shard 0: send `diverged` (None: it did not) to every rank that reads the verdict, so
    each ends the same way; returns a test that the sends are done (a reader that died
    meanwhile counts as told)."""
    readers = sorted(liveness.done_workers) + list(layout.shard_ranks[1:])
    requests = [world.isend(diverged, dest=rank, tag=Tag.OUTCOME) for rank in readers]

    def told() -> bool:
        try:
            return MPI.Request.Testall(requests)
        except MPI.Exception:
            return True
    return told


def _load_replica_data(cfg, network, layout, plan, topo) -> dict:
    """A worker's model block and data: its replica's slice of the training set (only the
    input rows its partition needs), and for replica 0 the test set."""
    replica = topo.role.replica
    model, ranges, rows = worker_model(network, topo.replica, plan)
    with datasets.open_dataset(cfg["data"]["path"]) as dataset:
        start, stop = dataset.shard_range("train", replica, layout.n_replicas)
        x, y = dataset.load("train", start, stop, rows=rows)
        test = dataset.load("test", rows=rows) if replica == 0 else None
    return {"model": model, "ranges": ranges, "rows": rows, "x": x, "y": y, "test": test}


def _replica(cfg, network, layout, topo, windows, run_dir, say, resumed, stop_request, liveness: Liveness,
             data: dict) -> ShardClient:
    """A worker's run: train, then hand its records to shard 0 and count itself finished.
    Returns the client (its epochs are closed in the teardown)."""
    tcfg = cfg["train"]
    replica, n_replicas = topo.role.replica, layout.n_replicas
    partition, n_partitions = topo.role.partition, layout.n_partitions
    model, ranges, rows, x, y, test = (data[k] for k in ("model", "ranges", "rows", "x", "y", "test"))
    batch = min(tcfg["batch_size"], len(x))
    steps_per_epoch = max(1, len(x) // batch)
    if tcfg["steps"] is not None:
        budget = tcfg["steps"]
    elif tcfg["epochs"] is not None:
        budget = max(1, round(tcfg["epochs"] * steps_per_epoch))
    else:
        budget = math.inf
    deadline = time.perf_counter() + tcfg["time_budget_s"] if tcfg["time_budget_s"] else math.inf
    n_fetch, n_push = tcfg["n_fetch"], tcfg["n_push"]
    local_lr = tcfg["local_learning_rate"]
    warmstart = tcfg["warmstart_steps"] if n_replicas > 1 else 0
    log_every = tcfg["log_every"]
    # Replica 0 evaluates its copy as it goes; with partitions, all of them take part.
    eval_every = configuration.eval_interval(tcfg, steps_per_epoch) if replica == 0 else None

    backlog = tcfg["max_push_backlog"] or 2 * layout.n_workers
    client = ShardClient(windows, replica, ranges, max_backlog=backlog,
                         wait=lambda done: liveness.wait(done, high=2e-3))
    first_step = resumed["step"] if resumed else 0
    # Every partition of a replica shuffles with the replica's seed (and, resumed, the step
    # it resumes at): the same examples.
    batches = Minibatches(x, y, batch, tcfg["seed"] + 7919 * replica + 104729 * first_step)
    checkpoint_every = tcfg["checkpoint_every"]
    checkpoint_every_s = tcfg["checkpoint_every_s"]
    last_checkpoint = time.perf_counter()
    accrued = [np.zeros(model.n_params, np.float32), np.zeros(model.n_params, np.float32)]
    current = 0
    records: list[dict] = []
    if topo.is_lead:
        say(f"downpour: {n_replicas} replicas x {n_partitions} partition(s), {len(x)} examples "
            f"each, batch {batch}, budget {budget} steps per replica, n_fetch {n_fetch}, "
            f"n_push {n_push}, warmstart {warmstart} steps, shard optimizer {tcfg['optimizer']} "
            f"lr {tcfg['learning_rate']}")

    # A replica's partitions step in lockstep (every step is collective over them), so they
    # fetch and push together; only a time budget or a stop signal could split them, so
    # the verdict is shared. A stop signal on any rank reaches every worker through shard 0.
    stop_flag = np.zeros(1, np.int32)
    shard0 = layout.shard_rank(0)
    signalled = {"relayed": False, "seen": False}

    def stop_requested() -> bool:
        if stop_request is None:
            return False
        if stop_request.requested and not signalled["relayed"]:
            windows.block.add(shard0, Slot.STOPS)
            signalled["relayed"] = True
        if not signalled["seen"]:
            signalled["seen"] = windows.block.read(shard0, Slot.STOPS) > 0
        return signalled["seen"]

    def keep_going(step: int, last: float) -> bool:
        if step >= last:
            return False
        stop_flag[0] = time.perf_counter() >= deadline or stop_requested() or diverging()
        if n_partitions > 1:
            topo.replica.Allreduce(MPI.IN_PLACE, stop_flag, op=MPI.MAX)
        return not stop_flag[0]

    nonfinite = 0  # NaN/Inf entries in the accrued gradient
    max_rejected = tcfg["max_rejected_fraction"]
    rejected_then = 0  # client.rejected at the last periodic checkpoint

    def diverging() -> bool:
        """This worker's pushes were mostly withheld as non-finite: stop (shard 0 fails the run)."""
        rejected = client.rejected
        return rejected >= MIN_REJECTED and rejected > max_rejected * (client.pushes + rejected)

    fail_at = FAULTS.fail_step(topo.rank)

    def checkpoint_state(step: int, phase: str) -> dict:
        """The state a checkpoint records, as this replica sees it."""
        return {"step": step, "phase": phase, "seed": tcfg["seed"], "n_replicas": n_replicas,
                "replica": replica, "replica_examples": int(x.shape[0]),
                "elapsed_s": round(time.perf_counter() - started, 3),
                "data_order": "each replica shuffles its slice with seed + 7919 * replica + 104729 * step"}

    def acting_lead() -> bool:
        """Replica 0's first partition asks for periodic checkpoints; if replica 0 failed,
        the lowest replica that did not."""
        if partition != 0:
            return False
        return all(liveness.replica_failed(r) for r in range(replica))

    def request_checkpoint(step: int, phase: str) -> None:
        """Give shard 0 the state, then ask it for a checkpoint (it orders the others)."""
        topo.world.send(checkpoint_state(step, phase), dest=shard0, tag=Tag.CKPT_STATE)
        windows.block.add(shard0, Slot.CHECKPOINTS)

    def train_steps(first: int, count: float, phase: str) -> int:
        nonlocal current, nonfinite, last_checkpoint, rejected_then
        step = first
        window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
        staleness_seen = len(client.staleness)
        while keep_going(step, first + count):
            liveness.beat()
            if step == fail_at:
                raise RuntimeError(f"failure injected at step {step} (DBMPI_FAIL_AT)")
            if step % n_fetch == 0:
                client.fetch(model.params)
            xb, yb = batches.next()
            loss = model.loss_and_grad(xb, yb)
            nonfinite += kernels.axpy_count_nonfinite(1.0, model.grad, accrued[current])
            if local_lr:
                kernels.sgd_step(model.params, model.grad, local_lr)
            step += 1
            if step % n_push == 0:
                client.push(accrued[current], nonfinite)
                current ^= 1
                accrued[current][:] = 0.0  # its push completed when this one started
                nonfinite = 0
            window_loss += loss
            window_steps += 1
            if ((checkpoint_every and step % checkpoint_every == 0) or
                    (checkpoint_every_s and time.perf_counter() - last_checkpoint >= checkpoint_every_s)) \
                    and acting_lead():
                if client.rejected == rejected_then:  # no checkpoint of a diverging run
                    request_checkpoint(step, phase)
                else:
                    say(f"[{phase}] step {step:>7}  no checkpoint: {client.rejected - rejected_then} "
                        f"non-finite push(es) withheld since the last one")
                rejected_then = client.rejected
                last_checkpoint = time.perf_counter()
            if step % log_every == 0:
                now = time.perf_counter()
                recent = client.staleness[staleness_seen:]
                staleness_seen = len(client.staleness)
                record = {"kind": "train", "rank": topo.rank, "replica": replica,
                          "partition": partition, "phase": phase,
                          "elapsed_s": round(now - started, 4),
                          "step": step, "epoch": round(step / steps_per_epoch, 4),
                          "loss": window_loss / window_steps,
                          "samples_per_s": round(window_steps * batch / max(now - window_start, 1e-9), 1),
                          "staleness": (sum(recent) / len(recent)) if recent else None,
                          "pushes": client.pushes, "rejected": client.rejected}
                if topo.is_lead:
                    record["shard_updates"] = client.shard_versions()
                    run_dir.log(record)
                    say(f"[{phase}] step {step:>7}  loss {record['loss']:.4f}  "
                        f"{record['samples_per_s']:8.0f} samples/s (replica 0)  "
                        f"shard updates {sum(record['shard_updates'])}  "
                        f"staleness {record['staleness'] if record['staleness'] is None else round(record['staleness'], 2)}")
                else:
                    records.append(record)
                window_loss, window_steps, window_start = 0.0, 0, now
            if eval_every and step % eval_every == 0:
                liveness.beat(force=True)  # the evaluation must take less than the timeout
                with liveness.busy(alone=n_partitions == 1):
                    test_loss, test_acc = model.evaluate(test[0], test[1], tcfg["eval_batch_size"])
                if topo.is_lead:
                    record = {"kind": "eval", "source": "replica 0", "step": step,
                              "test_loss": test_loss, "test_accuracy": test_acc}
                    run_dir.log(record)
                    say(f"[{phase}] step {step:>7}  test accuracy {test_acc:.4f} (replica 0's copy)")
        return step

    started = time.perf_counter()
    step = first_step
    if warmstart and not resumed:
        if replica == 0:
            step = train_steps(0, warmstart, "warmstart")
            client.finish_push()  # warmstart's last push is counted before the others start
            if partition == 0:
                windows.block.add(shard0, Slot.WARMED)
            say(f"warmstart done after {step} steps; starting {n_replicas - 1} more replicas")
        else:  # wait (politely) for replica 0's warmstart, or for replica 0 to fail

            def released() -> bool:
                stop_requested()  # relays a signal that arrives while waiting
                return windows.block.read(shard0, Slot.WARMED) > 0 or liveness.replica_failed(0)

            liveness.wait(released, low=1e-3, high=1e-2)
    step = train_steps(step, max(0, budget - first_step), "downpour")
    if step % n_push != 0:  # push what was accrued since the last push
        client.push(accrued[current], nonfinite)
    client.finish_push()
    phase = "signal" if signalled["seen"] else "end"
    if topo.is_lead and signalled["seen"]:
        say(f"stop signal: checkpointing at step {step} and exiting")
    elapsed = time.perf_counter() - started
    batches.close()
    staleness = client.staleness
    records.append({"kind": "replica", "rank": topo.rank, "replica": replica, "partition": partition,
                    "steps": step, "wall_s": round(elapsed, 3),
                    "samples_per_s": round(step * batch / max(elapsed, 1e-9), 1),
                    "fetches": client.fetches, "pushes": client.pushes, "rejected": client.rejected,
                    "backlog_waits": client.backlog_waits,
                    "n_params": model.n_params, "shards": client.shards,
                    "input_rows": list(rows) if rows is not None else [0, network.input_shape[0]],
                    "bytes_fetched": client.bytes_fetched, "bytes_pushed": client.bytes_pushed,
                    "activation_bytes_sent": getattr(model, "bytes_sent", 0),
                    "activation_bytes_received": getattr(model, "bytes_received", 0),
                    "mean_staleness": (sum(staleness) / len(staleness)) if staleness else None,
                    "examples": int(x.shape[0]), "batch": batch,
                    "stopped_by_signal": signalled["seen"], "diverged": diverging()})
    if topo.is_lead:
        run_dir.close()  # shard 0 appends the rest
    # The records (and, from a replica's first partition, the state for the final
    # checkpoint) go to shard 0; once they are delivered (and every push was flushed and
    # counted before), the DONE mark counts this worker finished.
    final = {"records": records, "state": checkpoint_state(step, phase) if partition == 0 else None}
    send(topo.world, final, shard0, Tag.FINAL, liveness.wait)
    old = windows.block.add(shard0, windows.block.heartbeat(topo.rank), DONE_MARK)
    if old & FAILED_MARK:  # declared failed meanwhile: shard 0 no longer counts this worker
        liveness.leave_released()
    return client


def _evaluate_final(cfg, network, final_path) -> tuple:
    """On shard 0: test loss and accuracy of the final checkpoint's parameters (the shards'
    parameters at the end); (None, None) without one."""
    if final_path is None:
        return None, None
    with open_checkpoint(final_path, verify=False) as ckpt:
        ckpt.read_range("params", 0, network.n_params, out=network.params)
    with datasets.open_dataset(cfg["data"]["path"]) as dataset:
        test_x, test_y = dataset.load("test")
    return network.evaluate(test_x, test_y, cfg["train"]["eval_batch_size"])


def _divergence(records: list[dict], tcfg: dict) -> str | None:
    """Why the training diverged, from the workers' records (None if it did not): more than
    train.max_rejected_fraction of the pushes withheld as non-finite, or a replica stopped
    because its own pushes were."""
    workers = [r for r in records if r["kind"] == "replica"]
    rejected = sum(r["rejected"] for r in workers)
    attempted = rejected + sum(r["pushes"] for r in workers)
    limit = tcfg["max_rejected_fraction"]
    stopped = sorted({r["replica"] for r in workers if r.get("diverged")})
    if not stopped and rejected <= limit * attempted:
        return None
    return (f"{rejected} of {attempted} pushes were withheld as non-finite (train.max_rejected_fraction = "
            f"{limit:g})" + (f"; replica(s) {stopped} stopped early" if stopped else "")
            + "; lower train.learning_rate or check the data")


def _end_diverged(message: str, leaving: bool) -> None:
    """Every rank of a diverged run ends with the same line: with a failed replica (no
    collectives) it leaves now, else the command line prints it after the teardown."""
    if leaving:
        stderr_line(f"dbmpi: error: training diverged: {message}")
        leave(EXIT_DIVERGED)
    raise DivergedError(message)


def _finish(cfg, network, layout, final_path, records, failed, run_path, run_started, say,
            test=(None, None), diverged: str | None = None) -> dict:
    """On shard 0: append every record to metrics.jsonl and write summary.json (`test`: the
    final checkpoint's test loss and accuracy; `diverged`: why the training failed)."""
    tcfg = cfg["train"]
    test_loss, test_acc = test
    metrics = Path(run_path) / "metrics.jsonl"
    if metrics.exists() and metrics.stat().st_size:
        with open(metrics, "rb") as f:  # a writer killed mid-line must not swallow ours
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                with open(metrics, "ab") as g:
                    g.write(b"\n")
    run_dir = RunDirectory(run_path, resume=True)
    if run_started is not None:
        run_dir.started = run_started  # one time axis with the lead's records
    for record in records:
        run_dir.log(record)
    shards = sorted((r for r in records if r["kind"] == "shard"), key=lambda r: r["shard"])
    checkpoints = checkpoint_records(shards, run_dir.started)
    for record in checkpoints:
        run_dir.log(record)
    if final_path is not None:
        run_dir.log({"kind": "eval", "source": "shards", "checkpoint": final_path.name,
                     "test_loss": test_loss, "test_accuracy": test_acc})
    workers = sorted((r for r in records if r["kind"] == "replica"), key=lambda r: (r["replica"], r["partition"]))
    replicas = {r["replica"]: r for r in workers if r["partition"] == 0}
    finished = [replicas[k] for k in sorted(replicas) if k not in failed]
    wall = max((r["wall_s"] for r in replicas.values()), default=0.0)
    summary = {
        "algorithm": "downpour", "optimizer": tcfg["optimizer"], "layout": layout.to_dict(),
        "n_fetch": tcfg["n_fetch"], "n_push": tcfg["n_push"], "warmstart_steps": tcfg["warmstart_steps"],
        "steps_by_replica": [replicas[k]["steps"] if k in replicas and k not in failed else None
                             for k in range(layout.n_replicas)],
        "n_partitions": layout.n_partitions,
        "samples_per_s": round(sum(r["steps"] * r["batch"] for r in finished) / wall, 1) if wall else 0.0,
        "bytes_fetched_by_worker": [r["bytes_fetched"] for r in workers],
        "wall_time_s": wall,
        "updates_by_shard": [s["updates"] for s in shards],
        "pushes_rejected": sum(r["rejected"] for r in workers),
        "stopped_by_signal": any(r.get("stopped_by_signal") for r in workers),
        "drains_dropped": sum(s["dropped"] for s in shards),
        "merged_histogram": dict(sum((Counter(s["merged_histogram"]) for s in shards), Counter())),
        "max_merged_pushes": max((s["max_merged"] for s in shards), default=0),
        "checkpoints": len(checkpoints),
        "checkpoint_stall_s_max": max((max(c["stall_s_by_shard"]) for c in checkpoints), default=0.0),
        "mean_staleness": _mean([r["mean_staleness"] for r in workers if r["mean_staleness"] is not None]),
        "failed_replicas": failed,
        "final_checkpoint": final_path.name if final_path is not None else None,
        "test_loss": test_loss, "test_accuracy": test_acc, "n_params": network.n_params,
        "status": "diverged" if diverged else "finished", "failure": diverged,
    }
    run_dir.write_json("summary.json", summary)
    run_dir.close()
    say(f"shards applied {summary['updates_by_shard']} updates; replicas ran {summary['steps_by_replica']} "
        f"steps; {summary['pushes_rejected']} pushes rejected, {summary['drains_dropped']} drains dropped"
        + (f"; replica(s) {failed} failed" if failed else ""))
    say(f"one update merged at most {summary['max_merged_pushes']} pushes"
        + (f"; {len(checkpoints)} checkpoint(s) stalled updates at most "
           f"{1e3 * summary['checkpoint_stall_s_max']:.1f} ms" if checkpoints else ""))
    return summary


def checkpoint_records(shards: list[dict], started: float) -> list[dict]:
    """One `checkpoint` record per checkpoint, from the shards' own records (sorted by
    shard): its file and step, the shards' update counts at their snapshots, and per shard
    how long updates stalled, how many were applied while it was written and the most
    pushes one of them merged."""
    if not shards:
        return []
    records = []
    for i, head in enumerate(shards[0]["checkpoints"]):
        mine = [s["checkpoints"][i] if i < len(s["checkpoints"]) else {} for s in shards]
        records.append({"kind": "checkpoint", "time": round(head["time"] - started, 4), "step": head["step"],
                        "file": head.get("file"), "duration_s": head["duration_s"],
                        "shard_versions": [c.get("version") for c in mine],
                        "stall_s_by_shard": [c.get("stall_s", 0.0) for c in mine],
                        "updates_during_by_shard": [c.get("updates_during") for c in mine],
                        "max_merged_during_by_shard": [c.get("max_merged_during") for c in mine]})
    return records


def _mean(values):
    return sum(values) / len(values) if values else None
