"""MPI tests: run under mpiexec with pytest --with-mpi (see scripts/run-tests.sh)."""
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
