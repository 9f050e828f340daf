"""Figure 4 at our scale: test accuracy against wall time on Fashion-MNIST (the 784-512-512-10
MLP) for single-replica SGD, Downpour SGD, Downpour with Adagrad and Sandblaster L-BFGS, all
from one warm-start checkpoint, as in the paper; PyTorch CPU SGD and L-BFGS on the same
cores beside them (skipped, and said so, without torch).

    python bench/paper/fig4_accuracy_time.py [--quick] [--budget S] [--replicas R]

Every method gets the same wall-time budget and both cores: the single replica with two
BLAS threads, Downpour R = 2 replicas + 1 shard (3 ranks), Sandblaster R = 2 + 1 shard
+ 1 coordinator (4 ranks), PyTorch with two threads. Writes bench/paper/results/fig4.json
and docs/img/paper/fig4.png (fig4_quick.* with --quick).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fashion  # noqa: E402
from common import FIGURES, machine, output_name, pyplot, write_result  # noqa: E402

STYLE = {"sgd": ("k", "-"), "downpour_sgd": ("C0", "-"), "downpour_adagrad": ("C3", "-"),
         "downpour_nesterov": ("C1", "-"), "downpour_adam": ("C4", "-"),
         "sandblaster": ("C2", "-"), "torch_sgd": ("k", ":"), "torch_lbfgs": ("C2", ":")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="15 s per method instead of 60")
    parser.add_argument("--budget", type=float, help="seconds of training per method")
    parser.add_argument("--replicas", type=int, default=2, help="Downpour and Sandblaster replicas (default 2)")
    parser.add_argument("--threads", type=int, default=2, help="BLAS/torch threads of the one-process runs")
    args = parser.parse_args()
    budget = args.budget or (15.0 if args.quick else 60.0)
    warm = fashion.warmstart()
    print(f"fig4: warm start {warm['checkpoint']} at {warm['test_accuracy']:.4f}; {budget:g} s per method",
          file=sys.stderr, flush=True)

    runs = {}
    runs["sgd"] = fashion.run_method("sgd", warm, budget, threads=args.threads)
    for method in (*fashion.DOWNPOUR, "sandblaster"):
        runs[method] = fashion.run_method(method, warm, budget, replicas=args.replicas, shards=1)
        print(f"fig4: {method} {runs[method]['final_accuracy']:.4f}", file=sys.stderr, flush=True)
    skipped = None
    if fashion.torch_available():
        runs["torch_sgd"] = fashion.torch_sgd(warm, budget, threads=args.threads)
        runs["torch_lbfgs"] = fashion.torch_lbfgs(warm, budget, threads=args.threads)
    else:
        skipped = "torch is not installed: the PyTorch references were skipped"
        print(f"fig4: {skipped}", file=sys.stderr)

    result = {"experiment": "fig4", "quick": args.quick, "budget_s": budget, "cores": 2,
              "replicas": args.replicas, "threads": args.threads, "warmstart": warm,
              "settings": fashion.settings(), "torch_skipped": skipped,
              "final_accuracy": {k: r["final_accuracy"] for k, r in runs.items()},
              "best_accuracy": {k: r["best_accuracy"] for k, r in runs.items()},
              "runs": runs, "machine": machine()}
    if "torch_sgd" in runs:
        result["sgd_final_vs_torch"] = round(runs["sgd"]["final_accuracy"] - runs["torch_sgd"]["final_accuracy"], 4)
        result["sandblaster_final_vs_torch_lbfgs"] = round(
            runs["sandblaster"]["final_accuracy"] - runs["torch_lbfgs"]["final_accuracy"], 4)
    write_result(output_name("fig4", args.quick), result)

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for key, r in runs.items():
        color, ls = STYLE[key]
        where = (f"R={r['replicas']}, {r['ranks']} ranks" if "replicas" in r
                 else f"{r.get('threads', r.get('blas_threads'))} threads")
        ax.plot([c[0] for c in r["curve"]], [c[1] for c in r["curve"]], ls=ls, color=color, marker=".",
                label=f"{r['label']} ({where}): {r['final_accuracy']:.3f}")
    ax.set_xlabel("wall time from the warm start (s)")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(max(0.0, warm["test_accuracy"] - 0.02), None)
    ax.set_title(f"Fashion-MNIST MLP from one warm start ({warm['test_accuracy']:.3f}), 2 cores")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(FIGURES / f"{output_name('fig4', args.quick)}.png", dpi=110)


if __name__ == "__main__":
    main()
