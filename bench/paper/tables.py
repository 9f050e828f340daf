"""Print the Markdown tables of docs/RESULTS.md from bench/paper/results/*.json (so the
numbers in the document are the measured ones).

    python bench/paper/tables.py [--quick] [fig3 fig4 fig5 speech]
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS  # noqa: E402


def load(name):
    path = RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None


def fig3(r):
    print(f"ranks {r['ranks']}, cores {r['cores']}, {r['mpi']}; `{r['command']}`\n")
    print("| model | parameters | batch | P | step (ms) | speed-up | vs P=1 with 2 BLAS threads | "
          "compute per partition (ms) | in MPI per partition (ms) | bytes sent+received per step (all partitions) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for key, m in r["models"].items():
        for p, row in sorted(m["by_partitions"].items(), key=lambda kv: int(kv[0])):
            print(f"| {key} | {m['n_params']:,} | {m['batch']} | {p} | {row['step_ms']:.1f} | "
                  f"{row['speedup']:.2f} | {row['speedup_vs_p1_2threads']:.2f} | "
                  f"{', '.join(f'{c:.1f}' for c in row['compute_ms_per_partition'])} | "
                  f"{', '.join(f'{c:.1f}' for c in row['mpi_ms_per_partition'])} | "
                  f"{row['bytes_per_step_total']:,} |")
        if m.get("step_ms_p1_2threads"):
            print(f"| {key} | | | 1, 2 BLAS threads | {m['step_ms_p1_2threads']:.1f} | | | | | |")
        for p, why in m.get("skipped_partitions", {}).items():
            print(f"| {key} | | | {p} | skipped: {why} | | | | | |")


def _time_to(curve, target):
    for t, a in curve:
        if a >= target:
            return t
    return None


def fig4(r):
    w = r["warmstart"]
    print(f"budget {r['budget_s']:g} s per method; warm start {w['test_accuracy']:.4f} "
          f"({w['steps']} steps, `{Path(w['checkpoint']).name}`)\n")
    print("| method | layout | final test accuracy | best on the curve | seconds to 85% | seconds to 86% | work done |")
    print("|---|---|---|---|---|---|---|")
    for run in r["runs"].values():
        if "replicas" in run:
            layout = (f"R={run['replicas']}, S={run['shards']}" + (", +1 coordinator" if run.get("coordinator") else "")
                      + f": {run['ranks']} ranks")
        else:
            layout = f"1 process, {run.get('threads', run.get('blas_threads'))} threads"
        summ = run.get("summary", {})
        if "replica_steps" in run:  # Downpour: steps per replica (the counter went on from the warm start)
            work = "steps per replica " + ", ".join(str(n - r["warmstart"]["steps"]) for n in run["replica_steps"])
        elif "iterations" in run or "iterations" in summ:
            work = f"{run.get('iterations', summ.get('iterations'))} iterations"
            if "evaluations" in summ or "gradient_evaluations" in run:
                work += f", {summ.get('evaluations', run.get('gradient_evaluations'))} batch gradients"
        else:
            work = f"{run.get('steps', summ.get('steps'))} steps"
        t85, t86 = _time_to(run["curve"], 0.85), _time_to(run["curve"], 0.86)
        print(f"| {run['label']} | {layout} | {run['final_accuracy']:.4f} | {run['best_accuracy']:.4f} | "
              f"{'-' if t85 is None else f'{t85:.1f}'} | {'-' if t86 is None else f'{t86:.1f}'} | {work} |")
    if r.get("torch_skipped"):
        print(f"\n{r['torch_skipped']}")


def fig5(r):
    print(f"target {100 * r['target']:.1f}%: {r['target_choice']} (it reached {r['serial_final_accuracy']:.4f}); "
          f"other runs {r['budget_s']:g} s each\n")
    print("| method | cores | replicas | ranks | seconds to target | final accuracy |")
    print("|---|---|---|---|---|---|")
    for t in r["table"]:
        over = " (oversubscribed)" if t["oversubscribed"] else ""
        tt = "not reached" if t["time_to_target_s"] is None else f"{t['time_to_target_s']:.1f}"
        label = {"sgd": "single-replica SGD", "downpour_sgd": "Downpour SGD", "downpour_adagrad": "Downpour + Adagrad",
                 "downpour_nesterov": "Downpour + Nesterov", "downpour_adam": "Downpour + Adam",
                 "sandblaster": "Sandblaster L-BFGS"}[t["method"]]
        print(f"| {label} | {t['cores']} | {t['replicas'] or 1} | {t['ranks']}{over} | {tt} | "
              f"{t['final_accuracy']:.4f} |")


def speech(r):
    print(f"R={r['replicas']}, S={r['shards']}, {r['epochs']} epochs, {r['wall_time_s']} s: frame accuracy "
          f"{r['frame_accuracy']:.4f} ({r['test_frames']} test frames), utterance accuracy "
          f"{r['utterance_accuracy']:.4f} ({r['test_utterances']} test utterances)")


def main():
    quick = "--quick" in sys.argv
    names = [a for a in sys.argv[1:] if a != "--quick"] or ["fig3", "fig4", "fig5", "speech"]
    for name in names:
        r = load(f"{name}_quick" if quick else name)
        print(f"\n### {name}\n")
        if r is None:
            print("(no results)")
            continue
        globals()[name](r)


if __name__ == "__main__":
    main()
