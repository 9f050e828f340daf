"""Parallel checkpoints against the number of shards: write and resume-verify GB/s.

For each S in `shard_counts`, S ranks under mpiexec hold their balanced slice of an Adagrad
model's two vectors (params and accumulators, float32) and write one checkpoint the way the
shards do (dbmpi.ps.checkpoint.ShardCheckpoints: every rank writes and hashes its slice file,
rank 0 joins them with the top-level file of virtual datasets), timed from a barrier to a
barrier; then a resume's checks, timed apart: rank 0's structure check (no hashing,
`structure_check_s`), and every rank hashing the slices of its own range
(as dbmpi.algorithms.run.verify_own_range does; `verify_s`, from a barrier to a barrier). The reference,
in the same run with S = 1 on rank 0: the single-file format 1 the way shard 0 wrote it
before (CheckpointWriter, one process writing and hashing everything) and its root-only
re-hash on resume. GB/s counts the checkpoint's bytes (2 vectors x 4 bytes x N) over the
slowest rank's time. Verification reads what was just written, so mostly from the page
cache: a bound on hashing, not on a cold disk.

    python bench/scale_checkpoint.py [--n-params N] [--shards 1 2 4] [--dir DIR]

Each S prints one JSON line; the last line is {"checkpoint_gbps_by_shards",
"verify_gbps_by_shards", "single_file_write_gbps", "single_file_verify_gbps"}.
bench/scale.py imports `measure`.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_N_PARAMS = 256 * 2**20  # 256M parameters: 2 GiB per checkpoint with Adagrad
COLUMNS = 4096  # the synthetic model: one dense W (rows, COLUMNS) and a bias for the rest


def mpiexec() -> str:
    local = Path(sys.executable).with_name("mpiexec")
    return str(local) if local.exists() else shutil.which("mpiexec")


def tensors_for(n_params: int):
    """A model's tensors with `n_params` parameters: dense0.W (rows, 4096), dense0.b (rest)."""
    from dbmpi.model.network import Tensor

    rows = max(1, n_params // COLUMNS - 1)
    return [Tensor("dense0.W", 0, (rows, COLUMNS), 0), Tensor("dense0.b", 0, (n_params - rows * COLUMNS,),
                                                                 rows * COLUMNS)]


def measure(n_params: int = DEFAULT_N_PARAMS, shard_counts=(1, 2, 4), directory: str | None = None,
            timeout: float = 1800) -> list[dict]:
    """One record per S: write and verify seconds and GB/s (see the module docstring)."""
    records = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for shards in shard_counts:
        work = Path(tempfile.mkdtemp(prefix="dbmpi-ckpt-bench-", dir=directory))
        try:
            cmd = [mpiexec(), "-n", str(shards), sys.executable, "-m", "mpi4py", __file__, "--child",
                   str(n_params), str(work)]
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
            if result.returncode != 0:
                raise RuntimeError(f"{' '.join(cmd)} failed:\n{result.stderr[-3000:]}")
            records.append(json.loads(result.stdout.strip().splitlines()[-1]))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    return records


def child(n_params: int, directory: Path) -> dict | None:
    """One rank of the S-rank run; rank 0 returns the record."""
    import numpy as np
    from mpi4py import MPI

    from dbmpi.io.checkpoint import open_checkpoint
    from dbmpi.ps.checkpoint import ShardCheckpoints
    from dbmpi.runtime.layout import Layout

    comm = MPI.COMM_WORLD
    layout = Layout(n_params, comm.size, 1)  # its shard ranges; every rank here is a shard
    lo, hi = layout.shard_ranges[comm.rank]
    rng = np.random.default_rng(comm.rank)
    vectors = [("params", rng.standard_normal(hi - lo, dtype=np.float32)),
               ("adagrad/accum", rng.random(hi - lo, dtype=np.float32))]
    tensors = tensors_for(n_params)
    files = ShardCheckpoints(comm, list(range(comm.size)), layout.shard_ranges, tensors, directory / "checkpoints", 1)
    comm.Barrier()
    began = time.perf_counter()
    path = files.write(vectors, step=1, algorithm="downpour", config_text="", state={"step": 1})
    comm.Barrier()
    write_s = time.perf_counter() - began
    path = comm.bcast(str(path) if path else None, root=0)
    began = time.perf_counter()
    if comm.rank == 0:
        open_checkpoint(path, verify="structure").close()
    structure_s = time.perf_counter() - began
    comm.Barrier()
    began = time.perf_counter()
    with open_checkpoint(path, verify=False) as ckpt:  # what verify_own_range does on shard `rank`
        problems = ckpt.verify_range(lo, hi, ["params", "adagrad/accum"])
    assert not problems, problems
    comm.Barrier()
    verify_s = time.perf_counter() - began
    if comm.rank != 0:
        return None
    gigabytes = 2 * 4 * n_params / 1e9
    record = {"n_params": n_params, "shards": comm.size, "gigabytes": round(gigabytes, 3),
              "write_s": round(write_s, 3), "write_gbps": round(gigabytes / write_s, 3),
              "structure_check_s": round(structure_s, 4), "verify_s": round(verify_s, 3),
              "verify_gbps": round(gigabytes / verify_s, 3),
              "top_level_bytes": os.path.getsize(path)}
    if comm.size == 1:
        record.update(single_file_reference(directory, tensors, vectors, gigabytes))
    return record


def single_file_reference(directory: Path, tensors, vectors, gigabytes: float) -> dict:
    """Format 1 as shard 0 wrote it before: one process writes and hashes everything; a
    resume's root re-hashes everything."""
    from dbmpi.io.checkpoint import CheckpointWriter, open_checkpoint

    path = directory / "single-file.h5"
    began = time.perf_counter()
    with CheckpointWriter(path, tensors, algorithm="downpour", step=1, config_text="", layout={}) as writer:
        for name, values in vectors:
            writer.write_vector(name, [(a, values[a:a + (1 << 22)]) for a in range(0, values.size, 1 << 22)])
        writer.commit()
    write_s = time.perf_counter() - began
    began = time.perf_counter()
    open_checkpoint(path).close()
    verify_s = time.perf_counter() - began
    path.unlink()
    return {"single_file_write_s": round(write_s, 3), "single_file_write_gbps": round(gigabytes / write_s, 3),
            "single_file_verify_s": round(verify_s, 3), "single_file_verify_gbps": round(gigabytes / verify_s, 3)}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        record = child(int(sys.argv[2]), Path(sys.argv[3]))
        if record is not None:
            print(json.dumps(record), flush=True)
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-params", type=int, default=DEFAULT_N_PARAMS)
    parser.add_argument("--shards", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--dir", default=None, help="where to write (default: the system's temp directory)")
    args = parser.parse_args()
    records = measure(args.n_params, args.shards, args.dir)
    for record in records:
        print(json.dumps(record), flush=True)
    reference = next((r for r in records if "single_file_write_gbps" in r), {})
    print(json.dumps({"checkpoint_gbps_by_shards": {r["shards"]: r["write_gbps"] for r in records},
                      "verify_gbps_by_shards": {r["shards"]: r["verify_gbps"] for r in records},
                      "single_file_write_gbps": reference.get("single_file_write_gbps"),
                      "single_file_verify_gbps": reference.get("single_file_verify_gbps")}), flush=True)


if __name__ == "__main__":
    main()
