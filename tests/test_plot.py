"""dbmpi plot: a PNG from a run directory's metrics (Downpour and Sandblaster records)."""
import json

import pytest

from dbmpi.cli import main
from dbmpi.io.rundir import rank_metrics_name

pytest.importorskip("matplotlib")  # the plot extra; scripts/install.sh installs it


def write_metrics(run_dir, records, ranks=3):
    """The records spread over `ranks` per-rank files, as a distributed run writes them."""
    (run_dir / "metrics").mkdir(parents=True)
    for rank in range(ranks):
        mine = records[rank::ranks]
        (run_dir / rank_metrics_name(rank)).write_text("".join(json.dumps(r) + "\n" for r in mine))


def test_downpour_run(tmp_path, capsys):
    records = [{"time": 0.1 * i, "kind": "train", "replica": 0, "partition": 0, "step": 100 * i,
                "loss": 1.0 / i, "elapsed_s": 0.1 * i} for i in range(1, 6)]
    records += [{"time": 2.0, "kind": "train", "replica": 1, "partition": 0, "step": 100 * i,
                 "loss": 1.1 / i, "elapsed_s": 0.11 * i} for i in range(1, 6)]
    records += [{"time": 0.3, "kind": "eval", "source": "replica 0", "test_accuracy": 0.8, "step": 300},
                {"time": 2.1, "kind": "eval", "source": "shards", "test_accuracy": 0.9},
                {"time": 2.0, "kind": "shard", "shard": 0, "staleness_histogram": {"0": 5, "1": 3, "2-3": 1},
                 "merged_histogram": {"1": 7, "2-3": 1}},
                {"time": 0.25, "kind": "checkpoint", "step": 200, "stall_s_by_shard": [0.004]},
                {"time": 0.45, "kind": "checkpoint", "step": 400, "stall_s_by_shard": [0.006]}]
    write_metrics(tmp_path / "run", records)
    assert main(["plot", str(tmp_path / "run")]) == 0
    png = tmp_path / "run" / "metrics.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert f"wrote {png}" in capsys.readouterr().out


def test_sandblaster_run_and_errors(tmp_path, capsys):
    records = [{"time": 0.2 * i, "kind": "iteration", "iteration": i, "loss": 2.0 / (i + 1)} for i in range(8)]
    write_metrics(tmp_path / "run", records, ranks=1)
    assert main(["plot", str(tmp_path / "run"), "--out", str(tmp_path / "x.png")]) == 0
    assert (tmp_path / "x.png").exists()
    assert main(["plot", str(tmp_path / "missing")]) == 2
    assert "no metrics (not a run directory?)" in capsys.readouterr().err
    (tmp_path / "bad").mkdir()  # an older run directory: one metrics.jsonl
    (tmp_path / "bad" / "metrics.jsonl").write_text("{not json\n")
    assert main(["plot", str(tmp_path / "bad")]) == 2
    assert "metrics.jsonl:1: not a JSON line" in capsys.readouterr().err
