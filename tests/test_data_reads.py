"""Each Downpour worker reads only its rows, labels included: the bytes a worker process
reads while loading its data (/proc/self/io rchar, tests/read_probe.py) are O(its slice),
not O(the file), for R = 2 replicas of 1 and of 2 partitions (a dense first layer: each
partition reads 1/P of its replica's slice; a locally connected one: each reads its band
of input rows of every example of the slice)."""
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from dbmpi import data
from tests.models import LOCAL_WIDE, MLP_20
from tests.test_downpour import mpiexec

N_TEST = 200
ALLOWANCE = 1 << 20  # metadata, imports: a fixed amount
CASES = {  # name -> (model, P, rows, example shape, classes, the input rows each partition reads)
    "dense P=1": (MLP_20, 1, 300_000, (20,), 10, None),
    "dense P=2": (MLP_20, 2, 300_000, (20,), 10, None),
    # 64 input rows, local 3x3 stride 2: 31 output rows split [0, 16) and [16, 31), inputs
    # [0, 33) and [32, 63): each partition leaves out about half of every example's 16 KiB.
    "local P=2": (LOCAL_WIDE, 2, 1_600, (64, 64, 1), 5, [(0, 33), (32, 63)]),
}


def write_file(path, n_train, shape, classes):
    """Random rows (about 25 MB): a worker's slice (half at R = 2, a quarter or a band of
    it per partition at P = 2) is clearly less than the file."""
    rng = np.random.default_rng(3)
    data.write_dataset(path, rng.standard_normal((n_train, *shape), np.float32),
                       rng.integers(0, classes, n_train).astype(np.int32),
                       rng.standard_normal((N_TEST, *shape), np.float32),
                       rng.integers(0, classes, N_TEST).astype(np.int32),
                       attrs={"source": "test", "n_classes": classes})


def run_with_probe(tmp_path, config, ranks):
    """`dbmpi train config` on `ranks` ranks under tests/read_probe.py: each worker's record."""
    out = tmp_path / "reads"
    out.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    probe = os.path.join(os.path.dirname(__file__), "read_probe.py")
    result = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", probe, str(out),
                             "train", str(config), "--run-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    return sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")),
                  key=lambda w: (w["replica"], w["partition"]))


@pytest.mark.parametrize("case", CASES)
def test_each_worker_reads_only_its_slice(tmp_path, case):
    model, n_partitions, n_train, shape, classes, bands = CASES[case]
    path = tmp_path / "big.h5"
    write_file(path, n_train, shape, classes)
    config = tmp_path / "reads.toml"
    config.write_text(model + f'[data]\npath = "{path}"\n[train]\nalgorithm = "downpour"\n'
                      f"n_replicas = 2\nn_shards = 1\nn_partitions = {n_partitions}\nsteps = 20\n"
                      "warmstart_steps = 0\nlearning_rate = 0.01\nbatch_size = 32\n")
    workers = run_with_probe(tmp_path, config, 2 * n_partitions + 1)
    print(json.dumps({"case": case, "file_bytes": path.stat().st_size, "workers": workers}))
    assert [(w["replica"], w["partition"]) for w in workers] == [
        (r, p) for r in range(2) for p in range(n_partitions)]
    example_bytes = 4 * math.prod(shape)
    for w in workers:
        assert w["examples"] == n_train // 2
        band = bands[w["partition"]] if bands else (0, shape[0])
        share = n_partitions if bands is None else 1  # a dense first layer: a piece of the slice
        assert w["rows"] == n_train // 2 // share
        assert w["input_rows"] == list(band)
        row_bytes = example_bytes * (band[1] - band[0]) // shape[0] + 4  # its part of an example, its label
        assert w["x_bytes"] + w["y_bytes"] == w["rows"] * row_bytes
        # Replica 0 also evaluates: the test set (200 rows) is part of what it reads.
        limit = 1.5 * (w["rows"] * row_bytes + w["test_bytes"]) + ALLOWANCE
        assert w["bytes_read"] < limit, (w, limit)
        # The bound means something: below the file and, with P = 2, below what each
        # partition read before (the whole examples of the slice and, on replica 0, of the
        # test set, and every label of the file).
        assert limit < path.stat().st_size
        if n_partitions > 1:
            whole_test = N_TEST * example_bytes if w["test_bytes"] else 0
            assert limit < (n_train // 2) * example_bytes + whole_test + 4 * (n_train + N_TEST)
        # Tighter, and why "labels included" holds: only its own rows' labels (in the dense
        # cases the train split's labels alone are 1.2 MB, more than the allowance).
        assert w["bytes_read"] < w["rows"] * row_bytes + w["test_bytes"] + ALLOWANCE, w
