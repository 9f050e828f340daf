"""The ranks no run can lose, watched on their host: when the process of a shard or of the
Sandblaster coordinator ends, the job ends at once (MPI_Abort(4)) instead of hanging in a
collective that will never complete (dbmpi.runtime.failover explains why dead shards
cannot be recovered)."""
from __future__ import annotations

import threading
import time

from dbmpi.runtime import procfs
from dbmpi.runtime.comm import Comm, stderr_line
from dbmpi.runtime.failover import ABORT_SHARD_LOST
from dbmpi.runtime.layout import Layout


class VitalWatch:
    """Ends the job (MPI_Abort(4)) when the process of a shard or of the coordinator on this
    host has ended: they hold the optimizer's vectors and state, and a collective over a dead
    one never returns, so under the failover launcher the job would otherwise hang. A thread
    looks at their processes (dbmpi.runtime.procfs) every `period` s; the lowest live rank on the
    host says so in one line, the others abort quietly a moment later. Construction is
    collective (the ranks' hosts and processes); `stop()` once this rank's part of the run
    is over (the others may leave from then on)."""

    def __init__(self, comm: Comm, layout: Layout, period: float = 0.25):
        self.comm, self.layout, self.period = comm, layout, period
        self.local = procfs.host_peers(comm)
        self.vital = [r for r in (*layout.shard_ranks, layout.coordinator_rank) if r in self.local and r != comm.rank]
        self.lock = threading.Lock()
        self.stopped = False

    def start(self) -> VitalWatch:
        threading.Thread(target=self._loop, name="dbmpi-vital-watch", daemon=True).start()
        return self

    def stop(self) -> None:
        with self.lock:
            self.stopped = True

    def _loop(self) -> None:
        while True:
            time.sleep(self.period)
            dead = [r for r in self.vital if procfs.gone(self.local[r])]
            with self.lock:
                if self.stopped:
                    return
                if dead:
                    self._abort(dead[0])

    def _abort(self, rank: int) -> None:
        role = self.layout.role(rank)
        what = "the coordinator" if role.is_coordinator else f"shard {role.shard}"
        if procfs.lowest_alive(self.local, self.comm.rank) == self.comm.rank:
            stderr_line(f"dbmpi: {what} (rank {rank}) died (its process {self.local[rank][0]} ended): it cannot "
                        "be recovered, so the job ends; resume from the last checkpoint")
        time.sleep(0.5)  # let the launcher forward the line
        self.comm.Abort(ABORT_SHARD_LOST)
