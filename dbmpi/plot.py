"""`dbmpi plot RUN_DIR`: a run's metrics (every rank's file, dbmpi.io.rundir.read_metrics) as
one PNG (matplotlib is the optional `plot` extra).

Panels: training loss against steps and against wall time, one line per replica (wall
time marks the checkpoints); test accuracy against wall time (replica 0's copies during the
run, the shards' final value; Sandblaster: loss per L-BFGS iteration); and for Downpour the
shards' staleness histogram, the histogram of pushes merged per update, and how long each
checkpoint stalled each shard's updates.
"""
from __future__ import annotations

from pathlib import Path

from dbmpi.io.atomic import atomic_path
from dbmpi.io.rundir import read_metrics


class PlotError(ValueError):
    """A run directory that cannot be plotted (no matplotlib; a missing or empty one is
    dbmpi.io.rundir.RunDirectoryError)."""


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the run's figure; returns the PNG's path (default RUN_DIR/metrics.png)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotError("dbmpi plot needs matplotlib: pip install 'dbmpi[plot]'") from None
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    out = Path(out) if out else run_dir / "metrics.png"
    train = [r for r in records if r.get("kind") == "train"]
    iterations = [r for r in records if r.get("kind") == "iteration"]
    evals = [r for r in records if r.get("kind") == "eval"]
    shards = [r for r in records if r.get("kind") == "shard" and r.get("staleness_histogram")]

    checkpoints = [r for r in records if r.get("kind") == "checkpoint" and "stall_s_by_shard" in r]
    fig, axes = plt.subplots(2, 3, figsize=(15, 7))
    (loss_steps, loss_time, accuracy), (staleness, merged, stalls) = axes
    if iterations:
        its = [r["iteration"] for r in iterations]
        loss_steps.plot(its, [r["loss"] for r in iterations], marker=".")
        loss_steps.set_xlabel("L-BFGS iteration")
        loss_time.plot([r["time"] for r in iterations], [r["loss"] for r in iterations], marker=".")
    by_replica: dict[int, list[dict]] = {}
    for r in train:
        if r.get("partition", 0) == 0:
            by_replica.setdefault(r.get("replica", 0), []).append(r)
    for replica, rows in sorted(by_replica.items()):
        rows.sort(key=lambda r: r["step"])
        label = f"replica {replica}"
        loss_steps.plot([r["step"] for r in rows], [r["loss"] for r in rows], label=label)
        # elapsed_s: the replica's own clock (`time`, the run's, differs by the warmstart wait)
        loss_time.plot([r.get("elapsed_s", r["time"]) for r in rows], [r["loss"] for r in rows], label=label)
    if train:
        loss_steps.set_xlabel("step")
    for ax in (loss_steps, loss_time):
        ax.set_ylabel("training loss")
        ax.set_yscale("log")
        if len(by_replica) > 1:
            ax.legend(fontsize=8)
    loss_time.set_xlabel("wall time (s)")
    for r in checkpoints:
        loss_time.axvline(r["time"], color="0.7", linewidth=0.8, zorder=0)
    during = [r for r in evals if r.get("source") != "shards" and "time" in r]
    if during:
        accuracy.plot([r["time"] for r in during], [r["test_accuracy"] for r in during], marker=".",
                      label="during training")
    final = [r for r in evals if r.get("source") == "shards" or "source" not in r]
    if final:
        accuracy.scatter([r["time"] for r in final], [r["test_accuracy"] for r in final], color="C3",
                         zorder=3, label="final / evaluations")
    accuracy.set_xlabel("wall time (s)")
    accuracy.set_ylabel("test accuracy")
    if during or final:
        accuracy.legend(fontsize=8)
    _histograms(staleness, shards, "staleness_histogram", "staleness (shard updates since the pusher's fetch)",
                "pushes", "no staleness histogram (not a Downpour run)")
    _histograms(merged, [r for r in shards if r.get("merged_histogram")], "merged_histogram",
                "pushes merged into one update", "updates", "no merged-pushes histogram")
    _checkpoint_stalls(stalls, checkpoints)
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return out


def _histograms(ax, shards: list[dict], key: str, xlabel: str, ylabel: str, missing: str) -> None:
    """One group of bars per bucket, one bar per shard."""
    if not shards:
        ax.set_axis_off()
        ax.text(0.5, 0.5, missing, ha="center", va="center")
        return
    labels: list[str] = []
    for r in shards:
        labels += [label for label in r[key] if label not in labels]
    width = 0.8 / len(shards)
    for i, r in enumerate(sorted(shards, key=lambda r: r["shard"])):
        ax.bar([x + i * width for x in range(len(labels))], [r[key].get(label, 0) for label in labels],
               width=width, label=f"shard {r['shard']}")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(labels))], labels)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)


def _checkpoint_stalls(ax, checkpoints: list[dict]) -> None:
    """Per checkpoint, the longest time each shard could not apply updates while writing it."""
    if not checkpoints:
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no checkpoint records", ha="center", va="center")
        return
    n_shards = max(len(r["stall_s_by_shard"]) for r in checkpoints)
    width = 0.8 / n_shards
    for k in range(n_shards):
        ax.bar([x + k * width for x in range(len(checkpoints))],
               [1e3 * (r["stall_s_by_shard"][k] if k < len(r["stall_s_by_shard"]) else 0) for r in checkpoints],
               width=width, label=f"shard {k}")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(checkpoints))], [str(r["step"]) for r in checkpoints])
    ax.set_xlabel("checkpoint (step)")
    ax.set_ylabel("longest stall of updates (ms)")
    ax.legend(fontsize=8)


__all__ = ["PlotError", "plot_run", "read_metrics"]
