"""Shared test helpers: seeded random arrays and float64 finite differences."""
import os
import zlib

import numpy as np
import pytest


@pytest.fixture
def rng(request):
    # A seed per test so failures reproduce, different across tests (crc32, not hash():
    # str hashes change from process to process).
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


def randn(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def numeric_grad(f, x, eps=1e-6):
    """Central finite differences of the scalar f(x) at x. A float64 x is perturbed in
    place (and restored), so f may also read it through a closure; anything else is
    copied to float64 first."""
    x = x if isinstance(x, np.ndarray) and x.dtype == np.float64 else np.array(x, dtype=np.float64)
    grad = np.empty_like(x)
    flat, gflat = x.reshape(-1), grad.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        plus = f(x)
        flat[i] = old - eps
        minus = f(x)
        flat[i] = old
        gflat[i] = (plus - minus) / (2 * eps)
    return grad


def assert_close(actual, expected, rtol=1e-3, atol=1e-4, name="value"):
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape} != {expected.shape}"
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    err = np.abs(actual - expected)
    bad = err > atol * scale + rtol * np.abs(expected)
    assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.size} entries differ; "
                           f"max abs err {err.max():.3g} (scale {scale:.3g})")


FASHION_DIR = "/usr/share/datasets/fashion-mnist"


def require_fashion():
    """Skip when Debian's dataset-fashion-mnist is absent, unless CI demands the data."""
    if not os.path.isdir(FASHION_DIR):
        if os.environ.get("DBMPI_REQUIRE_DATA") == "1":
            pytest.fail(f"{FASHION_DIR} missing: apt-get install dataset-fashion-mnist")
        pytest.skip(f"{FASHION_DIR} missing (apt-get install dataset-fashion-mnist)")


def require_torch():
    """torch, for the tests of Python models; skip without it, unless CI demands it
    (DBMPI_REQUIRE_TORCH=1: .ci/run installs it)."""
    try:
        import torch
    except ImportError:
        if os.environ.get("DBMPI_REQUIRE_TORCH") == "1":
            pytest.fail("torch missing: pip install torch==2.13.0 (the CPU build)")
        pytest.skip("torch not installed (pip install 'dbmpi[torch]')", allow_module_level=True)
    return torch


def _mapped_shm_names() -> set[str]:
    """Names of /dev/shm files some process has mapped or open now."""
    names = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/maps") as maps:
                names.update(line.rsplit("/", 1)[-1].strip() for line in maps if "/dev/shm/" in line)
            for fd in os.listdir(f"/proc/{entry}/fd"):
                target = os.readlink(f"/proc/{entry}/fd/{fd}")
                if target.startswith("/dev/shm/"):
                    names.add(target.rsplit("/", 1)[-1])
        except OSError:
            continue
    return names


@pytest.fixture(scope="session", autouse=True)
def remove_orphaned_mpich_segments():
    """Tests that SIGKILL ranks leave MPICH's shared-memory segments behind (no
    MPI_Finalize ran); remove the ones this session created that nothing uses any more."""
    shm = "/dev/shm"
    before = set(os.listdir(shm)) if os.path.isdir(shm) else set()
    yield
    if not os.path.isdir(shm):
        return
    new = {n for n in os.listdir(shm) if n.startswith("mpich_shm_") and n not in before}
    for name in new - _mapped_shm_names():
        try:
            os.unlink(os.path.join(shm, name))
        except OSError:
            pass


def pytest_runtest_logreport(report):
    """Under `mpiexec ... pytest --with-mpi`, a test that fails on one rank ends the whole
    suite at once (its report first, on stderr): the other ranks would otherwise wait in
    that test's collectives until the suite's timeout."""
    if not report.failed or os.environ.get("DBMPI_MPI_FAIL_SLOW") == "1":
        return
    import sys

    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is None or not mpi.Is_initialized() or mpi.Is_finalized() or mpi.COMM_WORLD.size == 1:
        return
    rank = mpi.COMM_WORLD.rank
    sys.stderr.write(f"\n=== rank {rank}: {report.nodeid} failed ({report.when}); ending the MPI suite\n"
                     f"{report.longreprtext}\n")
    sys.stderr.flush()
    mpi.COMM_WORLD.Abort(1)
