"""Run the `dbmpi` command in this process and record its peak resident memory.

    mpiexec -n N python -m mpi4py -m tests.rss_probe OUT_DIR dbmpi-arguments...

Each rank runs `dbmpi dbmpi-arguments...` (runpy, exactly as the console script does) and,
when the command returns, writes OUT_DIR/rss-<rank>.json: {"rank", "maxrss_bytes", "code"}
(`ru_maxrss` of this process: its peak resident set). The training's own records are left
alone. A rank that leaves through os._exit (a failed run) writes nothing.
"""
from __future__ import annotations

import json
import resource
import runpy
import sys
from pathlib import Path


def peak_rss_bytes() -> int:
    """This process's peak resident set (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> None:
    out = Path(sys.argv[1])
    sys.argv = ["dbmpi"] + sys.argv[2:]
    code = 0
    try:
        runpy.run_module("dbmpi", run_name="__main__", alter_sys=True)
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    from mpi4py import MPI

    rank = MPI.COMM_WORLD.rank
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rss-{rank}.json").write_text(json.dumps({"rank": rank, "maxrss_bytes": peak_rss_bytes(),
                                                       "code": code}))
    sys.exit(code)


if __name__ == "__main__":
    main()
