"""Each Downpour worker reads only its rows, labels included: the bytes a worker process
reads while loading its data (/proc/self/io rchar, tests/read_probe.py) are O(its slice),
not O(the file), for R = 2 replicas of 1 and of 2 partitions (a dense first layer: each
partition reads 1/P of its replica's slice)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from dbmpi import data
from tests.models import MLP_20
from tests.test_downpour import mpiexec

N_TRAIN, N_TEST, WIDTH, CLASSES = 300_000, 2_000, 20, 10
ROW_BYTES = 4 * WIDTH + 4  # a row of x and its label
ALLOWANCE = 1 << 20  # metadata, HDF5's 64 KiB sieve reads, imports: a fixed amount


@pytest.fixture(scope="module")
def big_file(tmp_path_factory):
    """About 25 MB of random rows: a worker's slice (12.6 MB at R = 2, 6.3 MB a partition at
    P = 2) is clearly less than the file."""
    path = tmp_path_factory.mktemp("reads") / "wide.h5"
    rng = np.random.default_rng(3)
    data.write_dataset(path, rng.standard_normal((N_TRAIN, WIDTH), np.float32),
                       rng.integers(0, CLASSES, N_TRAIN).astype(np.int32),
                       rng.standard_normal((N_TEST, WIDTH), np.float32),
                       rng.integers(0, CLASSES, N_TEST).astype(np.int32),
                       attrs={"source": "test", "n_classes": CLASSES})
    return path


@pytest.mark.parametrize("n_partitions", [1, 2])
def test_each_worker_reads_only_its_slice(tmp_path, big_file, n_partitions):
    config = tmp_path / "reads.toml"
    config.write_text(MLP_20 + f'[data]\npath = "{big_file}"\n[train]\nalgorithm = "downpour"\n'
                      f"n_replicas = 2\nn_shards = 1\nn_partitions = {n_partitions}\nsteps = 20\n"
                      "warmstart_steps = 0\nlearning_rate = 0.01\nbatch_size = 32\n")
    out = tmp_path / "reads"
    out.mkdir()
    ranks = 2 * n_partitions + 1
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    probe = os.path.join(os.path.dirname(__file__), "read_probe.py")
    result = subprocess.run([mpiexec(), "-n", str(ranks), sys.executable, "-m", "mpi4py", probe, str(out),
                             "train", str(config), "--run-dir", str(tmp_path / "run")],
                            capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    workers = sorted((json.loads(p.read_text()) for p in out.glob("rank*.json")),
                     key=lambda w: (w["replica"], w["partition"]))
    assert [(w["replica"], w["partition"]) for w in workers] == [
        (r, p) for r in range(2) for p in range(n_partitions)]
    file_bytes = big_file.stat().st_size
    print(json.dumps({"file_bytes": file_bytes, "workers": workers}))
    for w in workers:
        assert w["examples"] == N_TRAIN // 2
        assert w["rows"] == N_TRAIN // 2 // n_partitions  # its piece of its replica's slice
        assert w["x_bytes"] + w["y_bytes"] == w["rows"] * ROW_BYTES
        # Replica 0 also evaluates: the test set (2,000 rows) is part of what it reads.
        limit = 1.5 * (w["rows"] * ROW_BYTES + w["test_bytes"]) + ALLOWANCE
        assert w["bytes_read"] < limit, (w, limit)
        # Tighter, and why "labels included" holds: only its own rows' labels (the train
        # split's labels alone are 1.2 MB, more than the allowance).
        assert w["bytes_read"] < w["rows"] * ROW_BYTES + w["test_bytes"] + ALLOWANCE, w
        # The bound means something: below the file, and with P = 2 below the replica's whole
        # slice (what every partition read before).
        assert limit < (file_bytes if n_partitions == 1 else w["examples"] * ROW_BYTES), (limit, file_bytes)
