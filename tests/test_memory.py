"""Memory per rank (dbmpi.runtime.memory): the formula `dbmpi plan` reports, its scaling by
role (O(N/S) on every shard, shard 0 included; O(own parameters) on a partition, nothing on
the coordinator), and a real Downpour run of a 259M-parameter model whose every rank's
measured peak RSS is within 10% of the plan's figure, both ways (the same run with P = 2 is
in bench/scale_memory.py)."""
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from dbmpi import config as configuration
from dbmpi.algorithms.optimizers import make_optimizer
from dbmpi.model import Network
from dbmpi.parallel.partition import plan_for
from dbmpi.runtime.layout import layout_for
from dbmpi.runtime.memory import OPTIMIZER_STATE, WINDOW_ALIGN, DataSize, MemoryModel, padded
from tests.rss_probe import MemoryShort, dense_run_config, measure, meminfo, mpiexec, run_guarded

ROOT = Path(__file__).resolve().parents[1]

SMALL_DATA = DataSize(1000, 50)


def model_of(path: Path, data: DataSize | None = SMALL_DATA, baseline: int = 0,
             **train) -> MemoryModel:
    cfg = configuration.load(path, [f"train.{key}={value}" for key, value in train.items()])
    tcfg = cfg["train"]
    network = Network(cfg["model"], allocate=False)
    layout = layout_for(tcfg, network.n_params, coordinator=tcfg["algorithm"] == "sandblaster")
    plan = plan_for(tcfg, network) if layout.n_partitions > 1 else None
    return MemoryModel(layout, network, tcfg, plan, data, baseline)


def test_the_constants_are_the_codes():
    """The window line and the optimizer state the model counts are what the code allocates."""
    windows = (ROOT / "dbmpi/ps/windows.py").read_text()
    assert re.search(rf"^ALIGN_VALUES = {WINDOW_ALIGN}$", windows, re.M)
    for name, vectors in OPTIMIZER_STATE.items():
        tcfg = {"optimizer": name, "learning_rate": 0.1, "momentum": 0.9, "adagrad_eps": 1e-8, "adagrad_initial": 0.1,
                "adam_beta1": 0.9, "adam_beta2": 0.999, "adam_eps": 1e-8, "adamw_weight_decay": 0.01}
        state = make_optimizer(tcfg, 10).state
        assert sum(v.size for v in state.values()) == 10 * vectors
    assert padded(1) == WINDOW_ALIGN and padded(WINDOW_ALIGN + 1) == 2 * WINDOW_ALIGN


def test_a_shard_holds_o_n_over_s_and_a_partition_its_own_share(tmp_path):
    path = dense_run_config(tmp_path, units=1000)
    n = model_of(path).network.n_params

    def shard1(shards, optimizer="adagrad"):
        mem = model_of(path, n_shards=shards, optimizer=optimizer).ranks()
        return next(m for m in mem if m.role.is_shard and m.role.shard == 1)

    # Shard k > 0: two windows, working copy, drain buffer, state, snapshot of its slice.
    assert shard1(2).own == pytest.approx(4 * (2 + 1 + 1 + 1 + 2) * n / 2, abs=64 * 8)
    assert shard1(4).own * 4 == pytest.approx(shard1(2).own * 2, rel=1e-3)
    assert shard1(4, "sgd").own < shard1(4, "adagrad").own
    # Shard 0 writes its slice file like the others (the top-level file holds no values)
    # and scores nothing: its parts are shard 1's.
    both = [m for m in model_of(path, n_shards=2).ranks() if m.role.is_shard]
    assert [dict(m.parts) for m in both] == [dict(both[1].parts)] * 2
    four = next(m for m in model_of(path, n_shards=4).ranks() if m.role.is_shard)
    assert four.role.shard == 0 and four.own * 2 == pytest.approx(both[0].own, rel=1e-3)  # O(N/S), not O(N)
    whole = model_of(path).ranks()[0]
    assert dict(whole.parts)["parameters, gradient, 2 accrued pushes"] == 16 * n
    assert whole.mapped == 2 * 4 * sum(padded(b - a) for a, b in model_of(path).layout.shard_ranges)
    # Partitions: each its own share of the vectors (dense layers split by units).
    split = model_of(path, n_partitions=2)
    for p in range(2):
        mem = split.rank(p)
        assert dict(mem.parts)["parameters, gradient, 2 accrued pushes"] == 16 * split.plan.n_params_of(p)
        assert mem.mapped < whole.mapped


def test_every_worker_holds_a_test_piece_and_partitions_share_the_slice(tmp_path):
    """The split final evaluation: every worker scores pieces of eval_batch_size test rows
    (replica 0 also keeps the test set for its periodic evaluation); with a dense first
    layer and P > 1 each partition keeps 1/P of its replica's slice."""
    path = dense_run_config(tmp_path, units=1000)
    data = DataSize(10_000, 500)
    example = 4 * 1024 + 4
    two = model_of(path, data, n_replicas=2, eval_batch_size=50).ranks()
    for worker in two[:2]:
        parts = dict(worker.parts)
        assert parts["test piece"] == 50 * example
        assert parts["training data (slice, minibatches)"] == (5000 + 2 * 8) * example
    assert dict(two[0].parts)["test set"] == 500 * example and "test set" not in dict(two[1].parts)
    split = model_of(path, data, n_partitions=2).ranks()
    for p in range(2):
        data_bytes = dict(split[p].parts)["training data (slice, minibatches)"]
        assert (5000 + 2 * 8) * example < data_bytes < (10_000 + 2 * 8) * example // 2 + 8 * 8 * example
    sandblaster = model_of(path, data, algorithm="sandblaster", iterations=2, n_replicas=2, portion_size=16).ranks()
    for worker in sandblaster[:2]:
        assert dict(worker.parts)["test piece"] == 50 * example and "test set" not in dict(worker.parts)


def test_sandblaster_coordinator_holds_no_model_vector(tmp_path):
    path = dense_run_config(tmp_path, units=1000)
    mem = model_of(path, algorithm="sandblaster", iterations=2, n_replicas=2, baseline=5).ranks()
    coordinator = mem[-1]
    assert coordinator.role.is_coordinator and coordinator.own == 0 and coordinator.resident == 5
    assert all(m.own > 0 for m in mem[:-1])


def test_plan_without_the_data_file_says_what_it_leaves_out(tmp_path):
    path = dense_run_config(tmp_path, units=1000)
    out = subprocess.run([sys.executable, "-m", "dbmpi", "plan", str(path), "--json"], capture_output=True,
                         text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert "data file is not there yet" in out.stdout
    memory = json.loads(out.stdout.strip().splitlines()[-1])["memory"]
    assert [m["role"] for m in memory] == ["replica 0 partition 0", "shard 0", "shard 1"]
    assert all(m["baseline"] > 10 * 2**20 for m in memory)  # measured: python, numpy, h5py, ...


def test_the_probe_stops_a_run_when_the_machine_runs_short_of_memory(tmp_path):
    """tests/rss_probe.run_guarded: a run ends normally with its status and output; below
    the floor of available memory it is killed (its whole process group) and MemoryShort
    says how much the run held."""
    code, output = run_guarded([sys.executable, "-c", "print('done'); raise SystemExit(3)"], tmp_path, 60, [])
    assert (code, output.strip()) == (3, "done")
    pid_file = tmp_path / "child.pid"
    sleeper = f"import os, subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; " \
              f"time.sleep(120)']); open({str(pid_file)!r}, 'w').write(str(p.pid)); time.sleep(120)"
    began = time.monotonic()
    with pytest.raises(MemoryShort) as short:
        run_guarded([sys.executable, "-c", sleeper], tmp_path, 60, [{"resident": 1}], floor=1 << 62)
    assert time.monotonic() - began < 30 and short.value.run_rss > 1 << 20  # python's own pages
    deadline = time.monotonic() + 10
    while pid_file.exists() and Path(f"/proc/{pid_file.read_text()}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)  # the grandchild was killed with its group (a zombie until reaped by init)
    if pid_file.exists():
        status = Path(f"/proc/{pid_file.read_text()}/status")
        assert not status.exists() or "zombie" in status.read_text()


def enough_memory(plan: list[dict]) -> None:
    """Skip (saying why) unless the machine has room for the run: every rank's own buffers
    and interpreter, shared windows counted once, and a fifth more."""
    need, available = sum(rank["own"] + rank["baseline"] for rank in plan), meminfo()
    if available < 1.2 * need:
        pytest.skip(f"the run needs {need / 2**30:.1f} GiB of memory (+20%), the machine has "
                    f"{available / 2**30:.1f} GiB available")


@pytest.mark.slow
def test_every_ranks_peak_rss_is_the_plans_on_a_259m_parameter_model(tmp_path):
    """R = 1, S = 2, P = 1 on two dense layers (258,750,010 parameters, 1.04 GB of float32;
    about 9 GB at peak in all): the plan's figure for each rank (its buffers, the shard
    windows a worker maps, the measured interpreter) is within 10% of the rank's measured
    peak RSS, both ways. Skipped, saying why, where the machine has not the memory free."""
    if mpiexec() is None:
        pytest.skip("no mpiexec")
    try:
        ranks = measure(tmp_path, units=250_000, shards=2, partitions=1, enough=enough_memory)
    except MemoryShort as short:  # another process took the memory: skip, unless it was this run
        assert short.run_rss <= 1.1 * sum(rank["resident"] for rank in short.plan), str(short)
        pytest.skip(f"the machine ran short of memory: {short}")
    assert ranks[0]["parts"]["parameters, gradient, 2 accrued pushes"] == 16 * 258_750_010  # the whole model
    assert [rank["role"] for rank in ranks] == ["replica 0 partition 0", "shard 0", "shard 1"]
    for rank in ranks:
        ratio = rank["measured"] / rank["resident"]
        assert 0.9 <= ratio <= 1.1, (rank["rank"], rank["role"], rank["measured"], rank["resident"], rank["parts"])
