"""`dbmpi` with the bytes each Downpour worker reads while loading its data measured:
`python -m mpi4py tests/read_probe.py OUT_DIR dbmpi-args...` runs `dbmpi dbmpi-args...` on
this rank, with `downpour._load_replica_data` wrapped to write `OUT_DIR/rank<R>.json`: the
`rchar` of /proc/self/io (bytes that read() returned) around the load, and what was loaded.
A test wrapper only (tests/test_data_reads.py); the package has no hook for it."""
import json
import sys
from pathlib import Path

from dbmpi import cli
from dbmpi.algorithms import downpour


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("/proc/self/io has no rchar")


def measured(load, out: Path):
    def wrapper(ctx):
        before = rchar()
        data = load(ctx)
        read = rchar() - before
        role = ctx.topo.role
        test_bytes = sum(a.nbytes for a in data.test) if data.test is not None else 0
        (out / f"rank{ctx.topo.rank}.json").write_text(json.dumps({
            "rank": ctx.topo.rank, "replica": role.replica, "partition": role.partition, "bytes_read": read,
            "rows": len(data.y), "x_bytes": data.x.nbytes, "y_bytes": data.y.nbytes, "test_bytes": test_bytes,
            "examples": data.examples, "input_rows": data.input_rows}))
        return data
    return wrapper


if __name__ == "__main__":
    out_dir = Path(sys.argv[1])
    downpour._load_replica_data = measured(downpour._load_replica_data, out_dir)
    sys.exit(cli.main(sys.argv[2:]))
