"""Run configurations: TOML files validated against a schema, with defaults filled in.

A config has three tables: [model] (input shape, seed, and either [[model.layers]] or a
Python model: `python = "pkg.module:factory"` with its [model.args]), [data] (the HDF5
dataset file) and [train] (algorithm and its settings). Every key is checked: an unknown
key, a missing field, a wrong type or a value out of range raises ConfigError naming the
key (`model.layers[2].units`), so a typo never silently falls back to a default.
Validation is pure and deterministic, so every MPI rank reaches the same verdict.
"""
from __future__ import annotations

import copy
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib


class ConfigError(ValueError):
    """A config that cannot be used; the message names the file and the key."""


ACTIVATIONS = ("identity", "sigmoid", "tanh", "relu")
OUTPUT_LAYERS = ("softmax", "logistic")
ALGORITHMS = ("sgd", "downpour", "sandblaster")
OPTIMIZERS = ("sgd", "momentum", "nesterov", "adagrad", "adam", "adamw")


@dataclass(frozen=True)
class Field:
    """One key of a table: its check, and its default (REQUIRED when there is none)."""

    check: Callable[[str, Any], Any]
    default: Any = None
    required: bool = False


def _is_int(value):
    return isinstance(value, int) and not isinstance(value, bool)


def positive_int(key, value):
    if not _is_int(value) or value <= 0:
        raise ConfigError(f"{key}: must be a positive integer, got {value!r}")
    return value


def nonnegative_int(key, value):
    if not _is_int(value) or value < 0:
        raise ConfigError(f"{key}: must be a non-negative integer, got {value!r}")
    return value


def odd_positive_int(key, value):
    positive_int(key, value)
    if value % 2 == 0:
        raise ConfigError(f"{key}: must be odd (a window centred on each unit), got {value}")
    return value


def positive_float(key, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        raise ConfigError(f"{key}: must be a positive number, got {value!r}")
    return float(value)


def unit_interval(key, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise ConfigError(f"{key}: must be a number in [0, 1), got {value!r}")
    return float(value)


def nonnegative_number(key, value):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigError(f"{key}: must be a non-negative number, got {value!r}")
    return float(value)


def at_least(low: float):
    def check(key, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
            raise ConfigError(f"{key}: must be a number of at least {low:g}, got {value!r}")
        return float(value)

    return check


def boolean(key, value):
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: must be true or false, got {value!r}")
    return value


def string(key, value):
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: must be a non-empty string, got {value!r}")
    return value


def one_of(*choices):
    def check(key, value):
        if value not in choices:
            raise ConfigError(f"{key}: must be one of {', '.join(choices)}; got {value!r}")
        return value

    return check


def shape(key, value):
    if not isinstance(value, list) or not 1 <= len(value) <= 3:
        raise ConfigError(f"{key}: must be a list of 1 to 3 positive integers, got {value!r}")
    for i, dim in enumerate(value):
        positive_int(f"{key}[{i}]", dim)
    return list(value)


def every_or_epoch(key, value):
    if value == "epoch":
        return value
    if not _is_int(value) or value <= 0:
        raise ConfigError(f'{key}: must be a positive integer or "epoch", got {value!r}')
    return value


def argument_table(key, value):
    """[model.args]: keyword arguments for a Python model's factory (any TOML values)."""
    if not isinstance(value, dict):
        raise ConfigError(f"{key}: must be a table of keyword arguments ([model.args]), got {value!r}")
    for name in value:
        if not name.isidentifier():
            raise ConfigError(f"{key}.{name}: not a Python keyword argument name")
    return dict(value)


def optional(check):
    def maybe(key, value):
        return None if value is None else check(key, value)

    return maybe


LAYER_FIELDS: dict[str, dict[str, Field]] = {
    "dense": {
        "units": Field(positive_int, required=True),
        "activation": Field(one_of(*ACTIVATIONS), required=True),
    },
    "local": {
        "filters": Field(positive_int, required=True),
        "kernel": Field(positive_int, required=True),
        "stride": Field(positive_int, 1),
        "activation": Field(one_of(*ACTIVATIONS), required=True),
    },
    "l2pool": {
        "size": Field(positive_int, required=True),
        "stride": Field(optional(positive_int), None),  # None: equal to size
        "eps": Field(positive_float, 1e-6),
    },
    "lcn": {
        "size": Field(odd_positive_int, required=True),
        "eps": Field(positive_float, 1e-2),
    },
    "softmax": {"units": Field(positive_int, required=True)},
    "logistic": {"units": Field(positive_int, required=True)},
}
LAYER_COMMON = {"type": Field(string, required=True), "name": Field(optional(string), None)}

MODEL_FIELDS = {
    "name": Field(string, "model"),
    "input_shape": Field(shape, required=True),
    "seed": Field(nonnegative_int, 0),
    "layers": Field(None),  # checked by _check_layers; required unless `python` is given
    # A Python model instead of layers: "pkg.module:factory" or "file.py:factory" (dbmpi.model.loader).
    "python": Field(optional(string), None),
    "args": Field(argument_table, {}),  # the factory's keyword arguments
}
DATA_FIELDS = {
    "path": Field(string, required=True),
    # A built-in source ("digits", "fashion-mnist", "mnist", "synthetic") to prepare `path`
    # from when it is missing; "synthetic" is shaped for the model.
    "source": Field(optional(string), None),
    "source_dir": Field(optional(string), None),
}
TRAIN_FIELDS = {
    "algorithm": Field(one_of(*ALGORITHMS), required=True),
    "optimizer": Field(one_of(*OPTIMIZERS), "sgd"),
    # Required by sgd and downpour; Sandblaster's line search picks its own steps.
    "learning_rate": Field(optional(positive_float), None),
    "momentum": Field(unit_interval, 0.9),
    "adagrad_eps": Field(positive_float, 1e-8),
    # Adagrad accumulators start here, so the first steps are not huge.
    "adagrad_initial": Field(nonnegative_number, 0.1),
    # Adam and AdamW (PyTorch's defaults): moment decay rates, the denominator's epsilon;
    # AdamW's decoupled weight decay (params *= 1 - learning_rate * adamw_weight_decay).
    "adam_beta1": Field(unit_interval, 0.9),
    "adam_beta2": Field(unit_interval, 0.999),
    "adam_eps": Field(positive_float, 1e-8),
    "adamw_weight_decay": Field(nonnegative_number, 0.01),
    "batch_size": Field(positive_int, 128),
    "epochs": Field(optional(positive_float), None),
    "steps": Field(optional(positive_int), None),
    "seed": Field(nonnegative_int, 0),
    "log_every": Field(positive_int, 100),
    # Steps (Sandblaster: L-BFGS iterations) between test evaluations; see eval_interval.
    "eval_every": Field(every_or_epoch, "epoch"),
    "eval_batch_size": Field(positive_int, 1000),
    "run_dir": Field(optional(string), None),
    "threads": Field(positive_int, 1),
    # Plain SGD only: apply the update inside the weight-gradient GEMM (no gradient pass).
    "fused_update": Field(boolean, True),
    # Downpour: the rank layout and the replicas' fetch/push rhythm.
    "n_shards": Field(positive_int, 1),
    "n_replicas": Field(positive_int, 1),
    "n_partitions": Field(positive_int, 1),
    # Model parallelism: compute a spatial layer's interior rows while its halo rows travel
    # (same results; off by default: it measured no faster on shared memory, docs/BENCHMARKS.md).
    "overlap_exchanges": Field(boolean, False),
    "n_fetch": Field(positive_int, 1),
    "n_push": Field(positive_int, 1),
    "warmstart_steps": Field(nonnegative_int, 0),
    # Apply each gradient to the replica's own copy between fetches (the paper's client).
    "local_learning_rate": Field(optional(positive_float), None),
    "time_budget_s": Field(optional(positive_float), None),
    # Checkpoints (run_dir/checkpoints/ckpt-<step>.h5): every so many steps of replica 0
    # and/or seconds, and always at the end; the newest `checkpoint_keep` are kept.
    "checkpoint_every": Field(optional(positive_int), None),
    "checkpoint_every_s": Field(optional(positive_float), None),
    "checkpoint_keep": Field(positive_int, 3),
    # Downpour: a replica whose heartbeat has not moved for this long is declared failed and
    # the others train on (dbmpi.runtime.failover); a shard that long silent ends the job.
    "replica_timeout_s": Field(at_least(1.0), 30.0),
    # Downpour: the run diverged (exit status 3) when more than this fraction of the pushes
    # were withheld as non-finite; a replica stops once its own share passes it (after 10).
    "max_rejected_fraction": Field(unit_interval, 0.1),
    # Downpour: the most pushes a shard may hold undrained before a replica that pushed waits
    # for it (none: twice the worker ranks), so a backlog never becomes one giant update.
    "max_push_backlog": Field(optional(positive_int), None),
    # Downpour: the shards scale each update's step by 1 / the mean staleness of the pushes
    # it merges (Zhang et al. 2016; dbmpi.ps.staleness).
    "staleness_aware": Field(boolean, False),
    # Sandblaster L-BFGS: batch_size examples per batch (all of the training set when
    # larger), cut into portions; `iterations` L-BFGS iterations (the budget).
    "iterations": Field(optional(positive_int), None),
    "portion_size": Field(positive_int, 100),
    "history": Field(positive_int, 10),  # m, the (s, y) pairs kept
    "wolfe_c1": Field(positive_float, 1e-4),  # sufficient decrease
    "wolfe_c2": Field(positive_float, 0.9),  # curvature (strong Wolfe)
    "max_line_search": Field(positive_int, 20),  # function evaluations per line search
    "tolerance": Field(nonnegative_number, 1e-6),  # stop when |g| <= tolerance * max(1, |x|)
    "backup_tasks": Field(boolean, True),
    # Sandblaster: L2 penalty weight_decay/2 * |x|^2 added to the batch loss by the shards
    # (a strictly convex objective for logistic regression, so the optimum is unique).
    "weight_decay": Field(nonnegative_number, 0.0),
    "push_every": Field(positive_int, 4),  # portions a replica accrues before it pushes
}


SECTIONS = {"model": MODEL_FIELDS, "data": DATA_FIELDS, "train": TRAIN_FIELDS}

# [train] keys that only some algorithms read (a key not listed is read by all of them) and
# keys that only one optimizer reads. Giving one where it is not read is an error, so a
# setting never silently does nothing; the resolved config leaves them out.
_SGD_LIKE, _DISTRIBUTED = ("sgd", "downpour"), ("downpour", "sandblaster")
TRAIN_KEY_ALGORITHMS = {
    **dict.fromkeys(("optimizer", "learning_rate", "momentum", "adagrad_eps", "adagrad_initial", "adam_beta1",
                     "adam_beta2", "adam_eps", "adamw_weight_decay", "epochs", "steps", "seed", "log_every"),
                    _SGD_LIKE),
    "fused_update": ("sgd",),
    **dict.fromkeys(("n_shards", "n_replicas", "n_partitions", "overlap_exchanges", "checkpoint_every",
                     "checkpoint_every_s", "checkpoint_keep", "replica_timeout_s"), _DISTRIBUTED),
    **dict.fromkeys(("n_fetch", "n_push", "warmstart_steps", "local_learning_rate", "max_rejected_fraction",
                     "max_push_backlog", "staleness_aware"), ("downpour",)),
    **dict.fromkeys(("iterations", "portion_size", "history", "wolfe_c1", "wolfe_c2", "max_line_search",
                     "tolerance", "backup_tasks", "weight_decay", "push_every"), ("sandblaster",)),
}
TRAIN_KEY_OPTIMIZER = {
    "momentum": ("momentum", "nesterov"),
    **dict.fromkeys(("adagrad_eps", "adagrad_initial"), ("adagrad",)),
    **dict.fromkeys(("adam_beta1", "adam_beta2", "adam_eps"), ("adam", "adamw")),
    "adamw_weight_decay": ("adamw",),
}


def why_not_read(key: str, train: dict) -> str | None:
    """Why the run described by `train` would ignore train.`key`, or None when it reads it."""
    algorithms = TRAIN_KEY_ALGORITHMS.get(key)
    if algorithms is not None and train["algorithm"] not in algorithms:
        return f"not read by algorithm \"{train['algorithm']}\" (only by {' and '.join(algorithms)})"
    optimizers = TRAIN_KEY_OPTIMIZER.get(key)
    if optimizers is not None and train["optimizer"] not in optimizers:
        readers = " and ".join(f'"{name}"' for name in optimizers)
        return f"not read by optimizer \"{train['optimizer']}\" (only by {readers})"
    return None


def eval_interval(train: dict, steps_per_epoch: int) -> int:
    """Steps (Sandblaster: iterations) between test evaluations: train.eval_every, where
    "epoch" means `steps_per_epoch` (steps, or batches, that make one pass over the data)."""
    every = train["eval_every"]
    return max(1, steps_per_epoch) if every == "epoch" else every


def _check_table(where: str, table: Any, fields: dict[str, Field]) -> dict:
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: must be a table, got {type(table).__name__}")
    for key in table:
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise ConfigError(f"{where}.{key}: unknown key (known keys: {known})")
    out = {}
    for key, field in fields.items():
        full = f"{where}.{key}"
        if key not in table or table[key] is None:
            if field.required:
                raise ConfigError(f"{full}: missing (required)")
            out[key] = copy.deepcopy(field.default)
        elif field.check is None:
            out[key] = table[key]
        else:
            out[key] = field.check(full, table[key])
    return out


def _check_layers(layers: Any) -> list[dict]:
    if not isinstance(layers, list) or not layers:
        raise ConfigError("model.layers: must be a non-empty array of tables ([[model.layers]])")
    checked = []
    for i, layer in enumerate(layers):
        where = f"model.layers[{i}]"
        if not isinstance(layer, dict):
            raise ConfigError(f"{where}: must be a table, got {type(layer).__name__}")
        if "type" not in layer:
            raise ConfigError(f"{where}.type: missing (required; one of {', '.join(LAYER_FIELDS)})")
        kind = layer["type"]
        if kind not in LAYER_FIELDS:
            raise ConfigError(
                f"{where}.type: unknown layer type {kind!r} (expected one of {', '.join(LAYER_FIELDS)})"
            )
        fields = {**LAYER_COMMON, **LAYER_FIELDS[kind]}
        entry = _check_table(where, layer, fields)
        if entry["name"] is None:
            entry["name"] = f"{kind}{i}"
        if entry["type"] == "l2pool" and entry["stride"] is None:
            entry["stride"] = entry["size"]
        checked.append(entry)
    names = [entry["name"] for entry in checked]
    for i, name in enumerate(names):
        if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
            raise ConfigError(f"model.layers[{i}].name: only letters, digits, '_' and '-' allowed, got {name!r}")
        if names.index(name) != i:
            raise ConfigError(f"model.layers[{i}].name: duplicate layer name {name!r}")
    for i, entry in enumerate(checked[:-1]):
        if entry["type"] in OUTPUT_LAYERS:
            raise ConfigError(f"model.layers[{i}].type: output layer {entry['type']!r} must be the last layer")
    if checked[-1]["type"] not in OUTPUT_LAYERS:
        raise ConfigError(
            f"model.layers[{len(checked) - 1}].type: the last layer must be an output layer "
            f"({', '.join(OUTPUT_LAYERS)}), got {checked[-1]['type']!r}"
        )
    return checked


def validate(raw: dict, *, require_train: bool = True) -> dict:
    """Check a parsed config and return a new dict with every default filled in."""
    if not isinstance(raw, dict):
        raise ConfigError("config: must be a table")
    for key in raw:
        if key not in SECTIONS:
            raise ConfigError(f"{key}: unknown table (known tables: {', '.join(SECTIONS)})")
    if "model" not in raw:
        raise ConfigError("model: missing (required table [model])")
    resolved = {"model": _check_table("model", raw["model"], MODEL_FIELDS)}
    _check_model_kind(raw["model"], resolved["model"])
    for section in ("data", "train"):
        if section in raw:
            resolved[section] = _check_table(section, raw[section], SECTIONS[section])
        elif require_train:
            raise ConfigError(f"{section}: missing (required table [{section}])")
    train = resolved.get("train")
    if train is not None:
        _check_train(raw["train"], train)
    return resolved


def _check_model_kind(given: dict, model: dict) -> None:
    """Layers or a Python model, not both; [model.args] only for a Python model."""
    if model["python"] is None:
        if given.get("args"):
            raise ConfigError("model.args: only read with model.python (a Python model's factory arguments)")
        if given.get("layers") is None:
            raise ConfigError("model.layers: missing (required: [[model.layers]] tables, or model.python "
                              "naming a Python model)")
        model["layers"] = _check_layers(given["layers"])
        return
    if given.get("layers") is not None:
        raise ConfigError("model.layers: give [[model.layers]] or model.python, not both")
    if ":" not in model["python"]:
        raise ConfigError(f"model.python: expected \"package.module:function\" or \"file.py:function\", "
                          f"got {model['python']!r}")
    model["layers"] = None


def is_python_model(model: dict) -> bool:
    """Whether a validated [model] table names a Python model (not layers)."""
    return model.get("python") is not None


def _check_train(given: dict, train: dict) -> None:
    """The [train] checks that need several keys: no key the chosen algorithm and optimizer
    do not read (``given``: the keys of the file), and a budget for the algorithm."""
    for key in given:
        reason = why_not_read(key, train)
        if reason is not None:
            raise ConfigError(f"train.{key}: {reason}; remove it")
    if train["algorithm"] == "sandblaster":
        _check_sandblaster_budget(train)
    else:
        _check_sgd_budget(train)


def _check_sandblaster_budget(train: dict) -> None:
    if train["iterations"] is None and train["time_budget_s"] is None:
        raise ConfigError("train.iterations: give train.iterations (or train.time_budget_s), "
                          "the Sandblaster budget")
    if not 0 < train["wolfe_c1"] < train["wolfe_c2"] < 1:
        raise ConfigError(f"train.wolfe_c2: the line search needs 0 < wolfe_c1 < wolfe_c2 < 1, "
                          f"got {train['wolfe_c1']} and {train['wolfe_c2']}")


def _check_sgd_budget(train: dict) -> None:
    """SGD and Downpour: a learning rate, and epochs or steps (or a time budget)."""
    if train["learning_rate"] is None:
        raise ConfigError(f"train.learning_rate: missing (required by algorithm "
                          f"\"{train['algorithm']}\")")
    if train["epochs"] is None and train["steps"] is None and train["time_budget_s"] is None:
        raise ConfigError("train.epochs: give train.epochs or train.steps (the training budget)")
    if train["epochs"] is not None and train["steps"] is not None:
        raise ConfigError("train.steps: give train.epochs or train.steps, not both")


def parse_toml(text: str, origin: str = "config") -> dict:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{origin}: not valid TOML: {exc}") from None


def _parse_value(text: str) -> Any:
    """A --set value: a TOML literal (1, 0.5, true, "x", [1, 2]) or else a bare string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


_PATH_PART = re.compile(r"([A-Za-z_][A-Za-z0-9_\-]*)(?:\[(\d+)\])?$")


def _set_aside(train: dict, overrides: list[str]) -> None:
    """`--set train.algorithm=...` or `train.optimizer=...` with another choice than the
    file's: drop the file's [train] keys that only the old choice reads (they were written
    for it); keys given with --set are checked as usual."""
    old = {"algorithm": train.get("algorithm"), "optimizer": train.get("optimizer", "sgd")}
    new = dict(old)
    for item in overrides:
        key, _, value = item.partition("=")
        if key.strip() in ("train.algorithm", "train.optimizer"):
            new[key.strip().split(".")[1]] = _parse_value(value)
    if new != old:
        for key in [k for k in train if why_not_read(k, old) is None and why_not_read(k, new) is not None]:
            del train[key]


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `--set section.key=value` overrides (layers addressed as model.layers[1].units)."""
    raw = copy.deepcopy(raw)
    if isinstance(raw.get("train"), dict):
        _set_aside(raw["train"], overrides)
    # A Python model given with --set replaces the file's model: its layers, or its factory's
    # arguments (--set model.args.KEY=... gives the new factory's).
    if isinstance(raw.get("model"), dict) and any(item.partition("=")[0].strip() == "model.python"
                                                   for item in overrides):
        raw["model"].pop("layers", None)
        raw["model"].pop("args", None)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set {item}: expected KEY=VALUE, e.g. train.learning_rate=0.1")
        key, value = item.split("=", 1)
        # The budget is epochs or steps: overriding one replaces the other.
        for given, other in (("train.steps", "epochs"), ("train.epochs", "steps")):
            if key.strip() == given and isinstance(raw.get("train"), dict):
                raw["train"].pop(other, None)
        parts = key.strip().split(".")
        node = raw
        for depth, part in enumerate(parts):
            match = _PATH_PART.match(part)
            if not match:
                raise ConfigError(f"--set {key}: cannot parse key part {part!r}")
            name, index = match.group(1), match.group(2)
            last = depth == len(parts) - 1
            if index is not None:
                seq = node.get(name) if isinstance(node, dict) else None
                if not isinstance(seq, list) or int(index) >= len(seq):
                    raise ConfigError(f"--set {key}: {name}[{index}] does not exist")
                if last:
                    seq[int(index)] = _parse_value(value)
                else:
                    node = seq[int(index)]
            elif last:
                node[name] = _parse_value(value)
            else:
                node = node.setdefault(name, {})
                if not isinstance(node, dict):
                    raise ConfigError(f"--set {key}: {name} is not a table")
    return raw


DATA_PATHS = ("path", "source_dir")


def _join_paths(config: dict, base: str) -> None:
    """Make [data]'s relative paths absolute against `base`: the config file's directory for
    the file's own values, then the current directory for those given with --set."""
    data = config.get("data")
    for key in DATA_PATHS if isinstance(data, dict) else ():
        if isinstance(data.get(key), str) and data[key]:
            data[key] = os.path.normpath(os.path.join(base, data[key]))
    model = config.get("model")
    python = model.get("python") if isinstance(model, dict) else None
    if isinstance(python, str) and python.rpartition(":")[0].endswith(".py"):  # a file, not a module
        origin, _, attr = python.rpartition(":")
        model["python"] = f"{os.path.normpath(os.path.join(base, origin))}:{attr}"


def load(path: str | Path, overrides: list[str] | None = None, *, require_train: bool = True) -> dict:
    """Read, override and validate a TOML config; every failure is a ConfigError naming the file."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a text file") from None
    try:
        raw = parse_toml(text, str(path))
        _join_paths(raw, os.path.dirname(os.path.abspath(path)))
        resolved = validate(apply_overrides(raw, overrides or []), require_train=require_train)
        _join_paths(resolved, os.getcwd())
        return resolved
    except ConfigError as exc:
        message = str(exc)
        if message.startswith(str(path)):
            raise
        raise ConfigError(f"{path}: {message}") from None


def _toml_scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"')
        return f'"{escaped}"'
    if isinstance(value, list):
        return "[" + ", ".join(_toml_scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k} = {_toml_scalar(v)}" for k, v in value.items()) + "}"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _written(section: str, key: str, config: dict) -> bool:
    """Whether dumps() writes this key: not train.run_dir (config.toml lives in the run
    directory, and training it again makes a new one), nor a key the run does not read."""
    if section != "train":
        return True
    return key != "run_dir" and why_not_read(key, config["train"]) is None


def dumps(config: dict) -> str:
    """Write a resolved config back as TOML, only the keys the run reads (None values are
    left out: they mean 'default'); the result can be trained again as it is."""
    lines = []
    for section, table in config.items():
        arrays = {k: v for k, v in table.items() if isinstance(v, list) and v and isinstance(v[0], dict)}
        tables = {k: v for k, v in table.items() if isinstance(v, dict)}
        lines.append(f"[{section}]")
        for key, value in table.items():
            if key not in arrays and key not in tables and value is not None and _written(section, key, config):
                lines.append(f"{key} = {_toml_scalar(value)}")
        lines.append("")
        for key, items in tables.items():
            if items:
                lines.append(f"[{section}.{key}]")
                lines.extend(f"{k} = {_toml_scalar(v)}" for k, v in items.items())
                lines.append("")
        for key, items in arrays.items():
            for item in items:
                lines.append(f"[[{section}.{key}]]")
                lines.extend(f"{k} = {_toml_scalar(v)}" for k, v in item.items() if v is not None)
                lines.append("")
    return "\n".join(lines)
