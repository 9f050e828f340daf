"""Downpour SGD: asynchronous model replicas around a sharded parameter server.

A model replica is P worker ranks, one per model partition (P = 1: one rank holds the whole
network; P > 1: dbmpi.model.partitioned, activations exchanged over the replica's
communicator). Each replica reads only its own slice of the training data (each partition
only the input rows it needs), with the next minibatch prepared by a helper thread, and
runs the paper's client loop: every `n_fetch` steps fetch the parameters from
the shards, compute a minibatch gradient, add it to the accrued gradient (and optionally
apply it to its own copy), every `n_push` steps push the accrued gradient (that loop:
dbmpi.algorithms.replica.ReplicaLoop, MPI-free). Shards apply the updates themselves
(dbmpi.ps.shard). Replica 0 trains alone for `warmstart_steps`
before the others start. A replica stops after its step budget (or epochs over its slice)
or its time budget, pushes what it has accrued, sends its records to shard 0 and marks
itself done; the shards stop once every replica has finished or was declared failed
(dbmpi.runtime.failover: a killed replica does not stop the others). The lead rank (replica 0)
prints progress and logs its records as it goes. Shard 0 writes the final checkpoint (with
the state of the lowest replica that finished), then, once the others are released,
evaluates it (the parameters as the shards hold them at the end) and writes the remaining
records and the summary.

Input is validated identically on every rank before the first collective call, so a bad
config, layout, data file or run directory ends every rank with the same message
(dbmpi.algorithms.run). The messages and control-block slots of the run's protocol are
dbmpi.runtime.runcontrol's.
"""
from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from dbmpi import data as datasets
from dbmpi.algorithms.optimizers import make_optimizer
from dbmpi.algorithms.replica import ReplicaData, ReplicaLoop, Seat, mean
from dbmpi.algorithms.run import RunContext, prepare_run, run_committed, set_aside
from dbmpi.algorithms.sgd import EXIT_DIVERGED, DivergedError
from dbmpi.config import ConfigError
from dbmpi.io.checkpoint import open_checkpoint
from dbmpi.io.rundir import RunDirectory
from dbmpi.model.partitioned import worker_model
from dbmpi.ps.checkpoint import ShardCheckpointer
from dbmpi.ps.client import ShardClient
from dbmpi.ps.control import N_BUCKETS, VERDICT_CLEAN, VERDICT_FAILED, bucket_label
from dbmpi.ps.shard import Shard
from dbmpi.ps.windows import ParameterWindows
from dbmpi.runtime.batchshare import BatchShare
from dbmpi.runtime.comm import Comm, Tag, receive, send, stderr_line, world_comm
from dbmpi.runtime.failover import EXIT_ALL_REPLICAS_FAILED, Liveness, leave
from dbmpi.runtime.faults import FAULTS
from dbmpi.runtime.runcontrol import (
    FinalMessages,
    ReplicaControl,
    count_released,
    give_verdict,
    read_verdict,
    released,
    tell_outcome,
)


def run(cfg: dict, run_path: Path, comm: Comm | None = None,
        say: Callable[[str], None] = print, resume: str | None = None) -> dict | None:
    """Train with algorithm = "downpour" on every rank of `comm` (default: the world); shard 0
    returns the summary."""

    def enough_examples(data_info: dict) -> None:
        if cfg["train"]["n_replicas"] > data_info["n_train"]:
            raise ConfigError(f"train.n_replicas: {cfg['train']['n_replicas']} replicas for only "
                              f"{data_info['n_train']} training examples")

    comm = world_comm() if comm is None else comm
    return run_committed(prepare_run(cfg, run_path, comm, say, resume, check=enough_examples), _run)


def _run(ctx: RunContext) -> dict | None:
    """The committed run, on every rank: the windows and heartbeats, then a worker's or a
    shard's part."""
    # The lead's run directory's start time is everyone's (shard 0 writes the last records).
    run_started = ctx.comm.bcast(ctx.run_dir.started if ctx.run_dir is not None else None, root=0)
    topo, layout = ctx.topo, ctx.layout
    role = topo.role
    if topo.is_lead:
        _introduce(ctx)
    windows = ParameterWindows(topo.window, layout, role.shard if role.is_shard else None)
    windows.lock_shards()
    liveness = Liveness(windows, layout, topo.world, ctx.tcfg["replica_timeout_s"], role)
    if role.is_worker:
        _work(ctx, windows, liveness)
        return None
    return _serve(ctx, windows, liveness, run_started)


def _introduce(ctx: RunContext) -> None:
    """The lead: the model, the resume, the layout, the plan and the run directory."""
    say, resumed, tcfg = ctx.say, ctx.resumed, ctx.tcfg
    say(ctx.network.summary())
    if resumed:
        say(f"resuming from {resumed['path']} at step {resumed['step']}")
        ctx.run_dir.log({"kind": "resume", "checkpoint": resumed["path"], "step": resumed["step"]})
    say(ctx.layout.describe(tcfg["optimizer"], ctx.plan, ctx.memory()))
    if ctx.layout.n_partitions > 1:
        say(ctx.plan.describe(tcfg["batch_size"]))
    say(f"run directory: {ctx.run_dir.path}")


def _work(ctx: RunContext, windows: ParameterWindows, liveness: Liveness) -> None:
    """A worker: load its data (before the heartbeats start: loading may take long), train,
    hand in, end."""
    topo = ctx.topo
    data = _load_replica_data(ctx)
    topo.world.Barrier()
    liveness.start()
    with liveness.partition_errors():  # a dead partition: this replica leaves, not the job
        client = _replica_loop(ctx, windows, liveness, data).run()
    _end(topo, windows, liveness, client.close)


def _load_replica_data(ctx: RunContext) -> ReplicaData:
    """A worker's model block and data, read from the file and nothing more: its replica's
    slice of the training set (only the input rows its partition needs; with a dense first
    layer and P > 1, only its 1/P piece of the slice, the batches shared by BatchShare), and
    for replica 0 the test set."""
    replica, partition, network = ctx.topo.role.replica, ctx.topo.role.partition, ctx.network
    n_parts = ctx.layout.n_partitions
    model, ranges, rows = worker_model(network, ctx.topo.replica, ctx.plan)
    with datasets.open_dataset(ctx.cfg["data"]["path"]) as dataset:
        start, stop = dataset.shard_range("train", replica, ctx.layout.n_replicas)
        bounds = None
        if rows is None and n_parts > 1:  # whole examples on every partition: a piece each
            bounds = [datasets.share_range(stop - start, p, n_parts)[0] for p in range(n_parts)] + [stop - start]
        first, last = (bounds[partition], bounds[partition + 1]) if bounds else (0, stop - start)
        x, y = dataset.load("train", start + first, start + last, rows=rows)
        test = dataset.load("test", rows=rows) if replica == 0 else None
    input_rows = list(rows) if rows is not None else [0, network.input_shape[0]]
    exchange = BatchShare(ctx.topo.replica, x.shape[1:]) if bounds else None
    return ReplicaData(model, x, y, test, input_rows, ranges, bounds=bounds, first=first, exchange=exchange)


def _replica_loop(ctx: RunContext, windows: ParameterWindows, liveness: Liveness, data: ReplicaData) -> ReplicaLoop:
    """A worker's ReplicaLoop over MPI: the shards' client and the run protocol on shard 0."""
    tcfg, topo, layout, resumed = ctx.tcfg, ctx.topo, ctx.layout, ctx.resumed
    role = topo.role
    backlog = tcfg["max_push_backlog"] or 2 * layout.n_workers
    client = ShardClient(windows, role.replica, data.ranges, max_backlog=backlog,
                         wait=lambda done: liveness.wait(done, high=2e-3))
    seat = Seat(topo.rank, role.replica, role.partition, layout.n_replicas, layout.n_partitions)
    return ReplicaLoop(tcfg, seat, data, client, ReplicaControl(windows, topo, liveness), liveness,
                       stop_request=ctx.stop, run_dir=ctx.run_dir, say=ctx.say,
                       first_step=resumed["step"] if resumed else 0, resumed=bool(resumed),
                       fail_at=FAULTS.fail_step(topo.rank), step_sleep_s=FAULTS.step_sleep_s)


def _serve(ctx: RunContext, windows: ParameterWindows, liveness: Liveness, run_started) -> dict | None:
    """A shard: publish its slice, serve until every worker finished or failed; shard 0
    then ends the run (_shard0_end), the others stream the final checkpoint and hand in."""
    topo, layout = ctx.topo, ctx.layout
    role = topo.role
    shard = Shard(windows, role.shard, *_initial_slice(ctx, role.shard))
    checkpointer = ShardCheckpointer(ctx.cfg, ctx.network, layout, topo, shard, ctx.run_path, liveness)
    topo.world.Barrier()  # every shard has published its initial slice
    liveness.start()
    if role.shard == 0:
        return _shard0_end(ctx, windows, shard, checkpointer, liveness, run_started)

    def tick() -> None:
        liveness.beat()
        checkpointer.obey()

    stats = shard.serve(None, ctx.stop, tick=tick)
    checkpointer.last_order()  # the final checkpoint, unless no replica survived to give it a state
    send(topo.world, {"records": [_shard_record(topo, stats, checkpointer), *liveness.events]},
         layout.shard_rank(0), Tag.FINAL, liveness.wait)
    _end(topo, windows, liveness, shard.close)
    return None


def _initial_slice(ctx: RunContext, k: int) -> tuple:
    """Shard k's initial parameters and optimizer: the network's, or a resumed checkpoint's
    (each shard reads only its own range of every vector)."""
    lo, hi = ctx.layout.shard_ranges[k]
    initial = None if ctx.resumed else ctx.network.initial_values(lo, hi)  # its range only, drawn directly
    optimizer = make_optimizer(ctx.tcfg, hi - lo)
    resumed = ctx.resumed
    if resumed:
        with open_checkpoint(resumed["path"], verify=False) as ckpt:
            initial = ckpt.read_range("params", lo, hi)
            for key, value in optimizer.state.items():
                if f"{optimizer.name}/{key}" in resumed["vectors"]:
                    ckpt.read_range(f"{optimizer.name}/{key}", lo, hi, out=value)
    return initial, optimizer


def _shard_record(topo, stats, checkpointer) -> dict:
    return {"kind": "shard", "rank": topo.rank, "shard": topo.role.shard,
            "updates": stats.updates, "pushes": stats.pushes, "drains": stats.drains,
            "dropped": stats.dropped, "rejected": stats.rejected,
            "workers_failed": stats.workers_failed,
            "busy_s": round(stats.busy_s, 3), "wall_s": round(stats.wall_s, 3),
            "merged_histogram": {bucket_label(b): n for b, n in enumerate(stats.merged_histogram) if n},
            "max_merged": stats.max_merged,
            "checkpoints_written": checkpointer.written, "checkpoints": checkpointer.records}


def add_push_counts(shard_records: list[dict], workers: list[dict], n_replicas: int) -> None:
    """Complete each shard's record with what its workers counted for it (dbmpi.ps.client):
    the staleness histogram of the pushes, the pushes by replica, and per replica the pushes
    the shard had counted before that replica's first one (-1: it never pushed; a failed
    replica's records are lost, so it shows as none)."""
    for record in shard_records:
        k = record["shard"]
        histogram = [0] * N_BUCKETS
        by_replica, first = [0] * n_replicas, [-1] * n_replicas
        for w in workers:
            if k not in w.get("shards", ()):
                continue
            i, r = w["shards"].index(k), w["replica"]
            histogram = [a + b for a, b in zip(histogram, w["staleness_histogram_by_shard"][i], strict=True)]
            by_replica[r] += w["pushes_by_shard"][i]
            after = w["first_push_after_by_shard"][i]
            if after >= 0:
                first[r] = after if first[r] < 0 else min(first[r], after)
        record.update({"staleness_histogram": {bucket_label(b): n for b, n in enumerate(histogram) if n},
                       "pushes_by_replica": by_replica, "first_push_after": first})


def _end(topo, windows, liveness: Liveness, close) -> None:
    """Every rank but shard 0, once its part is done: without failures, the collective
    teardown; after one, tell shard 0 and leave without collectives."""
    verdict = read_verdict(windows, topo.layout, liveness)
    diverged = receive(topo.world, topo.layout.shard_rank(0), Tag.OUTCOME, liveness.wait)
    liveness.stop()
    if verdict == VERDICT_FAILED:
        released(windows)
        if diverged is not None:
            _end_diverged(diverged, leaving=True)
        leave(0)
    close()
    windows.free()
    liveness.close()
    if diverged is not None:
        _end_diverged(diverged, leaving=False)


def _shard0_end(ctx: RunContext, windows, shard, checkpointer, liveness, run_started) -> dict | None:
    """Shard 0 serves, then writes the final checkpoint with the state of the lowest replica
    that finished and collects every rank's records (point to point: a collective would wait
    for a dead rank forever). Then it gives the verdict, lets the others go, and evaluates
    the final checkpoint and writes metrics and summary on its own."""
    records, final_path, diverged, failed = _shard0_collect(ctx, shard, checkpointer, liveness)
    liveness.beat(force=True)  # the others wait for the verdict: the evaluation must take less than the timeout
    with liveness.busy():
        test = _evaluate_final(ctx.cfg, ctx.network, final_path)
    if test[0] is not None and not math.isfinite(test[0]):
        diverged = f"the final test loss is {test[0]}; lower train.learning_rate"
        final_path = set_aside(final_path)
    _shard0_release(ctx, windows, shard, liveness, diverged, failed)
    say = ctx.speaker(ctx.layout.shard_rank(0))  # shard 0 writes the rest (the lead may have failed)
    summary = _finish(ctx.cfg, ctx.network, ctx.layout, final_path, records, failed, ctx.run_path, run_started,
                      say, test, diverged)
    if diverged is not None:
        _end_diverged(diverged, leaving=bool(failed))
    if not failed:
        return summary
    run_path = ctx.run_path
    if final_path is None:
        say(f"every replica failed; nothing to finish (summary in {run_path / 'summary.json'})")
        leave(EXIT_ALL_REPLICAS_FAILED)
    say(f"final test accuracy {summary['test_accuracy']:.4f} on the shards' parameters "
        f"({summary['wall_time_s']:.1f} s) without failed replica(s) {failed}; summary in "
        f"{run_path / 'summary.json'}")
    leave(0)


def _shard0_collect(ctx: RunContext, shard, checkpointer, liveness) -> tuple[list, Path | None, str | None, list]:
    """Shard 0: serve until everyone is counted finished or failed, write the final
    checkpoint (unless the run diverged or no replica finished), and gather every rank's
    records. Returns (records, the final checkpoint or None, why the run diverged or None,
    the replicas failed when serving ended: the run's verdict, whatever fails later)."""
    topo, layout = ctx.topo, ctx.layout
    world = topo.world
    messages = FinalMessages(world)

    def tick() -> None:
        liveness.beat()
        messages.poll()

    stats = shard.serve(checkpointer, ctx.stop, tick=tick)
    liveness.census()  # which workers finished and which failed (their marks, on every shard)
    # Everyone is counted finished or failed now; the finished workers' messages are in.
    finals = messages.of(sorted(liveness.done_workers), liveness)
    states = sorted((layout.role(w).replica, msg["state"]) for w, msg in finals.items()
                    if msg["state"] is not None)
    failed = liveness.failed_replicas()
    records = [r for w in sorted(finals) for r in finals[w]["records"]]
    diverged = _divergence(records, ctx.tcfg)
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
    return records, final_path, diverged, failed


def _shard0_release(ctx: RunContext, windows, shard, liveness, diverged: str | None, failed: list) -> None:
    """Shard 0: tell every rank how the run ends; without failures the collective teardown,
    after one wait (bounded) until the others have read the verdict."""
    told = tell_outcome(ctx.topo.world, ctx.layout, liveness, diverged)
    liveness.stop()
    if not failed:
        give_verdict(windows, VERDICT_CLEAN)
        liveness.wait(told)
        shard.close()
        windows.free()
    else:  # no collective: wait (bounded) until the others have read the verdict
        give_verdict(windows, VERDICT_FAILED)
        expected = len(liveness.done_workers) + ctx.layout.n_shards - 1
        liveness.wait(lambda: told() and count_released(windows) >= expected, limit_s=liveness.timeout)
    liveness.close()


def _evaluate_final(cfg, network, final_path) -> tuple:
    """On shard 0: test loss and accuracy of the final checkpoint's parameters (the shards'
    parameters at the end); (None, None) without one."""
    if final_path is None:
        return None, None
    network.allocate(initialise=False)  # the whole model, for this evaluation only
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
    add_push_counts([r for r in records if r["kind"] == "shard"], [r for r in records if r["kind"] == "replica"],
                    layout.n_replicas)
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
        "mean_staleness": mean([r["mean_staleness"] for r in workers if r["mean_staleness"] is not None]),
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
