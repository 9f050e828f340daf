"""Config validation: every malformed config gives one clear error naming the key."""
import textwrap

import pytest

from dbmpi import config
from dbmpi.config import ConfigError
from tests.models import DIGITS_SGD_RUN

GOOD = DIGITS_SGD_RUN  # the valid config each test breaks one way

def write(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(textwrap.dedent(text))
    return path


def test_good_config_gets_defaults(tmp_path):
    cfg = config.load(write(tmp_path, GOOD))
    assert cfg["train"]["batch_size"] == 128
    assert cfg["train"]["optimizer"] == "sgd"
    assert cfg["model"]["layers"][0]["name"] == "dense0"
    assert cfg["model"]["layers"][1]["name"] == "softmax1"


@pytest.mark.parametrize("old,new,key,words", [
    ('type = "dense"', 'type = "conv"', "model.layers[0].type", "unknown layer type 'conv'"),
    ('units = 16', 'units = -16', "model.layers[0].units", "positive integer"),
    ('units = 16', 'units = 0', "model.layers[0].units", "positive integer"),
    ('units = 16', 'units = 1.5', "model.layers[0].units", "positive integer"),
    ('units = 16\n', '', "model.layers[0].units", "missing"),
    ('activation = "relu"', 'activation = "swish"', "model.layers[0].activation", "must be one of"),
    ('activation = "relu"', 'activaton = "relu"', "model.layers[0].activaton", "unknown key"),
    ('units = 10', 'units = 10\nsize = 3', "model.layers[1].size", "unknown key"),
    ('input_shape = [8, 8, 1]', 'input_shape = [8, -8, 1]', "model.input_shape[1]", "positive integer"),
    ('input_shape = [8, 8, 1]', '', "model.input_shape", "missing"),
    ('learning_rate = 0.1', 'learning_rate = -0.1', "train.learning_rate", "positive number"),
    ('algorithm = "sgd"', 'algorithm = "adam"', "train.algorithm", "must be one of"),
    ('epochs = 1', '', "train.epochs", "give train.epochs or train.steps"),
    ('epochs = 1', 'epochs = 1\nsteps = 5', "train.steps", "not both"),
    ('[data]', '[dataa]', "dataa", "unknown table"),
    ('path = "data/digits.h5"', 'path = 3', "data.path", "non-empty string"),
])
def test_bad_config_names_the_key(tmp_path, old, new, key, words):
    assert old in GOOD
    path = write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        config.load(path)
    message = str(info.value)
    assert message.startswith(f"{path}: {key}:"), message
    assert words in message
    assert "\n" not in message


def test_output_layer_must_be_last(tmp_path):
    text = GOOD.replace('type = "dense"', 'type = "softmax"').replace('activation = "relu"\n', "")
    with pytest.raises(ConfigError, match=r"model.layers\[0\].type: output layer 'softmax' must be the last"):
        config.load(write(tmp_path, text))
    text = GOOD.replace('type = "softmax"', 'type = "dense"\nactivation = "relu"')
    with pytest.raises(ConfigError, match=r"model.layers\[1\].type: the last layer must be an output layer"):
        config.load(write(tmp_path, text))


def test_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="not valid TOML"):
        config.load(write(tmp_path, GOOD + "\n[model\n"))
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.toml")


def test_even_lcn_size_and_duplicate_names(tmp_path):
    text = GOOD.replace('input_shape = [8, 8, 1]', 'input_shape = [8, 8, 1]').replace(
        '[[model.layers]]\ntype = "dense"',
        '[[model.layers]]\ntype = "lcn"\nsize = 4\n\n[[model.layers]]\ntype = "dense"', 1)
    with pytest.raises(ConfigError, match=r"model.layers\[0\].size: must be odd"):
        config.load(write(tmp_path, text))
    text = GOOD.replace('units = 16', 'units = 16\nname = "same"').replace('units = 10', 'units = 10\nname = "same"')
    with pytest.raises(ConfigError, match=r"model.layers\[1\].name: duplicate layer name 'same'"):
        config.load(write(tmp_path, text))


def test_overrides(tmp_path):
    path = write(tmp_path, GOOD)
    cfg = config.load(path, ["train.learning_rate=0.5", "model.layers[0].units=32",
                             'train.optimizer="adagrad"', "train.optimizer=momentum"])
    assert cfg["train"]["learning_rate"] == 0.5
    assert cfg["model"]["layers"][0]["units"] == 32
    assert cfg["train"]["optimizer"] == "momentum"
    with pytest.raises(ConfigError, match=r"--set model.layers\[5\].units: layers\[5\] does not exist"):
        config.load(path, ["model.layers[5].units=3"])
    with pytest.raises(ConfigError, match="train.batch_size: must be a positive integer"):
        config.load(path, ["train.batch_size=-3"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        config.load(path, ["train.batch_size"])


def test_resolved_config_round_trips(tmp_path):
    cfg = config.load(write(tmp_path, GOOD))
    again = tmp_path / "again.toml"
    again.write_text(config.dumps(cfg))
    assert config.load(again) == cfg


def test_shipped_configs_are_valid():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    files = sorted(root.glob("*.toml"))
    assert len(files) >= 4
    for path in files:
        config.load(path, require_train=False)


def test_overriding_the_budget_replaces_the_other_kind(tmp_path):
    path = write(tmp_path, GOOD)
    cfg = config.load(path, ["train.steps=7"])
    assert cfg["train"]["steps"] == 7 and cfg["train"]["epochs"] is None
    cfg = config.load(write(tmp_path, GOOD.replace("epochs = 1", "steps = 9")), ["train.epochs=2"])
    assert cfg["train"]["epochs"] == 2 and cfg["train"]["steps"] is None


SANDBLASTER = GOOD.replace('algorithm = "sgd"\nlearning_rate = 0.1\nepochs = 1',
                           'algorithm = "sandblaster"\niterations = 5')


def test_adam_keys_are_read_by_adam_and_checked(tmp_path):
    adamw = GOOD.replace('"sgd"', '"downpour"') + 'optimizer = "adamw"\nadam_beta2 = 0.99\nadamw_weight_decay = 0.1\n'
    train = config.load(write(tmp_path, adamw))["train"]
    assert (train["adam_beta1"], train["adam_beta2"], train["adamw_weight_decay"]) == (0.9, 0.99, 0.1)
    adam = adamw.replace('"adamw"', '"adam"')
    with pytest.raises(ConfigError, match='train.adamw_weight_decay: not read by optimizer "adam" '
                                          r'\(only by "adamw"\); remove it'):
        config.load(write(tmp_path, adam))
    with pytest.raises(ConfigError, match=r"train.adam_beta1: must be a number in \[0, 1\), got 1.0"):
        config.load(write(tmp_path, adamw), ["train.adam_beta1=1.0"])


@pytest.mark.parametrize("algorithm,line,words", [
    ("sgd", "weight_decay = 10", 'not read by algorithm "sgd" (only by sandblaster)'),
    ("sgd", "iterations = 5", 'not read by algorithm "sgd" (only by sandblaster)'),
    ("sgd", "history = 3", 'not read by algorithm "sgd" (only by sandblaster)'),
    ("sgd", "overlap_exchanges = true", 'not read by algorithm "sgd" (only by downpour and sandblaster)'),
    ("sgd", "n_fetch = 2", 'not read by algorithm "sgd" (only by downpour)'),
    ("sgd", "staleness_aware = true", 'not read by algorithm "sgd" (only by downpour)'),
    ("sandblaster", "staleness_aware = true", 'not read by algorithm "sandblaster" (only by downpour)'),
    ("sgd", "momentum = 0.5", 'not read by optimizer "sgd" (only by "momentum" and "nesterov")'),
    ("sgd", "adam_beta1 = 0.8", 'not read by optimizer "sgd" (only by "adam" and "adamw")'),
    ("sgd", "adamw_weight_decay = 0.1", 'not read by optimizer "sgd" (only by "adamw")'),
    ("downpour", "fused_update = false", 'not read by algorithm "downpour" (only by sgd)'),
    ("sandblaster", "learning_rate = 0.1", 'not read by algorithm "sandblaster" (only by sgd and downpour)'),
    ("sandblaster", "epochs = 3", 'not read by algorithm "sandblaster" (only by sgd and downpour)'),
])
def test_a_key_the_algorithm_does_not_read_is_refused(tmp_path, algorithm, line, words):
    """weight_decay = 10 with sgd used to be accepted and ignored (an identical run)."""
    text = SANDBLASTER if algorithm == "sandblaster" else GOOD.replace('"sgd"', f'"{algorithm}"')
    key = line.split()[0]
    path = write(tmp_path, text + line + "\n")
    with pytest.raises(ConfigError) as info:
        config.load(path)
    assert str(info.value) == f"{path}: train.{key}: {words}; remove it"
    with pytest.raises(ConfigError, match=f"train.{key}: not read by"):
        config.load(write(tmp_path, text), ["train." + line.replace(" = ", "=")])


def test_switching_algorithm_on_the_command_line_sets_the_files_keys_for_the_old_one_aside(tmp_path):
    """--set train.algorithm (or train.optimizer) drops the file's keys only the old choice
    reads; a key given with --set is still checked."""
    path = write(tmp_path, SANDBLASTER + "history = 3\nweight_decay = 0.5\nbatch_size = 7\n")
    cfg = config.load(path, ['train.algorithm="sgd"', "train.learning_rate=0.2", "train.steps=4"])
    assert cfg["train"]["algorithm"] == "sgd" and cfg["train"]["weight_decay"] == 0.0
    assert cfg["train"]["batch_size"] == 7  # read by both: kept
    with pytest.raises(ConfigError, match='train.weight_decay: not read by algorithm "sgd"'):
        config.load(path, ["train.algorithm=sgd", "train.learning_rate=0.2", "train.steps=4", "train.weight_decay=1"])
    momentum = write(tmp_path, GOOD.replace("epochs = 1", 'epochs = 1\noptimizer = "momentum"\nmomentum = 0.5'))
    assert config.load(momentum, ["train.optimizer=adagrad"])["train"]["optimizer"] == "adagrad"


def test_the_resolved_config_holds_only_what_the_run_reads(tmp_path):
    """A Downpour-with-Adagrad run's config.toml lists no Sandblaster keys and no momentum,
    no run_dir (so it can be trained again as it is), and eval_every written out."""
    text = GOOD.replace('"sgd"', '"downpour"') + 'optimizer = "adagrad"\nrun_dir = "runs/x"\n'
    cfg = config.load(write(tmp_path, text))
    written = config.dumps(cfg)
    train = config.parse_toml(written)["train"]
    assert train["eval_every"] == "epoch" and train["optimizer"] == "adagrad" and train["n_shards"] == 1
    for key in ("run_dir", "momentum", "history", "weight_decay", "iterations", "fused_update", "wolfe_c1"):
        assert key not in train, key
    again = write(tmp_path, written)
    assert config.dumps(config.load(again)) == written
    assert "eval_every" not in config.parse_toml(config.dumps(config.load(write(tmp_path, GOOD))))["model"]


@pytest.mark.parametrize("value,words", [("0", "positive integer or \"epoch\""), ('"daily"', "positive integer")])
def test_eval_every_is_a_step_count_or_epoch(tmp_path, value, words):
    assert config.load(write(tmp_path, GOOD + "eval_every = 7\n"))["train"]["eval_every"] == 7
    assert config.load(write(tmp_path, GOOD), ["train.eval_every=epoch"])["train"]["eval_every"] == "epoch"
    with pytest.raises(ConfigError, match=f"train.eval_every: must be a {words}"):
        config.load(write(tmp_path, GOOD + f"eval_every = {value}\n"))


def test_data_path_is_relative_to_the_config_file(tmp_path, monkeypatch):
    """The file's relative data.path is resolved against the file's directory (not the
    current one); one given with --set against the current directory; both recorded absolute."""
    (tmp_path / "configs").mkdir()
    path = tmp_path / "configs" / "run.toml"
    path.write_text(GOOD.replace('path = "data/digits.h5"', 'path = "../data/digits.h5"\nsource_dir = "raw"'))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    data = config.load(path)["data"]
    assert data["path"] == str(tmp_path / "data" / "digits.h5")
    assert data["source_dir"] == str(tmp_path / "configs" / "raw")
    assert config.load(path, ["data.path=mine.h5"])["data"]["path"] == str(elsewhere / "mine.h5")
    assert config.load(path, ["data.path=/abs/d.h5"])["data"]["path"] == "/abs/d.h5"


def test_every_train_key_says_which_algorithms_read_it():
    """A new [train] key read by some algorithms only must be listed in
    TRAIN_KEY_ALGORITHMS, or it would be accepted and ignored by the others."""
    read_by_all = set(config.TRAIN_FIELDS) - set(config.TRAIN_KEY_ALGORITHMS)
    assert read_by_all == {"algorithm", "batch_size", "eval_every", "eval_batch_size", "run_dir", "threads",
                           "time_budget_s"}
    assert all(set(algorithms) <= set(config.ALGORITHMS) for algorithms in config.TRAIN_KEY_ALGORITHMS.values())
