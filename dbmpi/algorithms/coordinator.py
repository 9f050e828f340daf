"""Sandblaster's coordinator: the L-BFGS iteration loop over a space whose vectors live
elsewhere, with the run's bookkeeping (start or resume, one metrics record per iteration,
test evaluations, checkpoints, stop signals, divergence, the summary).

MPI-free: every vector command, batch evaluation, checkpoint and the end-of-run exchange go
through the space (`BatchSpace`; on the cluster dbmpi.algorithms.sandblaster.ShardSpace, whose
vectors are the shards' slices and whose batches the replicas compute), so the same
`Coordinator` runs in-process over a NumPy space in the tests.
"""
from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from dbmpi import config as configuration
from dbmpi.algorithms.divergence import DivergenceWatch, emit
from dbmpi.algorithms.lbfgs import LBFGS, NotFinite, VectorSpace, X
from dbmpi.io.checkpoint import checkpoint_name
from dbmpi.io.rundir import RunDirectory, peak_rss_bytes
from dbmpi.runtime.layout import Layout


class BatchSpace(VectorSpace, Protocol):
    """What the coordinator needs of its space besides the vector commands: `evaluate` uses
    the batch `batches[batch]`; `stats_log` gets one entry per evaluation (its "examples",
    "portions_by_replica", "backups_issued", "backups_won", "duplicates_rejected",
    "revoked", "reissued", "seconds")."""

    batches: list[tuple[int, int]]
    batch: int  # which batch evaluations use now
    evaluation: int  # evaluations so far (a checkpoint keeps it)
    stats_log: list[dict]
    replica_signalled: bool  # a stop signal reached a replica
    recomputed: int  # batches computed again after a failure
    failed_replicas: list[int]

    def shards_signalled(self) -> bool: ...

    def checkpoint(self, vectors: list[tuple[str, str]], **attrs) -> None: ...

    def test(self, point: str) -> tuple[float, float]: ...

    def stop_replicas(self) -> None: ...

    def stop_shards(self) -> None: ...

    def records(self, before_verdict: Callable[[], None]) -> list[list[dict]]: ...


class Stop(Protocol):
    requested: bool  # a stop signal reached this process (dbmpi.runtime.signals.StopRequest)


class Coordinator:
    """Drives L-BFGS (dbmpi.algorithms.lbfgs) on `space` for `cfg`'s [train] settings and writes
    the run into `run_dir`. `resumed`: the checkpoint the run starts from (its vectors already
    in the space), or None; `set_aside(path)` renames a checkpoint whose final test loss is
    not finite, so that --resume auto never picks it. `run()` does everything."""

    def __init__(self, cfg: dict, space: BatchSpace, layout: Layout, run_dir: RunDirectory,
                 say: Callable[[str], None], *, stop: Stop, n_params: int, resumed: dict | None = None,
                 set_aside: Callable[[Path], object]):
        self.cfg, self.tcfg = cfg, cfg["train"]
        self.space, self.layout, self.run_dir, self.say = space, layout, run_dir, say
        self.stop, self.n_params, self.resumed, self.set_aside = stop, n_params, resumed, set_aside
        tcfg = self.tcfg
        self.lbfgs = LBFGS(space, m=tcfg["history"], c1=tcfg["wolfe_c1"], c2=tcfg["wolfe_c2"],
                           max_evals=tcfg["max_line_search"])
        first = space.batches[0]
        self.batch_size = first[1] - first[0]  # the first batch is a whole one
        self.eval_every = configuration.eval_interval(tcfg, len(space.batches))  # iterations between tests
        self.config_text = configuration.dumps(cfg)
        self.started = time.perf_counter()
        self.earlier_s = 0.0  # seconds trained before a resume, so times continue
        self.failure: str | None = None  # why the training diverged
        self.divergence = DivergenceWatch("lbfgs", None, unit="iteration")  # non-finite: a failure instead
        self.status = "budget"
        self.iteration = 0  # iterations this run, from where it started
        self.iterations: list[dict] = []  # the iteration records
        self.logged = 0  # the space's evaluations already in an iteration record
        self.written: list[str] = []  # checkpoint file names
        self.last_checkpoint, self.checkpointed_at = self.started, None

    def elapsed(self) -> float:
        return self.earlier_s + time.perf_counter() - self.started

    # The run ------------------------------------------------------------------------------
    def run(self, before_verdict: Callable[[], None] = lambda: None) -> dict:
        """Train, checkpoint, test the final x, stop the replicas and shards, write the
        records and summary.json; returns the summary. `before_verdict` runs once every
        rank's records are in (dbmpi.algorithms.sandblaster.ShardSpace.records)."""
        tcfg, layout = self.tcfg, self.layout
        budget = tcfg["iterations"] if tcfg["iterations"] is not None else math.inf
        deadline = (time.perf_counter() + tcfg["time_budget_s"]) if tcfg["time_budget_s"] else math.inf
        portions = math.ceil(self.batch_size / tcfg["portion_size"])
        self.say(f"sandblaster: {layout.n_replicas} replicas x {layout.n_partitions} partition(s), "
                 f"{layout.n_shards} shards; batches of {self.batch_size} examples ({len(self.space.batches)} "
                 f"per pass) in {portions} portions of {tcfg['portion_size']}; history {tcfg['history']}, "
                 f"backups {'on' if tcfg['backup_tasks'] else 'off'}")
        self.started = time.perf_counter()
        loss = self.begin()
        self.iteration = self.lbfgs.iteration
        self.last_checkpoint = time.perf_counter()
        resuming = self.resumed and not self.resumed.get("parameters_only")
        self.log({"iteration": self.lbfgs.iteration, "loss": loss, "step_length": 0.0, "evaluations": 1,
                  "status": "resume" if resuming else "start"})
        self.say(f"[lbfgs] iteration {self.lbfgs.iteration:>5}  loss {loss:.6f}")
        while self.failure is None and self.iteration < budget and time.perf_counter() < deadline:
            if not self.iterate():
                break
        self.conclude()
        test_loss, test_accuracy = self.space.test(X)  # the final x, by the lowest live replica
        self.space.stop_replicas()
        self.space.stop_shards()
        gathered = self.space.records(before_verdict=before_verdict)
        summary = self.summary(test_loss, test_accuracy, wall_s=time.perf_counter() - self.started)
        self.write(summary, gathered)
        return summary

    def begin(self) -> float:
        """f at x for the first record: evaluated, or a checkpoint's (then restored)."""
        resumed = self.resumed
        if resumed and resumed.get("parameters_only"):
            self.say(f"initial parameters from {resumed['path']}")
            self.run_dir.log({"kind": "init", "checkpoint": resumed["path"]})
            return self.start()
        if resumed:
            self.say(f"resuming from {resumed['path']} at iteration {resumed['step']}")
            self.run_dir.log({"kind": "resume", "checkpoint": resumed["path"], "step": resumed["step"]})
            self.earlier_s = self.restore()
            return self.lbfgs.f
        return self.start()

    def start(self) -> float:
        """f and g at x on the current batch; NaN (and a failure) when they are not finite."""
        try:
            return self.lbfgs.start()
        except NotFinite as exc:
            self.failure = f"iteration {self.lbfgs.iteration + 1}, batch {self.space.batch}: {exc}; check the data"
            return math.nan

    def restore(self) -> float:
        """Continue from the checkpoint the space holds: the L-BFGS scalars, the batch, the
        counters; returns the seconds trained before. A changed history size or batching
        keeps x (and the pairs that fit) and re-evaluates f and g; a Downpour checkpoint is a
        warm start from its parameters."""
        lbfgs, space, resumed = self.lbfgs, self.space, self.resumed
        state = resumed["state"]
        saved = state.get("lbfgs")
        if saved is None:
            self.say(f"warm start from the parameters of {resumed['path']} (it holds no L-BFGS state)")
            lbfgs.start()
            return 0.0
        saved = dict(saved)
        if int(saved["m"]) != lbfgs.m:
            self.say(f"history {lbfgs.m} instead of the checkpoint's {saved['m']}: keeping the newest pairs that fit")
            keep = [i for i in saved["slots"] if i < lbfgs.m][-lbfgs.m:]
            rho = [r for i, r in zip(saved["slots"], saved["rho"], strict=False) if i in keep]
            saved.update(m=lbfgs.m, slots=keep, rho=rho)
        lbfgs.load_state(saved)
        same_batches = state.get("batches") == [list(b) for b in space.batches]
        if same_batches:
            space.batch = int(state["batch"])
        space.evaluation = int(state.get("evaluation", 0))
        if not same_batches:
            self.say("the batches differ from the checkpoint's: evaluating f and g at x afresh")
            lbfgs.start()
        return float(state.get("elapsed_s", 0.0))

    def iterate(self) -> bool:
        """One L-BFGS iteration (on the next batch when there are several), its record, and
        what follows it: a stop signal, a test evaluation, a periodic checkpoint. False when
        the run ends here."""
        space, lbfgs = self.space, self.lbfgs
        if len(space.batches) > 1:  # the next batch: f and g at x on it
            space.batch = (space.batch + 1) % len(space.batches)
            self.start()
            if self.failure is not None:
                return False
        record = lbfgs.step(self.tcfg["tolerance"])
        self.iteration += 1
        self.log(dict(record))
        last = self.iterations[-1]
        self.say(f"[lbfgs] iteration {record['iteration']:>5}  loss {record['loss']:.6f}  "
                 f"step {record['step_length']:.3g}  evaluations {record['evaluations']}  "
                 f"portions {last['portions_by_replica']}  backups {last['backups_won']}/{last['backups_issued']}")
        if record.get("status") in ("converged", "stalled"):
            self.status = record["status"]
            return False
        if self.stop.requested or space.replica_signalled or space.shards_signalled():
            self.status = "signal"
            self.say("stop signal: checkpointing and exiting")
            return False
        if self.eval_every and lbfgs.iteration % self.eval_every == 0 and not self.test():
            return False
        every, every_s = self.tcfg["checkpoint_every"], self.tcfg["checkpoint_every_s"]
        overdue = every_s and time.perf_counter() - self.last_checkpoint >= every_s
        if (every and lbfgs.iteration % every == 0) or overdue:
            self.checkpoint("periodic")
        return True

    def test(self) -> bool:
        """x on the test set (by a replica), logged; False (a failure) when the loss is not finite."""
        iteration = self.lbfgs.iteration
        test_loss, test_accuracy = self.space.test(X)
        if not math.isfinite(test_loss):
            self.failure = f"iteration {iteration}: the test loss is {test_loss}"
        self.run_dir.log({"kind": "eval", "source": "replicas", "iteration": iteration,
                          "time_s": round(self.elapsed(), 4), "test_loss": test_loss,
                          "test_accuracy": test_accuracy})
        self.say(f"[lbfgs] iteration {iteration:>5}  test accuracy {test_accuracy:.4f}")
        if self.failure is None and (warning := self.divergence.observe(iteration, test_loss)):
            emit(warning, self.run_dir.log)
        return self.failure is None

    def conclude(self) -> None:
        """After the last iteration: the final (or signal) checkpoint, none after a divergence."""
        if self.failure is not None:
            self.status = "diverged"
            self.say(f"training diverged: {self.failure}; no final checkpoint")
        elif self.checkpointed_at != self.lbfgs.iteration:
            self.checkpoint("signal" if self.status == "signal" else "final")

    # Records ------------------------------------------------------------------------------
    def log(self, record: dict) -> None:
        """An iteration record, with the portion statistics of its evaluations."""
        evals = self.space.stats_log[self.logged:]
        self.logged = len(self.space.stats_log)
        record.update({
            "kind": "iteration", "time_s": round(self.elapsed(), 4),
            "portions_by_replica": [sum(e["portions_by_replica"][r] for e in evals)
                                    for r in range(self.layout.n_replicas)],
            "examples_per_evaluation": [e["examples"] for e in evals],
            "backups_issued": sum(e["backups_issued"] for e in evals),
            "backups_won": sum(e["backups_won"] for e in evals),
            "duplicates_rejected": sum(e["duplicates_rejected"] for e in evals),
            "revoked": sum(e["revoked"] for e in evals),
            "batch_seconds": [round(e["seconds"], 4) for e in evals]})
        self.iterations.append(record)
        self.run_dir.log(record)

    def checkpoint(self, phase: str) -> None:
        """Have the space write x, g and the history with the scalars to continue from."""
        lbfgs, space = self.lbfgs, self.space
        state = lbfgs.state()
        vectors = [("params", X)] + [(f"lbfgs/{name}", name) for name in state["vectors"] if name != X]
        space.checkpoint(vectors, step=lbfgs.iteration, algorithm="sandblaster", config_text=self.config_text,
                         layout=self.layout.to_dict(),
                         state={"lbfgs": state, "batch": space.batch, "batches": space.batches,
                                "evaluation": space.evaluation, "elapsed_s": round(self.elapsed(), 4),
                                "phase": phase, "iteration": lbfgs.iteration})
        name = checkpoint_name(lbfgs.iteration)
        self.written.append(name)
        self.run_dir.log({"kind": "checkpoint", "step": lbfgs.iteration, "file": f"checkpoints/{name}",
                          "phase": phase, "time_s": round(self.elapsed(), 4)})
        self.say(f"checkpoint {name} ({phase})")
        self.last_checkpoint, self.checkpointed_at = time.perf_counter(), lbfgs.iteration

    def summary(self, test_loss: float, test_accuracy: float, wall_s: float) -> dict:
        """summary.json's content (less what the ranks' records add, `write`)."""
        if self.failure is None and not math.isfinite(test_loss):
            self.status = "diverged"
            self.failure = f"the final test loss is {test_loss}"
            self.set_aside(self.run_dir.path / "checkpoints" / self.written[-1])  # --resume auto must not pick it
        tcfg, space = self.tcfg, self.space
        summary = {"algorithm": "sandblaster", "layout": self.layout.to_dict(),
                   "n_partitions": self.layout.n_partitions, "iterations": self.iteration, "status": self.status,
                   "final_loss": self.lbfgs.f, "evaluations": space.evaluation, "batch_size": self.batch_size,
                   "portion_size": tcfg["portion_size"], "history": tcfg["history"],
                   "backup_tasks": tcfg["backup_tasks"],
                   "weight_decay": tcfg["weight_decay"],  # in final_loss (the objective), not in test_loss
                   "backups_issued": sum(r["backups_issued"] for r in self.iterations),
                   "backups_won": sum(r["backups_won"] for r in self.iterations),
                   "wall_time_s": round(wall_s, 3), "n_params": self.n_params,
                   "test_loss": test_loss, "test_accuracy": test_accuracy,
                   "checkpoints_written": self.written, "stopped_by_signal": self.status == "signal",
                   "failed_replicas": list(space.failed_replicas), "batches_recomputed": space.recomputed,
                   "portions_reissued": sum(e["reissued"] for e in space.stats_log),
                   "failure": self.failure}
        resumed = self.resumed
        if resumed and resumed.get("parameters_only"):
            summary["initial_parameters"] = resumed["path"]
        elif resumed:
            summary["resumed_from"] = {"checkpoint": resumed["path"], "step": resumed["step"]}
        return summary

    def write(self, summary: dict, gathered: list[list[dict]]) -> None:
        """The final test evaluation, the failure records and the coordinator's own record
        into its metrics file (each rank logged its own `replica` or `shard` record: `gathered`
        holds them, one list per rank, for the counts), and summary.json (with each replica's
        portion count); closed."""
        run_dir = self.run_dir
        records = [r for per_rank in gathered for r in per_rank]
        for record in records:
            if record["kind"] not in ("replica", "shard"):  # in the ranks' own files
                run_dir.log(record)
        run_dir.log({"kind": "eval", "source": "shards", "test_loss": summary["test_loss"],
                     "test_accuracy": summary["test_accuracy"]})
        run_dir.log({"kind": "coordinator", "rank": self.layout.coordinator_rank, "peak_rss_bytes": peak_rss_bytes()})
        workers = sorted((r for r in records if r["kind"] == "replica"), key=lambda r: (r["replica"], r["partition"]))
        computed = {r["replica"]: r["portions_computed"] for r in workers if r["partition"] == 0}
        # None for a failed replica (it sent no records)
        summary["portions_computed_by_replica"] = [computed.get(r) for r in range(self.layout.n_replicas)]
        run_dir.write_json("summary.json", summary)
        run_dir.close()
        self.say(f"sandblaster: {summary['iterations']} iterations ({summary['status']}), "
                 f"{summary['evaluations']} evaluations, final loss {summary['final_loss']:.6f}")
