"""The PyTorch adapter (dbmpi.model.torch_adapter) and the loader of Python models
(dbmpi.model.loader), MPI-free: gradients against torch autograd, the flat vectors shared
with the module (no copies), initial values, and bad input as one ConfigError line."""
import copy
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dbmpi import config as configuration
from dbmpi.config import ConfigError
from dbmpi.model.loader import build_model
from dbmpi.parallel.partition import PartitionError, PartitionPlan
from tests.conftest import require_torch

torch = require_torch()
nn = torch.nn

ROOT = Path(__file__).resolve().parents[2]
CNN = f"{ROOT / 'examples/torch_cnn.py'}:make_cnn"


def model_table(python=CNN, shape=(8, 8, 1), seed=0, **args):
    raw = {"model": {"input_shape": list(shape), "seed": seed, "python": python, "args": args}}
    return configuration.validate(raw, require_train=False)["model"]


class SmallCNN(nn.Module):
    """Convolution, batch norm, pooling, dropout (off) and dense layers, on (N, 3, 6, 6)."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4, track_running_stats=False),
                                      nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 6, 2), nn.Tanh())
        self.dropout = nn.Dropout(0.0)
        self.head = nn.Linear(6 * 2 * 2, 5)
        self.scale = nn.Parameter(torch.tensor(1.5))  # a parameter of the module itself

    def forward(self, x):
        return self.scale * self.head(self.dropout(self.features(x).flatten(1)))


def adapted(module, shape=(6, 6, 3)):
    from dbmpi.model.torch_adapter import TorchModel

    return TorchModel(module, shape, seed=0).allocate()


def batch(rng, n=7, shape=(6, 6, 3), classes=5):
    return rng.standard_normal((n, *shape)).astype(np.float32), rng.integers(0, classes, n).astype(np.int32)


def test_loss_and_gradient_equal_torch_autograd_on_a_small_cnn():
    torch.manual_seed(3)
    module = SmallCNN()
    reference = copy.deepcopy(module)
    model = adapted(module)
    x, y = batch(np.random.default_rng(0))
    loss = model.loss_and_grad(x, y)

    logits = reference(torch.from_numpy(x).permute(0, 3, 1, 2))  # NHWC rows -> NCHW
    expected = nn.functional.cross_entropy(logits, torch.from_numpy(y).long())
    expected.backward()
    assert loss == pytest.approx(float(expected.detach()), rel=1e-6)
    names = [t.name for t in model.tensors]
    assert names == [name for name, _ in reference.named_parameters()]
    assert "scale" in names
    for t, (name, p) in zip(model.tensors, reference.named_parameters(), strict=True):
        np.testing.assert_allclose(model.view(t, model.grad), p.grad.numpy(), rtol=1e-5, atol=1e-6, err_msg=name)
        np.testing.assert_array_equal(model.view(t, model.params), p.detach().numpy())
    # Evaluation: the module's logits in eval mode, and the mean cross-entropy.
    reference.eval()
    with torch.no_grad():
        np.testing.assert_allclose(model.forward(x), reference(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy(),
                                   rtol=1e-6, atol=1e-6)
    # (one batch: this batch norm normalises with the batch's own statistics in eval mode too)
    loss_eval, accuracy = model.evaluate(x, y, batch_size=len(x))
    assert loss_eval == pytest.approx(model.loss(x, y), rel=1e-5)
    assert accuracy == np.mean(model.predict(x) == y)


def test_the_module_reads_the_flat_vector_and_backward_writes_the_flat_gradient():
    """A fetch writes `params`: the module computes with it, no copy. The gradient lands in
    `grad` (the same memory every step) and is overwritten, not accumulated."""
    model = adapted(SmallCNN())
    x, y = batch(np.random.default_rng(1))
    model.params[:] = np.random.default_rng(2).standard_normal(model.n_params).astype(np.float32) * 0.1
    for t, p in zip(model.tensors, model.module.parameters(), strict=True):
        np.testing.assert_array_equal(p.detach().numpy(), model.view(t, model.params))
    pointers = [p.data_ptr() for p in model.module.parameters()]
    model.loss_and_grad(x, y)
    first = model.grad.copy()
    assert np.any(first != 0)
    model.loss_and_grad(x, y)
    np.testing.assert_array_equal(model.grad, first)  # overwritten, not added to
    base = model.grad.ctypes.data
    for t, p in zip(model.tensors, model.module.parameters(), strict=True):
        assert p.grad.data_ptr() == base + 4 * t.offset  # still a view into the flat gradient
    assert [p.data_ptr() for p in model.module.parameters()] == pointers
    model.params *= 0.0  # the module sees it at once
    assert all(float(p.detach().abs().sum()) == 0.0 for p in model.module.parameters())


def test_initial_values_are_the_factorys_under_the_seed_and_any_range_reads_them():
    a = build_model(model_table(seed=4), allocate=False)
    b = build_model(model_table(seed=4))
    c = build_model(model_table(seed=5), allocate=False)
    full = a.initial_values(0, a.n_params)
    np.testing.assert_array_equal(b.params, full)  # allocate() sets them
    assert not np.array_equal(full, c.initial_values(0, c.n_params))
    np.testing.assert_array_equal(a.initial_values(100, 5000), full[100:5000])
    assert [t.name for t in a.tensors][:2] == ["0.weight", "0.bias"] and a.n_classes == 10
    with pytest.raises(ValueError, match="seed"):
        a.initial_values(0, 10, seed=9)


def test_a_torch_model_refuses_more_than_one_partition():
    model = build_model(model_table(), allocate=False)
    assert PartitionPlan.for_network(model, 1).param_ranges(0) == [(0, model.n_params)]
    with pytest.raises(PartitionError, match="Python model .* one partition per replica"):
        PartitionPlan.for_network(model, 2)


def write(tmp_path, text, name="usermodel.py"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


@pytest.mark.parametrize("source,python,message", [
    (None, "no_such_package.models:make", r"cannot import no_such_package.models: No module named"),
    ("def make():\n    return 1\n", "usermodel.py:missing", r"has no attribute 'missing'"),
    ("def make(width):\n    raise RuntimeError('width too small')\n", "usermodel.py:make",
     r"usermodel.py:make\(width=2\) raised RuntimeError: width too small"),
    ("import torch\ndef make(width):\n    return torch.nn.ReLU()\n", "usermodel.py:make", r"has no parameters"),
    ("def make(width):\n    return object()\n", "usermodel.py:make", r"neither a torch.nn.Module nor a dbmpi model"),
    ("import torch\ndef make(width):\n    return torch.nn.Linear(3, 2)\n", "usermodel.py:make",
     r"Linear fails on input of shape \(2, 1, 8, 8\)"),
    ("raise SyntaxError('oops')\n", "usermodel.py:make", r"importing .*usermodel.py failed: SyntaxError"),
], ids=["no-module", "no-attribute", "factory-raises", "no-parameters", "not-a-model", "wrong-input", "bad-file"])
def test_bad_python_models_are_one_config_error(tmp_path, source, python, message):
    if source is not None:
        python = f"{write(tmp_path, source)}:{python.split(':')[1]}"
    with pytest.raises(ConfigError, match=message) as info:
        build_model(model_table(python=python, width=2), allocate=False)
    assert "\n" not in str(info.value)


def test_without_torch_a_torch_model_is_one_line_naming_the_extra(tmp_path):
    """torch not installed (hidden from the import system): the config names the fix."""
    script = f"""
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        from dbmpi import config
        from dbmpi.model.loader import build_model
        raw = {{"model": {{"input_shape": [8, 8, 1], "python": "{CNN}"}}}}
        try:
            build_model(config.validate(raw, require_train=False)["model"])
        except config.ConfigError as exc:
            print(exc)
    """
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], capture_output=True, text=True, timeout=120)
    assert "cannot import" in out.stdout and "pip install 'dbmpi[torch]'" in out.stdout, out.stdout + out.stderr


def test_config_takes_layers_or_python_and_writes_args_back():
    with pytest.raises(ConfigError, match="not both"):
        configuration.validate({"model": {"input_shape": [4], "python": "a:b",
                                          "layers": [{"type": "softmax", "units": 2}]}}, require_train=False)
    with pytest.raises(ConfigError, match="model.args: only read with model.python"):
        configuration.validate({"model": {"input_shape": [4], "args": {"a": 1},
                                          "layers": [{"type": "softmax", "units": 2}]}}, require_train=False)
    with pytest.raises(ConfigError, match="model.layers: missing"):
        configuration.validate({"model": {"input_shape": [4]}}, require_train=False)
    with pytest.raises(ConfigError, match="expected \"package.module:function\""):
        configuration.validate({"model": {"input_shape": [4], "python": "nocolon"}}, require_train=False)
    model = model_table(image=8, width=4, sizes=[1, 2], nested={"a": 1})
    again = configuration.validate(configuration.parse_toml(configuration.dumps({"model": model})),
                                   require_train=False)["model"]
    assert again == model


def test_a_python_file_path_is_relative_to_the_config_file(tmp_path):
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "import torch\ndef make(k=3):\n    return torch.nn.Linear(4, k)\n", "m.py")
    config = tmp_path / "sub/run.toml"
    config.write_text('[model]\ninput_shape = [4]\npython = "m.py:make"\n[model.args]\nk = 5\n')
    cfg = configuration.load(config, ["model.args.k=6"], require_train=False)
    assert cfg["model"]["python"] == f"{tmp_path / 'sub/m.py'}:make"
    assert build_model(cfg["model"]).n_classes == 6


def test_torch_names_round_trip_through_a_checkpoint(tmp_path):
    """Tensor names with dots at any depth, and a module's own parameter ("scale"), come
    back from a checkpoint as they went in, and the model's check accepts it."""
    from dbmpi.io.checkpoint import open_checkpoint, write_checkpoint, write_slice

    model = adapted(SmallCNN())
    values = np.arange(model.n_params, dtype=np.float32)
    half = model.n_params // 2
    slices = [write_slice(tmp_path, 7, k, 2, lo, [("params", values[lo:hi])])
              for k, (lo, hi) in enumerate([(0, half), (half, model.n_params)])]
    path = write_checkpoint(tmp_path / "ckpt-000000007.h5", model.tensors, slices, algorithm="downpour", step=7,
                            config_text="", layout={})
    with open_checkpoint(path) as ckpt:
        ckpt.check_network(model)
        stored = dict(ckpt.tensor_datasets("params"))
        assert list(stored) == [t.name for t in model.tensors]
        assert stored["scale"].name == "/params/_/scale"
        assert stored["features.0.weight"].name == "/params/features/0.weight"
        np.testing.assert_array_equal(ckpt.read_range("params", 0, model.n_params), values)
