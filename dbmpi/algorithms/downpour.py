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
or its time budget, pushes what it has accrued, sends its totals (O(1)) to shard 0 and marks
itself done; the shards stop once every replica has finished or was declared failed
(dbmpi.runtime.failover: a killed replica does not stop the others). Every rank writes its
own records into its own metrics file as it goes (dbmpi.io.rundir); the lead rank (replica 0)
prints progress. Shard 0 writes the final checkpoint (with the state of the lowest replica
that finished), then the finished replicas split the test set and score the shards' final
parameters (`_final_evaluation`: shard 0 sums (loss sum, correct, rows) per piece), and
shard 0, once the others are released, writes the summary from the O(1) totals.

Input is validated identically on every rank before the first collective call, so a bad
config, layout, data file or run directory ends every rank with the same message
(dbmpi.algorithms.run). The messages and control-block slots of the run's protocol are
dbmpi.runtime.runcontrol's.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

from dbmpi import data as datasets
from dbmpi.algorithms.optimizers import make_optimizer, resume_state
from dbmpi.algorithms.replica import ReplicaData, ReplicaLoop, Seat, mean
from dbmpi.algorithms.run import RunContext, prepare_run, run_committed, set_aside
from dbmpi.algorithms.sgd import EXIT_DIVERGED, DivergedError
from dbmpi.config import ConfigError
from dbmpi.evaluation import TestShares, score
from dbmpi.io.checkpoint import open_checkpoint
from dbmpi.io.rundir import RankMetrics, merge_counts, peak_rss_bytes, write_json
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
    """The committed run, on every rank: its metrics file, the windows and heartbeats, then a
    worker's or a shard's part."""
    # The lead's run directory's start time is everyone's: one time axis in every rank's file.
    run_started = ctx.comm.bcast(ctx.run_dir.started if ctx.run_dir is not None else None, root=0)
    metrics = ctx.run_dir if ctx.run_dir is not None else RankMetrics(ctx.run_path, ctx.comm.rank, run_started)
    topo, layout = ctx.topo, ctx.layout
    role = topo.role
    if topo.is_lead:
        _introduce(ctx)
    windows = ParameterWindows(topo.window, layout, role.shard if role.is_shard else None)
    windows.lock_shards()
    liveness = Liveness(windows, layout, topo.world, ctx.tcfg["replica_timeout_s"], role)
    if role.is_worker:
        _work(ctx, windows, liveness, metrics)
        return None
    return _serve(ctx, windows, liveness, metrics)


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


def _work(ctx: RunContext, windows: ParameterWindows, liveness: Liveness, metrics) -> None:
    """A worker: load its data (before the heartbeats start: loading may take long), train,
    hand in, score its share of the test set, end."""
    topo = ctx.topo
    data = _load_replica_data(ctx)
    topo.world.Barrier()
    liveness.start()
    with liveness.partition_errors():  # a dead partition: this replica leaves, not the job
        client = _replica_loop(ctx, windows, liveness, data, metrics).run()
        _score_shares(ctx, client, data, liveness)
    _end(topo, windows, liveness, client.close)


def _load_replica_data(ctx: RunContext) -> ReplicaData:
    """A worker's model block and data, read from the file and nothing more: its replica's
    slice of the training set (only the input rows its partition needs; with a dense first
    layer and P > 1, only its 1/P piece of the slice, the batches shared by BatchShare), and
    for replica 0 the test set."""
    replica, partition, network = ctx.topo.role.replica, ctx.topo.role.partition, ctx.network
    n_parts = ctx.layout.n_partitions
    model, ranges, rows = worker_model(network, ctx.topo.replica, ctx.plan, ctx.tcfg["overlap_exchanges"])
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


def _replica_loop(ctx: RunContext, windows: ParameterWindows, liveness: Liveness, data: ReplicaData,
                  metrics) -> ReplicaLoop:
    """A worker's ReplicaLoop over MPI: the shards' client and the run protocol on shard 0."""
    tcfg, topo, layout, resumed = ctx.tcfg, ctx.topo, ctx.layout, ctx.resumed
    role = topo.role
    backlog = tcfg["max_push_backlog"] or 2 * layout.n_workers
    client = ShardClient(windows, role.replica, data.ranges, max_backlog=backlog,
                         wait=lambda done: liveness.wait(done, high=2e-3))
    seat = Seat(topo.rank, role.replica, role.partition, layout.n_replicas, layout.n_partitions)
    return ReplicaLoop(tcfg, seat, data, client, ReplicaControl(windows, topo, liveness), liveness,
                       metrics=metrics, stop_request=ctx.stop, say=ctx.say,
                       first_step=resumed["step"] if resumed else 0, resumed=bool(resumed),
                       fail_at=FAULTS.fail_step(topo.rank), step_sleep_s=FAULTS.step_sleep_s)


def _serve(ctx: RunContext, windows: ParameterWindows, liveness: Liveness, metrics) -> dict | None:
    """A shard: publish its slice, serve until every worker finished or failed; shard 0
    then ends the run (_shard0_end), the others stream the final checkpoint, log their
    record and hand shard 0 their totals (O(1))."""
    topo, layout = ctx.topo, ctx.layout
    role = topo.role
    shard = Shard(windows, role.shard, *_initial_slice(ctx, role.shard),
                  staleness_aware=ctx.tcfg["staleness_aware"])
    checkpointer = ShardCheckpointer(ctx.cfg, ctx.network, layout, topo, shard, ctx.run_path, liveness)
    topo.world.Barrier()  # every shard has published its initial slice
    liveness.start()
    if role.shard == 0:
        return _shard0_end(ctx, windows, shard, checkpointer, liveness, metrics)

    def tick() -> None:
        liveness.beat()
        checkpointer.obey()

    stats = shard.serve(None, ctx.stop, tick=tick)
    checkpointer.last_order()  # the final checkpoint, unless no replica survived to give it a state
    record = _shard_record(topo, stats, checkpointer, metrics)
    metrics.log(record)
    for event in liveness.events:  # the failures this shard's detector declared
        metrics.log(event)
    metrics.close()
    send(topo.world, _shard_totals(record), layout.shard_rank(0), Tag.FINAL, liveness.wait)
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
            if not resumed.get("parameters_only"):
                resume_state(optimizer, ckpt, lo, hi)
    return initial, optimizer


def _shard_record(topo, stats, checkpointer, metrics) -> dict:
    """A shard's `shard` record, for its own metrics file: its counters, its part in each
    checkpoint (times in seconds since the run started), its peak memory, and what the
    reader needs to complete it (dbmpi.io.rundir.complete_records: the run's start, the
    replica count, the staleness buckets' labels)."""
    started = metrics.started
    checkpoints = [dict(c, time=round(c["time"] - started, 4)) if "time" in c else dict(c)
                   for c in checkpointer.records]
    return {"kind": "shard", "rank": topo.rank, "shard": topo.role.shard,
            "updates": stats.updates, "pushes": stats.pushes, "drains": stats.drains,
            "dropped": stats.dropped, "rejected": stats.rejected,
            "workers_failed": stats.workers_failed,
            "busy_s": round(stats.busy_s, 3), "wall_s": round(stats.wall_s, 3),
            "merged_histogram": {bucket_label(b): n for b, n in enumerate(stats.merged_histogram) if n},
            "max_merged": stats.max_merged,
            "mean_staleness": round(stats.mean_staleness, 3), "mean_step_scale": round(stats.mean_step_scale, 4),
            "checkpoints_written": checkpointer.written, "checkpoints": checkpoints,
            "peak_rss_bytes": peak_rss_bytes(), "n_replicas": topo.layout.n_replicas,
            "bucket_labels": [bucket_label(b) for b in range(N_BUCKETS)], "run_started": started}


def _shard_totals(record: dict) -> dict:
    """What the summary needs of a shard's record: O(1) numbers (a histogram of N_BUCKETS)."""
    return {"shard": record["shard"], "updates": record["updates"], "dropped": record["dropped"],
            "merged_histogram": record["merged_histogram"], "max_merged": record["max_merged"],
            "mean_staleness": record["mean_staleness"], "mean_step_scale": record["mean_step_scale"],
            "checkpoints": len(record["checkpoints"]),
            "stall_s_max": max((c.get("stall_s", 0.0) for c in record["checkpoints"]), default=0.0)}


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


def _shard0_end(ctx: RunContext, windows, shard, checkpointer, liveness, metrics) -> dict | None:
    """Shard 0 serves, then writes the final checkpoint with the state of the lowest replica
    that finished and collects every rank's totals (point to point: a collective would wait
    for a dead rank forever); the finished replicas score the test set. Then it gives the
    verdict, lets the others go, and writes its records and the summary."""
    workers, shards, final_path, diverged, failed = _shard0_collect(ctx, shard, checkpointer, liveness, metrics)
    test = _final_evaluation(ctx, liveness, final_path)
    if test[0] is not None and not math.isfinite(test[0]):
        diverged = f"the final test loss is {test[0]}; lower train.learning_rate"
        final_path = set_aside(final_path)
    _shard0_release(ctx, windows, shard, liveness, diverged, failed)
    say = ctx.speaker(ctx.layout.shard_rank(0))  # shard 0 writes the rest (the lead may have failed)
    summary = _finish(ctx, final_path, workers, shards, failed, metrics, say, test, diverged)
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


def _shard0_collect(ctx: RunContext, shard, checkpointer, liveness, metrics) -> tuple:
    """Shard 0: serve until everyone is counted finished or failed, write the final
    checkpoint (unless the run diverged or no replica finished), log its own record and
    gather every rank's totals (O(1) each). Returns (the workers' totals, the shards'
    totals, the final checkpoint or None, why the run diverged or None, the replicas failed
    when serving ended: the run's verdict, whatever fails later)."""
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
    workers = [finals[w]["totals"] for w in sorted(finals)]
    diverged = _divergence(workers, ctx.tcfg)
    go = bool(states) and diverged is None  # a diverged run keeps its last good checkpoint
    for k in range(1, layout.n_shards):  # the final checkpoint's step, or False: none
        send(world, states[0][1]["step"] if go else False, layout.shard_rank(k), Tag.CKPT_LAST, liveness.wait)
    final_path = None
    if go:
        state = dict(states[0][1], lead_replica=states[0][0], failed_replicas=failed)
        checkpointer(state)  # the final checkpoint
        final_path = checkpointer.last
    record = _shard_record(topo, stats, checkpointer, metrics)
    metrics.log(record)
    shards = [_shard_totals(record)]
    for k in range(1, layout.n_shards):
        shards.append(receive(world, layout.shard_rank(k), Tag.FINAL, liveness.wait))
    for event in liveness.events:
        metrics.log(event)
    return workers, shards, final_path, diverged, failed


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


def _final_evaluation(ctx: RunContext, liveness, final_path) -> tuple:
    """Shard 0: the test loss, accuracy and rows scored of the shards' final parameters
    (those of the final checkpoint), scored by the finished replicas, each a share of the
    test rows (dbmpi.evaluation.TestShares; a replica whose partitions all finished takes
    part, its partitions together). Each piece of `eval_batch_size` rows comes back as (loss
    sum, correct, rows), which is also a heartbeat: a replica silent for
    `replica_timeout_s` is passed over and its unscored rows go to another. Every finished
    worker is told None at the end (or at once when it scores nothing). (None, None, 0)
    without a final checkpoint."""
    topo, layout, tcfg = ctx.topo, ctx.layout, ctx.tcfg
    world, P = topo.world, layout.n_partitions
    done = liveness.done_workers
    evaluators = [] if final_path is None else [
        r for r in range(layout.n_replicas) if all(layout.worker_rank(r, p) in done for p in range(P))]
    shares = TestShares(ctx.data_info["n_test"], tcfg["eval_batch_size"], evaluators, liveness.timeout,
                        time.monotonic())
    requests = []

    def hand_out(replica: int, share) -> None:
        requests.extend(world.isend(share, dest=layout.worker_rank(replica, p), tag=Tag.EVAL) for p in range(P))

    for replica, share in shares.shares.items():
        hand_out(replica, share)

    def over() -> bool:
        while (message := world.improbe(tag=Tag.EVAL)) is not None:
            report = message.recv()
            shares.scored(report["replica"], report["start"], *report["score"], now=time.monotonic())
        for replica, share in shares.check(time.monotonic()):
            hand_out(replica, share)
        return shares.over()

    liveness.wait(over)
    for w in sorted(done):  # the end of the evaluation (a rank that died meanwhile never reads it)
        requests.append(world.isend(None, dest=w, tag=Tag.EVAL))
    liveness.wait(lambda: _sent(requests), limit_s=liveness.timeout)
    loss, accuracy, rows = shares.result()
    return loss, accuracy, rows, len(evaluators)


def _sent(requests) -> bool:
    """Whether nonblocking sends are done (one to a rank that died counts as done)."""
    try:
        return all(request.Test() for request in requests)
    except Exception:  # noqa: BLE001 - an MPI error from a dead peer: nothing more to send it
        return True


def _score_shares(ctx: RunContext, client, data: ReplicaData, liveness) -> None:
    """A finished worker: score the test rows shard 0 hands out (`_final_evaluation`) on the
    shards' final parameters (fetched once, after the last update), a piece at a time, each
    piece's (loss sum, correct, rows) reported by the replica's first partition, until shard 0
    says None."""
    topo, layout = ctx.topo, ctx.layout
    world, shard0, model = topo.world, layout.shard_rank(0), data.model
    batch = ctx.tcfg["eval_batch_size"]
    whole = data.input_rows == [0, ctx.network.input_shape[0]]
    rows = None if whole else tuple(data.input_rows)
    fetched = False
    while (share := receive(world, shard0, Tag.EVAL, liveness.wait)) is not None:
        if not fetched:
            client.fetch(model.params)
            fetched = True
        with datasets.open_dataset(ctx.cfg["data"]["path"]) as dataset:
            for start in range(share[0], share[1], batch):
                x, y = dataset.load("test", start, min(start + batch, share[1]), rows=rows)
                piece = score(model, x, y, batch)
                liveness.beat()
                if topo.role.partition == 0:
                    send(world, {"replica": topo.role.replica, "start": start, "score": piece}, shard0, Tag.EVAL,
                         liveness.wait)


def _divergence(workers: list[dict], tcfg: dict) -> str | None:
    """Why the training diverged, from the workers' totals (None if it did not): more than
    train.max_rejected_fraction of the pushes withheld as non-finite, or a replica stopped
    because its own pushes were."""
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


def _finish(ctx: RunContext, final_path, workers, shards, failed, metrics, say,
            test=(None, None, 0, 0), diverged: str | None = None) -> dict:
    """On shard 0: log the final evaluation into its metrics file and write summary.json from
    the workers' and shards' totals (`test`: the final parameters' test loss, accuracy, rows
    scored and replicas scoring; `diverged`: why the training failed)."""
    tcfg, layout = ctx.tcfg, ctx.layout
    test_loss, test_acc, test_rows, evaluators = test
    if final_path is not None:
        metrics.log({"kind": "eval", "source": "shards", "checkpoint": final_path.name,
                     "test_loss": test_loss, "test_accuracy": test_acc, "test_examples": test_rows,
                     "evaluators": evaluators})
    metrics.close()
    workers = sorted(workers, key=lambda r: (r["replica"], r["partition"]))
    shards = sorted(shards, key=lambda r: r["shard"])
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
        "merged_histogram": merge_counts(s["merged_histogram"] for s in shards),
        "max_merged_pushes": max((s["max_merged"] for s in shards), default=0),
        "checkpoints": shards[0]["checkpoints"] if shards else 0,
        "checkpoint_stall_s_max": max((s["stall_s_max"] for s in shards), default=0.0),
        "mean_staleness": mean([r["mean_staleness"] for r in workers if r["mean_staleness"] is not None]),
        "staleness_aware": tcfg["staleness_aware"],
        "mean_step_scale_by_shard": [s["mean_step_scale"] for s in shards],
        "mean_staleness_by_shard": [s["mean_staleness"] for s in shards],
        "failed_replicas": failed,
        "final_checkpoint": final_path.name if final_path is not None else None,
        "test_loss": test_loss, "test_accuracy": test_acc, "test_examples": test_rows,
        "n_params": ctx.network.n_params,
        "status": "diverged" if diverged else "finished", "failure": diverged,
    }
    write_json(ctx.run_path, "summary.json", summary)
    say(f"shards applied {summary['updates_by_shard']} updates; replicas ran {summary['steps_by_replica']} "
        f"steps; {summary['pushes_rejected']} pushes rejected, {summary['drains_dropped']} drains dropped"
        + (f"; replica(s) {failed} failed" if failed else ""))
    say(f"one update merged at most {summary['max_merged_pushes']} pushes"
        + (f"; {summary['checkpoints']} checkpoint(s) stalled updates at most "
           f"{1e3 * summary['checkpoint_stall_s_max']:.1f} ms" if summary["checkpoints"] else ""))
    if tcfg["staleness_aware"]:
        say(f"staleness-aware shards: pushes {summary['mean_staleness_by_shard']} updates stale on average, "
            f"mean step scale {summary['mean_step_scale_by_shard']}")
    return summary
