"""dbmpi.io.rundir: each rank's metrics file, and the reader that joins them (per-rank files,
an older run directory's single metrics.jsonl, a torn last line, the completion of Downpour's
shard and checkpoint records)."""
import json

import pytest

from dbmpi.io.rundir import (
    RankMetrics,
    RunDirectory,
    RunDirectoryError,
    holds_run,
    peak_rss_bytes,
    rank_metrics_name,
    read_metrics,
)


def test_each_rank_appends_to_its_own_file_on_one_time_axis(tmp_path):
    run = RunDirectory(tmp_path / "run")
    other = RankMetrics(tmp_path / "run", 17, run.started)
    run.log({"kind": "train", "step": 1})
    other.log({"kind": "train", "step": 2})
    # line-buffered: on disk before close (a crash keeps it)
    assert json.loads((tmp_path / "run" / "metrics" / "rank-00017.jsonl").read_text())["step"] == 2
    run.close()
    other.close()
    assert rank_metrics_name(17) == "metrics/rank-00017.jsonl"
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2] and all(0 <= r["time"] < 60 for r in records)
    assert holds_run(tmp_path / "run")
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        RunDirectory(tmp_path / "run")
    RunDirectory(tmp_path / "run", resume=True).close()  # resuming in place appends


def test_an_older_single_metrics_file_still_reads_and_counts_as_a_run(tmp_path):
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_text('{"time": 1.0, "kind": "train", "step": 5}\n')
    assert holds_run(tmp_path / "old")
    assert read_metrics(tmp_path / "old") == [{"time": 1.0, "kind": "train", "step": 5}]
    resumed = RunDirectory(tmp_path / "old", resume=True)  # a resume in place adds a rank file
    resumed.log({"kind": "resume", "step": 5})
    resumed.close()
    assert sorted(r["kind"] for r in read_metrics(tmp_path / "old")) == ["resume", "train"]


def test_a_torn_last_line_is_left_out_and_the_next_start_cuts_it(tmp_path):
    metrics = RankMetrics(tmp_path, 3, started=0.0)
    metrics.log({"kind": "train", "step": 1})
    metrics.close()
    path = tmp_path / rank_metrics_name(3)
    path.write_text(path.read_text() + '{"kind": "tra')  # killed mid-line
    assert [r["step"] for r in read_metrics(tmp_path)] == [1]
    again = RankMetrics(tmp_path, 3, started=0.0)  # a resume in place
    again.log({"kind": "train", "step": 2})
    again.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    path.write_text('{"kind": "train", "step": 1}\n{not json\n{"kind": "train", "step": 3}\n')
    with pytest.raises(RunDirectoryError, match=r"rank-00003.jsonl:2: not a JSON line"):
        read_metrics(tmp_path)  # a bad line in the middle: an error naming it
    path.write_text('{"kind": "tr')  # torn before its first newline: nothing kept
    RankMetrics(tmp_path, 3, started=0.0).close()
    assert path.read_text() == ""


def test_a_run_resumed_in_place_keeps_each_files_order(tmp_path):
    """A second start's clock begins at 0 again: records are not sorted by time."""
    first = RankMetrics(tmp_path, 0, started=0.0)
    first.log({"kind": "iteration", "iteration": 1})
    first.close()
    second = RankMetrics(tmp_path, 0, started=1e12)  # a later start: smaller `time` values
    second.log({"kind": "iteration", "iteration": 2})
    second.close()
    assert [r["iteration"] for r in read_metrics(tmp_path)] == [1, 2]


def test_no_metrics_is_an_error(tmp_path):
    with pytest.raises(RunDirectoryError, match="no metrics"):
        read_metrics(tmp_path)
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "rank-00000.jsonl").write_text("")
    with pytest.raises(RunDirectoryError, match="no records yet"):
        read_metrics(tmp_path)


def _shard(k, checkpoints):
    return {"time": 9.0, "kind": "shard", "shard": k, "n_replicas": 2, "run_started": 100.0,
            "bucket_labels": ["0", "1", "2-3"], "checkpoints": checkpoints}


def _worker(replica, shards, pushes, histograms, first):
    return {"time": 8.0, "kind": "replica", "replica": replica, "partition": 0, "run_started": 100.0,
            "shards": shards, "pushes_by_shard": pushes, "staleness_histogram_by_shard": histograms,
            "first_push_after_by_shard": first, "pushes": sum(pushes)}


def test_downpour_shard_records_are_completed_at_read_time(tmp_path):
    """What shard 0 used to add at the end: each shard's staleness histogram and pushes by
    replica from the workers' records, and one checkpoint record per checkpoint."""
    ckpt = {"step": 10, "version": 4, "stall_s": 0.01, "updates_during": 1, "max_merged_during": 1,
            "duration_s": 0.2}
    files = {0: [_shard(0, [dict(ckpt, time=3.5, file="ckpt-10.h5")])], 1: [_shard(1, [dict(ckpt, stall_s=0.03)])],
             2: [_worker(0, [0, 1], [5, 5], [[3, 2, 0], [1, 4, 0]], [0, 0])],
             3: [_worker(1, [0, 1], [2, 3], [[0, 1, 1], [0, 0, 3]], [4, -1])]}
    for rank, records in files.items():
        path = tmp_path / rank_metrics_name(rank)
        path.parent.mkdir(exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    records = read_metrics(tmp_path)
    shards = sorted((r for r in records if r["kind"] == "shard"), key=lambda r: r["shard"])
    assert shards[0]["staleness_histogram"] == {"0": 3, "1": 3, "2-3": 1}
    assert shards[1]["staleness_histogram"] == {"0": 1, "1": 4, "2-3": 3}
    assert [s["pushes_by_replica"] for s in shards] == [[5, 2], [5, 3]]
    assert [s["first_push_after"] for s in shards] == [[0, 4], [0, -1]]
    [checkpoint] = [r for r in records if r["kind"] == "checkpoint"]
    assert checkpoint["time"] == 3.5 and checkpoint["file"] == "ckpt-10.h5"
    assert checkpoint["stall_s_by_shard"] == [0.01, 0.03] and checkpoint["shard_versions"] == [4, 4]


def test_peak_rss_is_this_process_resident_memory():
    assert 10 * 2**20 < peak_rss_bytes() < 64 * 2**30
