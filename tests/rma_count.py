"""Counting stand-ins for the parameter server's windows: every RMA call a client makes is
recorded as (window, call, target rank) and completes nothing (results keep what their
buffers held). Used by tests/test_client_rma.py and bench/network.py to count the RMA
operations of a replica step without MPI ranks."""
from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

from mpi4py import MPI

from dbmpi.ps.control import ControlBlock

# Where each call takes its target rank.
_TARGET_ARG = {"Accumulate": 1, "Raccumulate": 1, "Put": 1, "Get": 1, "Rput": 1, "Rget": 1,
               "Get_accumulate": 2, "Rget_accumulate": 2, "Fetch_and_op": 2, "Compare_and_swap": 3,
               "Flush": 0, "Flush_local": 0, "Lock": 0, "Unlock": 0}
# Calls that wait for the target: a round trip each (off-node, one the target must serve).
BLOCKING = {"Flush", "Unlock"}


class CountingWin:
    """One window: records each call in `calls`."""

    def __init__(self, name: str, calls: list):
        self.name, self.calls = name, calls

    def __getattr__(self, call: str):
        if call not in _TARGET_ARG:
            raise AttributeError(call)

        def record(*args, **_kwargs):
            self.calls.append((self.name, call, args[_TARGET_ARG[call]]))
            return MPI.REQUEST_NULL if call.startswith("R") else None
        return record


class CountingWindows:
    """What dbmpi.ps.client.ShardClient needs of dbmpi.ps.windows.ParameterWindows."""

    def __init__(self, layout, rank: int = 0, block=ControlBlock):
        self.layout = layout
        self.comm = SimpleNamespace(rank=rank)
        self.calls: list[tuple[str, str, int]] = []
        self.params = CountingWin("params", self.calls)
        self.inbox = CountingWin("inbox", self.calls)
        self.control = CountingWin("control", self.calls)
        self.block = block(self.control)

    def lock_shards(self) -> None:
        pass

    def unlock_shards(self) -> None:
        pass

    def progress(self) -> None:
        pass

    def per_target(self) -> dict[int, Counter]:
        """The calls recorded so far, by target rank: Counter of (window, call)."""
        out: dict[int, Counter] = {}
        for window, call, rank in self.calls:
            out.setdefault(rank, Counter())[(window, call)] += 1
        return out


def count_step_calls(layout, worker_rank: int, ranges, steps: int = 5, max_backlog=None, look_for_stop=False,
                     block=ControlBlock) -> dict[int, Counter]:
    """The RMA calls, by target rank, of `steps` steady-state replica steps of one worker
    (fetch, compute, push; n_fetch = n_push = 1), and with `look_for_stop` the replica
    loop's look for a relayed stop (dbmpi.runtime.runcontrol.ReplicaControl.stop_seen)."""
    import numpy as np

    from dbmpi.ps.client import ShardClient
    from dbmpi.runtime.runcontrol import ReplicaControl

    windows = CountingWindows(layout, worker_rank, block)
    client = ShardClient(windows, layout.role(worker_rank).replica, ranges, max_backlog=max_backlog,
                         wait=(lambda done: None) if max_backlog else None)
    control = ReplicaControl(windows, SimpleNamespace(layout=layout), None)
    local = np.zeros(client.size, np.float32)
    grads = [np.ones(client.size, np.float32) for _ in range(2)]
    client.fetch(local)
    client.push(grads[0])
    windows.calls.clear()  # the steady state: each step completes the previous push
    for i in range(steps):
        if look_for_stop:
            control.stop_seen()
        client.fetch(local)
        client.push(grads[(i + 1) % 2])
    return windows.per_target()
