"""Fixtures for the Slurm job-script tests: a real one-node cluster for the session, and the
digits data set the jobs train on.

Without Slurm (or root) these tests are skipped; with DBMPI_REQUIRE_SLURM=1 (set by
.ci/run) that is a failure instead.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.slurm.cluster import LocalSlurm, missing


@pytest.fixture(scope="session")
def slurm():
    why = missing()
    if why:
        if os.environ.get("DBMPI_REQUIRE_SLURM") == "1":
            pytest.fail(f"DBMPI_REQUIRE_SLURM=1 but {why}")
        pytest.skip(why)
    # Not under pytest's tmp_path: munged (user munge) must be able to reach its directory.
    root = Path(tempfile.mkdtemp(prefix="dbmpi-slurm-"))
    root.chmod(0o755)
    cluster = LocalSlurm(root)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()
        leftover = cluster.running()
        if not leftover:
            shutil.rmtree(root, ignore_errors=True)
        assert not leftover, f"Slurm daemons still running after stop: {leftover} (logs in {root})"


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """scikit-learn's digits as an HDF5 data set file, prepared once."""
    path = tmp_path_factory.mktemp("data") / "digits.h5"
    subprocess.run([sys.executable, "-m", "dbmpi", "data", "prepare", "digits", "--out", str(path)],
                   check=True, capture_output=True, timeout=120)
    return path
