"""The command line: help, subcommands, and one clear error line for bad input."""
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run(*args, cwd=None, timeout=120, module=True):
    cmd = [sys.executable, "-m", "dbmpi", *map(str, args)] if module else ["dbmpi", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)


def test_help_lists_subcommands():
    result = run("--help")
    assert result.returncode == 0
    for command in ("train", "model", "data", "version"):
        assert command in result.stdout
    for sub in (["train", "--help"], ["data", "prepare", "--help"], ["model", "--help"]):
        assert run(*sub).returncode == 0


@pytest.mark.skipif(shutil.which("dbmpi") is None, reason="dbmpi console script not on PATH")
def test_console_script_matches_module():
    assert run("version", module=False).stdout == run("version").stdout
    assert run("version").stdout.startswith("dbmpi ")


def test_model_summary_of_the_speech_model():
    result = run("model", ROOT / "configs/speech.toml", "--tensors")
    assert result.returncode == 0, result.stderr
    assert "41,777,152 parameters" in result.stdout
    assert "softmax4.W" in result.stdout and "(8192, 2560)" in result.stdout


def test_data_prepare_and_info(tmp_path):
    result = run("data", "prepare", "digits", "--out", tmp_path / "d.h5", "--seed", "1")
    assert result.returncode == 0, result.stderr
    assert "1438 train + 359 test" in result.stdout
    info = json.loads(run("data", "info", tmp_path / "d.h5", "--json").stdout)
    assert info["n_classes"] == 10 and info["input_shape"] == [8, 8, 1]
    assert info["layout"] == "NHWC" and info["x_range"] == [0.0, 1.0] and "load_digits" in info["description"]


def test_data_info_is_a_short_summary(tmp_path):
    """Not 38 lines of JSON, mostly class names: a few lines a person reads, with the
    description, the layout and the value range."""
    assert run("data", "prepare", "digits", "--out", tmp_path / "d.h5").returncode == 0
    result = run("data", "info", tmp_path / "d.h5")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) <= 5, result.stdout
    assert lines[0] == f"{tmp_path / 'd.h5'}: digits, 1,438 train + 359 test examples"
    assert "load_digits" in lines[1]
    assert "input shape (8, 8, 1), layout NHWC, x in [0, 1]; x = pixel / 16" in lines[2]
    assert lines[3] == "  10 classes: 0, 1, 2, 3, 4, 5, 6, 7, 8, 9"


def error_line(result):
    assert result.returncode == 2, (result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dbmpi: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_bad_config_gives_one_error_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text((ROOT / "configs/mlp_digits.toml").read_text().replace('type = "dense"', 'type = "conv"', 1))
    line = error_line(run("train", bad, "--run-dir", tmp_path / "r"))
    assert "model.layers[0].type: unknown layer type 'conv'" in line
    assert not (tmp_path / "r").exists()  # nothing written for a config that cannot run


def test_bad_data_errors(tmp_path):
    line = error_line(run("data", "prepare", "mnist-2", "--out", tmp_path / "x.h5"))
    assert "unknown data source 'mnist-2'" in line
    line = error_line(run("data", "prepare", "fashion-mnist", "--source-dir", tmp_path / "none",
                          "--out", tmp_path / "x.h5"))
    assert "dataset-fashion-mnist" in line
    not_hdf5 = tmp_path / "x.h5"
    not_hdf5.write_text("hello")
    assert "x.h5" in error_line(run("data", "info", not_hdf5))
    line = error_line(run("data", "prepare", "fashion-mnist", "--seed", "3", "--out", tmp_path / "y.h5"))
    assert "--seed does not apply to this source; it takes --source-dir (and --out)" in line


def test_mismatched_model_and_data(tmp_path):
    line = error_line(run("train", ROOT / "configs/mlp_fashion.toml", "--run-dir", tmp_path / "r",
                          "--set", f"data.path={tmp_path / 'd.h5'}", "--set", "data.source=digits"))
    assert "model.input_shape: [784] does not match" in line


def test_run_directory_is_never_overwritten(tmp_path):
    args = ("train", ROOT / "configs/mlp_digits.toml", "--run-dir", tmp_path / "r", "--quiet",
            "--set", "train.steps=5", "--set", f"data.path={tmp_path / 'd.h5'}")
    assert run(*args).returncode == 0
    before = (tmp_path / "r" / "metrics" / "rank-00000.jsonl").read_text()
    assert "already holds a run" in error_line(run(*args))
    assert (tmp_path / "r" / "metrics" / "rank-00000.jsonl").read_text() == before


def test_a_runs_config_toml_trains_again_as_it_is(tmp_path):
    """config.toml in a run directory is complete (eval_every written out, data.path
    absolute) and holds no run_dir, so training it again makes a new run, from anywhere."""
    config = tmp_path / "configs" / "c.toml"
    config.parent.mkdir()
    text = (ROOT / "configs/mlp_digits.toml").read_text().replace("epochs = 30", "steps = 5")
    config.write_text(text + f'run_dir = "{tmp_path / "first"}"\n')
    assert run("train", config, "--quiet", "--set", f"data.path={tmp_path / 'digits.h5'}").returncode == 0
    written = (tmp_path / "first" / "config.toml").read_text()
    assert "run_dir" not in written and 'eval_every = "epoch"' in written
    assert f'path = "{tmp_path / "digits.h5"}"' in written
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    again = run("train", tmp_path / "first" / "config.toml", "--run-dir", tmp_path / "second", "--quiet",
                cwd=elsewhere)
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "second" / "config.toml").read_text() == written


def test_data_path_is_relative_to_the_config_file_and_evaluate_hints_at_data(tmp_path):
    """A config's relative data.path is found from any directory; a checkpoint whose data
    set is not there says to give --data."""
    from dbmpi.io.checkpoint import CheckpointWriter
    from dbmpi.model import Network

    (tmp_path / "configs").mkdir()
    config = tmp_path / "configs" / "c.toml"
    config.write_text((ROOT / "configs/mlp_digits.toml").read_text().replace("epochs = 30", "steps = 5"))
    elsewhere = tmp_path / "a" / "b"  # ../data is not there
    elsewhere.mkdir(parents=True)
    result = run("train", config, "--run-dir", tmp_path / "r", "--quiet", cwd=elsewhere)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "digits.h5").is_file()  # ../data/digits.h5 from configs/, prepared there
    network = Network.from_toml(config)
    text = (ROOT / "configs/mlp_digits.toml").read_text()  # path = "../data/digits.h5", as old runs kept it
    with CheckpointWriter(tmp_path / "c.h5", network.tensors, algorithm="sgd", step=5, config_text=text,
                          layout={}) as writer:
        writer.write_vector("params", [(0, network.params)])
        writer.commit()
    line = error_line(run("evaluate", tmp_path / "c.h5", cwd=elsewhere))
    assert "../data/digits.h5" in line and "give one with --data FILE" in line
    result = run("evaluate", tmp_path / "c.h5", "--data", tmp_path / "data" / "digits.h5", cwd=elsewhere)
    assert result.returncode == 0 and "accuracy" in result.stdout, result.stderr


def mpiexec_or_skip() -> Path:
    """The environment's mpiexec (the PyPI MPICH wheel's), else the one on PATH."""
    mpiexec = Path(sys.executable).with_name("mpiexec")
    if not mpiexec.exists():
        mpiexec = shutil.which("mpiexec")
    if not mpiexec:
        pytest.skip("no mpiexec")
    return Path(mpiexec)


def test_sgd_under_mpiexec_fails_fast_on_every_rank(tmp_path):
    """The single-process baseline refuses several ranks: same message on each, no hang."""
    mpiexec = mpiexec_or_skip()
    start = time.monotonic()
    result = subprocess.run(
        [str(mpiexec), "-n", "2", sys.executable, "-m", "mpi4py", "-m", "dbmpi", "train",
         str(ROOT / "configs/mlp_digits.toml"), "--run-dir", str(tmp_path / "r")],
        capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0
    assert time.monotonic() - start < 60
    lines = [line for line in result.stderr.splitlines() if line.startswith("dbmpi: error:")]
    assert len(lines) == 2 and lines[0] == lines[1], result.stderr
    assert "2 MPI ranks" in lines[0]
    assert not (tmp_path / "r").exists()


def test_an_mpi_without_thread_support_is_one_line_on_every_rank(tmp_path):
    """mpi4py asked for MPI_THREAD_SINGLE: refused before any collective, on each rank."""
    mpiexec = mpiexec_or_skip()
    result = subprocess.run(
        [str(mpiexec), "-n", "2", sys.executable, "-m", "mpi4py", "-m", "dbmpi", "train",
         str(ROOT / "configs/downpour_digits.toml"), "--run-dir", str(tmp_path / "r"),
         "--set", "train.n_replicas=1", "--set", "train.n_shards=1"],
        capture_output=True, text=True, timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1", "MPI4PY_RC_THREAD_LEVEL": "single"})
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("dbmpi: error:")]
    assert len(lines) == 2 and lines[0] == lines[1], result.stderr
    assert "MPI_THREAD_SINGLE" in lines[0] and "MPI4PY_RC_THREAD_LEVEL" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "r").exists()


def test_mpichs_progress_thread_needs_thread_multiple(monkeypatch):
    from mpi4py import MPI

    from dbmpi.runtime import comm

    monkeypatch.setattr(MPI, "Query_thread", lambda: MPI.THREAD_FUNNELED)
    comm.require_thread_support({})  # enough for dbmpi itself
    with pytest.raises(comm.ThreadSupportError, match="MPIR_CVAR_ASYNC_PROGRESS=1 .* MPI_THREAD_MULTIPLE"):
        comm.require_thread_support({"MPIR_CVAR_ASYNC_PROGRESS": "1"})
    monkeypatch.setattr(MPI, "Query_thread", lambda: MPI.THREAD_MULTIPLE)
    comm.require_thread_support({"MPIR_CVAR_ASYNC_PROGRESS": "1"})


def test_plan_prints_the_partition_plan_only_when_partitioned():
    config = ROOT / "configs/downpour_fashion.toml"
    plain = run("plan", config)
    assert plain.returncode == 0, plain.stderr
    assert "model parallelism" not in plain.stdout
    split = run("plan", config, "--set", "train.n_partitions=3")
    assert split.returncode == 0, split.stderr
    assert "model parallelism: 3 partition(s)" in split.stdout and "[0,171) [171,342) [342,512)" in split.stdout
    line = error_line(run("plan", config, "--set", "train.n_partitions=11"))
    assert "train.n_partitions: 11 partitions but layer softmax2 (model.layers[2])" in line


@pytest.mark.parametrize("threads", ["0", "-4"])
def test_threads_below_one_is_refused_like_the_config_key(tmp_path, threads):
    line = error_line(run("train", ROOT / "configs/mlp_digits.toml", "--run-dir", tmp_path / "r",
                          "--threads", threads))
    assert f"train.threads: must be a positive integer, got {threads}" in line
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("override", ["model.layers[0].units=1000000000000",
                                      "model.layers[0].units=100000000000000000000",
                                      "model.input_shape=[1000000,1000000,1]"])
def test_a_model_larger_than_the_machine_is_refused_before_allocating(tmp_path, override):
    args = ("--set", override, "--set", f"data.path={tmp_path / 'd.h5'}")
    line = error_line(run("train", ROOT / "configs/mlp_digits.toml", "--run-dir", tmp_path / "r", *args))
    assert "parameters (values and gradient, float32) need" in line and "but this machine has" in line
    assert not (tmp_path / "r").exists() and not (tmp_path / "d.h5").exists()
    plan = run("plan", ROOT / "configs/downpour_digits.toml", *args)  # plan describes it all the same
    assert plan.returncode == 0 and "shard 1" in plan.stdout, plan.stderr


def test_a_read_only_run_directory_is_one_line(tmp_path):
    def writable(directory):
        try:
            (directory / "probe").touch()
        except OSError:
            return False
        (directory / "probe").unlink()
        return True

    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    if writable(read_only):  # root ignores the mode bits; sysfs refuses root too
        read_only = Path("/sys/kernel")
        if not read_only.is_dir() or writable(read_only):
            pytest.skip("no directory this user cannot write to")
    line = error_line(run("train", ROOT / "configs/mlp_digits.toml", "--run-dir", read_only,
                          "--set", f"data.path={tmp_path / 'd.h5'}", "--set", "train.steps=2"))
    assert f"{read_only}: cannot write the run there" in line


UNEXPECTED_ERROR_ON_RANK_1 = """
import sys
from mpi4py import MPI
from dbmpi import cli

def fail_on_rank_1(args):
    if MPI.COMM_WORLD.rank == 1:
        raise KeyError("injected")
    MPI.COMM_WORLD.Barrier()  # rank 0 waits for a rank that will never come
    return 0

cli.cmd_version = fail_on_rank_1
sys.exit(cli.main(["version"]))
"""


def test_an_unexpected_error_on_one_rank_ends_the_whole_job_under_the_script(tmp_path):
    """The `dbmpi` script is cli.main without `python -m mpi4py`: an unexpected error on one
    rank must abort the job (MPI_Abort), not leave the others waiting forever."""
    from tests.test_downpour import mpiexec

    start = time.monotonic()
    result = subprocess.run([mpiexec(), "-n", "2", sys.executable, "-c", UNEXPECTED_ERROR_ON_RANK_1],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode != 0 and time.monotonic() - start < 60
    assert "KeyError: 'injected'" in result.stderr
