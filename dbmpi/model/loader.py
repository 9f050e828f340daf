"""The model a [model] table names: a built-in Network (its [[model.layers]]), or a Python
model made by a factory (`python = "pkg.module:factory"` or `"path/to/file.py:factory"`,
called with the [model.args] table as keyword arguments).

A factory returns a `torch.nn.Module` (wrapped by dbmpi.model.torch_adapter, made after
`torch.manual_seed(model.seed)` so every rank makes the same initial values) or an object
that implements dbmpi.model.protocol.Model. Whatever goes wrong in between (a module that
does not import, a factory that raises or returns something else, torch missing, a model
without parameters) is one ConfigError line, the same on every rank.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from pathlib import Path

from dbmpi.config import ConfigError, is_python_model
from dbmpi.model.network import Network

PROTOCOL_MEMBERS = ("tensors", "n_params", "n_classes", "input_shape", "allocate", "initial_values",
                    "loss_and_grad", "forward", "evaluate")


def build_model(model: dict, *, allocate: bool = True, threads: int = 1):
    """The model of a validated [model] table. Without `allocate`, only what a role needs to
    plan and describe it (for a Python model: made, but no flat vectors yet). `threads`: the
    torch threads of this rank (train.threads; torch would take every core otherwise)."""
    if not is_python_model(model):
        return Network(model, allocate=allocate)
    made = _call_factory(model, threads)
    built = _as_model(made, model)
    if allocate:
        built.allocate()
    return built


def load_factory(spec: str):
    """The callable `spec` names ("pkg.module:attr" or "/abs/file.py:attr")."""
    origin, _, attr = spec.rpartition(":")
    if not origin or not attr:
        raise ConfigError(f"model.python: expected \"package.module:function\" or \"file.py:function\", got {spec!r}")
    module = _import(origin, spec)
    try:
        factory = getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"model.python: {origin} has no attribute {attr!r} ({spec})") from None
    if not callable(factory):
        raise ConfigError(f"model.python: {spec} is a {type(factory).__name__}, not a function or class")
    return factory


def _import(origin: str, spec: str):
    try:
        if origin.endswith(".py"):
            if not Path(origin).is_file():
                raise ConfigError(f"model.python: no file {origin} ({spec})")
            name = f"dbmpi_user_model_{abs(hash(os.path.realpath(origin)))}"
            if name in sys.modules:
                return sys.modules[name]
            loader_spec = importlib.util.spec_from_file_location(name, origin)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[name] = module
            try:
                loader_spec.loader.exec_module(module)
            except BaseException:
                del sys.modules[name]
                raise
            return module
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.append(os.getcwd())  # as `python -m` would: a package in the working directory
        return importlib.import_module(origin)
    except ConfigError:
        raise
    except ModuleNotFoundError as exc:
        hint = (" (the PyTorch adapter needs torch: pip install 'dbmpi[torch]')" if exc.name == "torch" else
                " (is it on PYTHONPATH on every node?)")
        raise ConfigError(f"model.python: cannot import {origin}: {exc}{hint}") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing: one line
        raise ConfigError(f"model.python: importing {origin} failed: {type(exc).__name__}: {exc}") from None


def _torch():
    """torch if it is installed, else None (a factory may make a model without it)."""
    try:
        import torch
    except ImportError:
        return None
    return torch


def _call_factory(model: dict, threads: int):
    spec = model["python"]
    factory = load_factory(spec)
    torch = _torch()
    if torch is not None:
        torch.set_num_threads(threads)
        torch.manual_seed(model["seed"])
    try:
        return factory(**model["args"])
    except ModuleNotFoundError as exc:
        if exc.name == "torch":
            raise ConfigError(f"model.python: {spec} needs torch, which is not installed "
                              "(pip install 'dbmpi[torch]')") from None
        raise ConfigError(f"model.python: {spec} raised ModuleNotFoundError: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - the user's factory failed: one line, every rank
        raise ConfigError(f"model.python: {spec}({_arguments(model['args'])}) raised "
                          f"{type(exc).__name__}: {exc}") from None


def _arguments(args: dict) -> str:
    return ", ".join(f"{key}={value!r}" for key, value in args.items())


def _as_model(made, model: dict):
    """The factory's result as a dbmpi model: a torch module wrapped, or a protocol object."""
    spec, shape = model["python"], tuple(model["input_shape"])
    shape = shape + (1,) if len(shape) == 2 else shape
    torch = _torch()
    if torch is not None and isinstance(made, torch.nn.Module):
        from dbmpi.model.torch_adapter import TorchModel, TorchModelError

        try:
            return TorchModel(made, shape, name=model["name"], seed=model["seed"])
        except TorchModelError as exc:
            raise ConfigError(f"model.python: {spec}: {exc}") from None
    missing = [m for m in PROTOCOL_MEMBERS if not hasattr(made, m)]
    if missing:
        raise ConfigError(f"model.python: {spec} returned a {type(made).__name__}, which is neither a "
                          f"torch.nn.Module nor a dbmpi model (it lacks {', '.join(missing)}; "
                          "see docs/API.md)")
    if tuple(made.input_shape) != shape:
        raise ConfigError(f"model.input_shape: {list(shape)}, but {spec} made a model for input "
                          f"{list(made.input_shape)}")
    if made.n_params == 0:
        raise ConfigError(f"model.python: {spec} made a model with no parameters: nothing to train")
    return made


__all__ = ["build_model", "load_factory"]
