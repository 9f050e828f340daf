"""Figure 5 at our scale: time to a fixed test accuracy against cores, for Downpour SGD,
Downpour with Adagrad and Sandblaster L-BFGS (the Fashion-MNIST MLP, from Figure 4's warm
start).

    python bench/paper/fig5_time_to_accuracy.py [--quick] [--budget S] [--no-oversubscribed]

The target is chosen the paper's way: the accuracy the serial baseline reaches. Here that
is single-replica SGD on one core (one process, one BLAS thread), trained first for
`target budget` seconds; the target is its final test accuracy rounded down to 0.5%.
Every method then runs with c = 1 and 2 cores, with c replicas and 1 shard (Sandblaster:
and its coordinator), the job pinned to c cores with `taskset`, so on one core the shard
and coordinator share the replica's core. With the most cores (2), also R = 4 replicas
(full mode): more replicas than cores, marked as oversubscribed. Single-replica SGD with 2 BLAS threads is
the 2-core serial reference. Writes bench/paper/results/fig5.json, docs/img/paper/fig5.png
(fig5_quick.* with --quick).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion  # noqa: E402
from common import FIGURES, machine, output_name, pyplot, write_result  # noqa: E402

METHODS = (*fashion.DOWNPOUR, "sandblaster")
COLORS = {"sgd": "k", "downpour_sgd": "C0", "downpour_adagrad": "C3", "downpour_nesterov": "C1",
          "downpour_adam": "C4", "sandblaster": "C2"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short budgets, no oversubscribed runs")
    parser.add_argument("--target-budget", type=float, help="seconds of the serial baseline that sets the "
                                                            "target (default 45, quick 12)")
    parser.add_argument("--budget", type=float, help="seconds per run of the other cases (default 75, quick 16)")
    parser.add_argument("--no-oversubscribed", action="store_true", help="skip R = 2 x cores on the most cores")
    parser.add_argument("--cores", default="1,2", help="comma list of core counts (default 1,2; the job is "
                                                        "pinned to the first c cores)")
    parser.add_argument("--replot", metavar="RESULTS_JSON", help="only redraw the figure from a results file")
    args = parser.parse_args()
    if args.replot:
        plot(json.loads(Path(args.replot).read_text()), FIGURES / f"{Path(args.replot).stem}.png")
        return
    target_budget = args.target_budget or (12.0 if args.quick else 45.0)
    budget = args.budget or (16.0 if args.quick else 75.0)
    oversubscribed = not (args.quick or args.no_oversubscribed)
    core_counts = sorted({int(c) for c in args.cores.split(",")})
    warm = fashion.warmstart()

    serial = fashion.run_method("sgd", warm, target_budget, cores=1, threads=1, tag="-fig5-1core")
    target = math.floor(serial["final_accuracy"] * 200) / 200
    print(f"fig5: target {target:.3f} (single-replica SGD, 1 core, {target_budget:g} s: "
          f"{serial['final_accuracy']:.4f})", file=sys.stderr, flush=True)

    cases = [("sgd", c, None) for c in core_counts]
    cases += [(m, c, c) for c in core_counts for m in METHODS]
    if oversubscribed:
        cases += [(m, core_counts[-1], 2 * core_counts[-1]) for m in METHODS]
    runs = [serial]
    for method, cores, replicas in cases:
        if method == "sgd" and cores == 1:
            continue  # the target run
        if method == "sgd":
            r = fashion.run_method("sgd", warm, budget, cores=cores, threads=cores, tag=f"-fig5-{cores}core")
        else:
            r = fashion.run_method(method, warm, budget, replicas=replicas, shards=1, cores=cores,
                                   tag=f"-fig5-{cores}core-r{replicas}")
        runs.append(r)
        print(f"fig5: {method} cores={cores} R={replicas}: final {r['final_accuracy']:.4f}, "
              f"to target {fashion.time_to(r['curve'], target)}", file=sys.stderr, flush=True)
    table = []
    for r in runs:
        t = fashion.time_to(r["curve"], target)
        r["time_to_target_s"] = t
        table.append({"method": r["method"], "cores": r["cores"], "replicas": r.get("replicas"),
                      "ranks": r["ranks"], "oversubscribed": r["oversubscribed"], "budget_s": r["budget_s"],
                      "time_to_target_s": t, "final_accuracy": r["final_accuracy"]})
    result = {"experiment": "fig5", "quick": args.quick, "target": target,
              "target_choice": (f"the final test accuracy of the serial baseline (single-replica SGD, one core, "
                                f"one BLAS thread) after {target_budget:g} s from the warm start, rounded down "
                                f"to 0.5%"),
              "serial_final_accuracy": serial["final_accuracy"], "target_budget_s": target_budget,
              "budget_s": budget, "warmstart": warm, "settings": fashion.settings(), "table": table,
              "runs": runs, "machine": machine()}
    write_result(output_name("fig5", args.quick), result)

    plot(result, FIGURES / f"{output_name('fig5', args.quick)}.png")


def plot(result: dict, path) -> None:
    """Figure 5 from a results dict (also: `--replot RESULTS.json`)."""
    table, budget, target = result["table"], result["budget_s"], result["target"]
    core_counts = sorted({t["cores"] for t in table})
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 5.2))
    over = [t for t in table if t["oversubscribed"]]
    for i, method in enumerate(("sgd", *METHODS)):
        rows = [t for t in table if t["method"] == method and not t["oversubscribed"]]
        rows.sort(key=lambda t: t["cores"])
        label = fashion.METHODS[method] + (" (1 process)" if method == "sgd" else "")
        xs = [t["cores"] for t in rows if t["time_to_target_s"] is not None]
        ys = [t["time_to_target_s"] for t in rows if t["time_to_target_s"] is not None]
        ax.plot(xs, ys, "o-", color=COLORS[method], label=label)
        for t in rows:
            if t["time_to_target_s"] is None:
                ax.plot([t["cores"]], [t["budget_s"]], "^", color=COLORS[method], ms=9, mfc="none")
        for t in (t for t in over if t["method"] == method):  # side by side, right of their core count
            y = t["time_to_target_s"] if t["time_to_target_s"] is not None else t["budget_s"]
            ax.plot([t["cores"] + 0.1 + 0.07 * i], [y], "s" if t["time_to_target_s"] is not None else "^",
                    color=COLORS[method], mfc="none", ms=8)
    if over:
        t = over[0]
        ax.annotate(f"right of {t['cores']}: R={t['replicas']} replicas,\noversubscribed (hollow)",
                    (t["cores"] + 0.1, min(budget, *(o["time_to_target_s"] or budget for o in over)) - 9),
                    fontsize=7, color="gray")
    ax.axhline(budget, color="gray", ls=":", lw=0.8)
    ax.plot([], [], "^", color="gray", mfc="none", ms=8, label=f"not reached in the {budget:g} s budget (dotted)")
    ax.set_xticks(core_counts)
    ax.set_xlim(core_counts[0] - 0.2, core_counts[-1] + 0.6)
    ax.set_ylim(top=budget + 8)
    ax.set_xlabel("cores (the job pinned with taskset; R = cores replicas + 1 shard)")
    ax.set_ylabel(f"seconds to {100 * target:.1f}% test accuracy")
    ax.set_title("Time to the serial baseline's accuracy, Fashion-MNIST MLP")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)

if __name__ == "__main__":
    main()
