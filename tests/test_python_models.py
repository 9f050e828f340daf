"""Python models end to end: a PyTorch CNN trained by Downpour, exported to a state_dict,
resumed and failed over; Sandblaster on a torch softmax regression against the built-in
layer; bad Python models refused on every rank. Every run is `mpiexec ... dbmpi train` in a
subprocess under a timeout."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import require_torch
from tests.test_downpour import launch, mpiexec, records
from tests.test_failover import supervised_training, verified_checkpoints, wait_until_training

torch = require_torch()

ROOT = Path(__file__).resolve().parents[1]
TORCH_CONFIG = ROOT / "configs/downpour_digits_torch.toml"
SANDBLASTER = ROOT / "configs/sandblaster_digits.toml"
FACTORIES = ROOT / "tests/torch_factories.py"


def data(tmp_path) -> str:
    return f"data.path={tmp_path / 'digits.h5'}"


def test_a_torch_cnn_trained_by_downpour_exports_to_a_state_dict_with_the_same_accuracy(tmp_path):
    """Downpour R = 2, S = 2 on the digits with a torch CNN (convolutions, which dbmpi lacks):
    at least 95% test accuracy; `dbmpi export --format torch` of its final checkpoint loads
    into a fresh module (strict) and scores the same on the test set."""
    sys.path.insert(0, str(ROOT / "examples"))
    try:
        from torch_cnn import make_cnn
    finally:
        sys.path.remove(str(ROOT / "examples"))
    from dbmpi.data import open_dataset

    run_dir = tmp_path / "run"
    result, _ = launch(4, "train", TORCH_CONFIG, "--run-dir", run_dir, "--set", data(tmp_path), cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.95, summary
    assert summary["pushes_rejected"] == 0 and all(u > 0 for u in summary["updates_by_shard"])
    assert "cnn-digits-torch (torch Sequential)" in result.stdout

    checkpoint = run_dir / "checkpoints" / summary["final_checkpoint"]
    out = subprocess.run([sys.executable, "-m", "dbmpi", "export", str(checkpoint), "--format", "torch",
                          "--out", str(tmp_path / "cnn.pt")], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    module = make_cnn(image=8, width=16, hidden=64)
    module.load_state_dict(torch.load(tmp_path / "cnn.pt"))  # strict: every key, no other
    module.eval()
    with open_dataset(tmp_path / "digits.h5") as dataset:
        x, y = dataset.load("test")
    with torch.no_grad():
        predicted = module(torch.from_numpy(x).permute(0, 3, 1, 2)).argmax(1).numpy()
    accuracy = float(np.mean(predicted == y))
    assert abs(accuracy - summary["test_accuracy"]) <= 1 / len(y), (accuracy, summary["test_accuracy"])


def test_a_torch_model_resumes_with_another_shard_count(tmp_path):
    """Checkpointed with S = 2, resumed with S = 3: the run goes on from the checkpoint's
    step with the Adam state the shards saved, its loss where the first run left it."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    sets = ["--set", data(tmp_path), "--set", "train.steps=150", "--set", "train.checkpoint_every=100"]
    result, _ = launch(4, "train", TORCH_CONFIG, "--run-dir", first, *sets, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = first / "checkpoints" / "ckpt-000000100.h5"
    assert checkpoint.exists(), sorted(p.name for p in (first / "checkpoints").iterdir())
    result, _ = launch(5, "train", TORCH_CONFIG, "--run-dir", resumed, "--set", data(tmp_path),
                       "--set", "train.steps=300", "--set", "train.n_shards=3", "--resume", checkpoint,
                       cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    before = [r for r in records(first) if r["kind"] == "train" and r["replica"] == 0]
    after = [r for r in records(resumed) if r["kind"] == "train" and r["replica"] == 0]
    assert after[0]["step"] > 100
    at_checkpoint = next(r["loss"] for r in before if r["step"] >= 100)
    assert after[0]["loss"] < 2 * at_checkpoint and after[0]["loss"] < before[0]["loss"], (before, after)
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["layout"]["n_shards"] == 3 and summary["test_accuracy"] >= 0.9, summary


def test_a_killed_replica_of_a_torch_model_does_not_stop_training(tmp_path):
    """Two replicas, two shards; replica 1 is SIGKILLed mid-run. Replica 0 finishes, the job
    reports the failed replica, and the final checkpoint is valid."""
    run_dir = tmp_path / "run"
    with supervised_training(tmp_path, run_dir, 4, "train.time_budget_s=20", "train.steps=100000000",
                             "train.n_fetch=20", "train.n_push=20", "train.log_every=200",
                             "train.checkpoint_every=1000", config=TORCH_CONFIG) as proc:
        pids = wait_until_training(run_dir, 4, proc)
        os.kill(pids[1], signal.SIGKILL)
        _, err = proc.communicate(timeout=300)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failed_replicas"] == [1], err[-3000:]
    assert proc.returncode == 128 + signal.SIGKILL, err[-3000:]
    assert summary["test_accuracy"] >= 0.9, summary
    assert "Traceback" not in err
    paths = verified_checkpoints(run_dir)
    assert paths[-1].name == summary["final_checkpoint"]


def iterations(run_dir):
    return [r for r in records(run_dir) if r["kind"] == "iteration"]


def test_sandblaster_on_a_torch_softmax_regression_follows_the_builtin_layers_iterates(tmp_path):
    """The same initial parameters, full batch: the torch model's L-BFGS iterates (losses,
    step lengths, final parameters) are the built-in softmax layer's, to float32 rounding."""
    from dbmpi.io.checkpoint import open_checkpoint

    runs = {}
    for name, sets in (("builtin", []), ("torch", ["--set", f"model.python={FACTORIES}:logistic_like_builtin"])):
        runs[name] = tmp_path / name
        result, _ = launch(5, "train", SANDBLASTER, "--run-dir", runs[name], "--set", data(tmp_path),
                           "--set", "train.iterations=15", *sets, cwd=tmp_path)
        assert result.returncode == 0, result.stderr[-3000:]
    builtin, adapted = iterations(runs["builtin"]), iterations(runs["torch"])
    assert len(builtin) == len(adapted) == 16
    for a, b in zip(builtin, adapted, strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
        assert b["step_length"] == pytest.approx(a["step_length"], rel=1e-3, abs=1e-6), (a, b)
    assert adapted[-1]["loss"] < 0.5 * adapted[0]["loss"]
    final = {}
    for name, run_dir in runs.items():
        with open_checkpoint(run_dir / "checkpoints" / "ckpt-000000015.h5") as ckpt:
            final[name] = ckpt.read_range("params", 0, ckpt.n_params)
    np.testing.assert_allclose(final["torch"], final["builtin"], rtol=1e-3, atol=1e-4)


FAKE_TORCH = 'raise ModuleNotFoundError("No module named \'torch\'", name="torch")\n'


@pytest.mark.parametrize("case", ["no-module", "factory-raises", "no-parameters", "partitions", "no-torch"])
def test_a_bad_python_model_is_one_line_on_every_rank(tmp_path, case):
    """Under mpiexec, every rank says the same one line and the job exits 2 within seconds,
    before any collective, with no run directory left behind."""
    (tmp_path / "bad.py").write_text("import torch\n"
                                     "def raises():\n    raise ValueError('no such width')\n"
                                     "def empty():\n    return torch.nn.Sequential(torch.nn.Flatten())\n")
    python, sets, env = {
        "no-module": ("not_a_package.models:make", [], {}),
        "factory-raises": (f"{tmp_path / 'bad.py'}:raises", [], {}),
        "no-parameters": (f"{tmp_path / 'bad.py'}:empty", [], {}),
        "partitions": (None, ["--set", "train.n_partitions=2"], {}),
        "no-torch": (None, [], {"PYTHONPATH": str(tmp_path / "hide")}),
    }[case]
    expected = {"no-module": "model.python: cannot import not_a_package.models",
                "factory-raises": "raised ValueError: no such width",
                "no-parameters": "has no parameters",
                "partitions": "a Python model (model.python) trains as one partition per replica",
                "no-torch": "No module named 'torch' (the PyTorch adapter needs torch: pip install"}[case]
    if case == "no-torch":
        (tmp_path / "hide/torch").mkdir(parents=True)
        (tmp_path / "hide/torch/__init__.py").write_text(FAKE_TORCH)
    if python is not None:
        sets += ["--set", f"model.python={python}"]
    ranks = 6 if case == "partitions" else 4
    env = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(filter(None, [env.get("PYTHONPATH"), str(ROOT)]))}
    start = time.monotonic()
    result = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", "-m", "dbmpi", "train",
                             str(TORCH_CONFIG), "--run-dir", str(tmp_path / "run"), "--set", data(tmp_path), *sets],
                            cwd=tmp_path, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == ranks and len(set(lines)) == 1, lines
    assert lines[0].startswith("dbmpi: error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run").exists()
    assert time.monotonic() - start < 120


def test_single_replica_sgd_trains_a_torch_model(tmp_path):
    """The one-process baseline (no MPI) with the same config: the optimizer's own step (no
    fused update for a Python model), an evaluation per epoch, a summary."""
    run_dir = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "dbmpi", "train", str(TORCH_CONFIG), "--run-dir", str(run_dir),
                             "--set", data(tmp_path), "--set", "train.algorithm=sgd", "--set", "train.epochs=4",
                             "--quiet"], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["algorithm"] == "sgd" and summary["optimizer"] == "adam" and summary["test_accuracy"] >= 0.9
    evals = [r for r in records(run_dir) if r["kind"] == "eval"]
    assert len(evals) >= 4 and evals[-1]["test_accuracy"] == summary["test_accuracy"]


def test_plan_and_model_describe_a_torch_model(tmp_path):
    """`dbmpi plan` and `dbmpi model` read a Python model's config like a built-in one's:
    the tensors in named_parameters() order, the rank layout, each rank's memory."""
    def run(*args):
        out = subprocess.run([sys.executable, "-m", "dbmpi", *map(str, args)], capture_output=True, text=True,
                             timeout=120, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return out.stdout

    described = run("model", TORCH_CONFIG, "--tensors")
    assert "(torch Sequential): input (8, 8, 1), 10 classes, 38,282 parameters" in described
    assert described.index("0.weight") < described.index("2.weight") < described.index("9.bias")
    planned = run("plan", TORCH_CONFIG, "-n", "4", "--set", data(tmp_path), "--json")
    assert "2 replica(s) x 1 partition(s) + 2 shard(s) = 4 ranks; 38,282 parameters" in planned
    memory = json.loads(planned.strip().splitlines()[-1])["memory"]
    assert len(memory) == 4 and all(rank["resident"] > 0 for rank in memory)


def write_small_checkpoint(tmp_path, config_text, model):
    """A format-2 checkpoint of `model` (values 0, 1, 2, ...) whose config is `config_text`."""
    from dbmpi.io.checkpoint import write_checkpoint, write_slice

    values = np.arange(model.n_params, dtype=np.float32)
    slices = [write_slice(tmp_path, 3, 0, 1, 0, [("params", values)])]
    return write_checkpoint(tmp_path / "ckpt-000000003.h5", model.tensors, slices, algorithm="downpour", step=3,
                            config_text=config_text, layout={}), values


def test_export_torch_of_a_builtin_network_and_of_a_model_that_is_not_torch(tmp_path):
    """A built-in network's checkpoint exports its tensors by their dbmpi names; a numpy
    model's cannot be a torch state_dict: one line, exit 2, no file."""
    from dbmpi import config as configuration
    from dbmpi.model import Network
    from dbmpi.model.loader import build_model

    text = (ROOT / "configs/mlp_digits.toml").read_text()
    builtin = Network.from_string(text)
    path, values = write_small_checkpoint(tmp_path, text, builtin)
    out = subprocess.run([sys.executable, "-m", "dbmpi", "export", str(path), "--format", "torch"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    state = torch.load(path.with_suffix(".pt"))
    assert list(state) == [t.name for t in builtin.tensors]
    np.testing.assert_array_equal(state["dense0.W"].numpy().ravel(), values[:builtin.tensors[0].size])

    numpy_model = (f'[model]\ninput_shape = [8, 8, 1]\npython = "{ROOT}/examples/numpy_softmax.py:make_model"\n'
                   '[model.args]\nhidden = 4\n')
    (tmp_path / "other").mkdir()
    model = build_model(configuration.validate(configuration.parse_toml(numpy_model), require_train=False)["model"])
    path, _ = write_small_checkpoint(tmp_path / "other", numpy_model, model)
    out = subprocess.run([sys.executable, "-m", "dbmpi", "export", str(path), "--format", "torch"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"dbmpi: error: --format torch: {ROOT}/examples/numpy_softmax.py:make_model is not a PyTorch model; "
        "use --format npz"], out.stderr
    assert not path.with_suffix(".pt").exists()
