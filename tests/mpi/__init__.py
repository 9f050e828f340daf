"""MPI tests: run under mpiexec with pytest --with-mpi (see scripts/run-tests.sh)."""
import numpy as np
import pytest


def sub_world(size):
    """A communicator of the first `size` ranks of COMM_WORLD, or None on the others
    (collective; skips when the world is smaller)."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.size < size:
        pytest.skip(f"needs {size} ranks, have {world.size}")
    comm = world.Split(0 if world.rank < size else MPI.UNDEFINED, world.rank)
    return None if comm == MPI.COMM_NULL else comm


def fetch_while_rising(client, size, top, limit=20000):
    """Fetch while the shards' values climb to `top`: every element of every fetch must be
    an integer in [0, top] that never goes backwards (element-atomic reads; one fetch may
    mix versions). Stops when all reach `top` or after `limit` fetches; returns the last
    values and the number of fetches."""
    seen = np.empty(size, np.float32)
    previous = np.zeros(size, np.float32)
    fetches = 0
    while True:
        client.fetch(seen)
        fetches += 1
        assert np.all(seen == np.round(seen)), "a fetched value was never held"
        assert np.all((seen >= 0) & (seen <= top))
        assert np.all(seen >= previous), "an element went backwards"
        previous[:] = seen
        if seen.min() == top or fetches >= limit:
            return seen, fetches
