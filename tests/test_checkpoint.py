"""HDF5 checkpoints without MPI: streamed writing, atomicity, verification, range reads."""
import itertools
import os
import re
import shutil
import subprocess

import h5py
import numpy as np
import pytest

from dbmpi.io.checkpoint import (
    CheckpointError,
    CheckpointWriter,
    checkpoint_name,
    list_checkpoints,
    newest_valid,
    open_checkpoint,
    prune,
)
from dbmpi.model import Network
from tests.models import LOCAL_DENSE


@pytest.fixture
def network():
    return Network.from_string(LOCAL_DENSE)


def write(path, network, vectors, pieces=7, step=12, state=None, config_text="[model]\n"):
    """Write `vectors` (name -> full canonical vector) in `pieces` uneven pieces each."""
    with CheckpointWriter(path, network.tensors, algorithm="downpour", step=step,
                          config_text=config_text, layout={"n_shards": 3}, state=state or {"a": 1}) as w:
        for name, full in vectors.items():
            cuts = np.linspace(0, full.size, pieces + 1).astype(int)
            cuts[1:-1] += np.arange(pieces - 1) % 3  # uneven, crossing tensor boundaries
            w.write_vector(name, ((a, full[a:b]) for a, b in itertools.pairwise(cuts)))
        return w.commit()


def test_round_trip_by_logical_tensor_and_by_range(tmp_path, network):
    rng = np.random.default_rng(0)
    accum = rng.random(network.n_params, dtype=np.float32)
    path = write(tmp_path / checkpoint_name(12), network, {"params": network.params, "adagrad": accum})
    with open_checkpoint(path) as ckpt:
        assert ckpt.step == 12 and ckpt.algorithm == "downpour" and ckpt.state == {"a": 1}
        assert ckpt.layout == {"n_shards": 3} and ckpt.n_params == network.n_params
        assert ckpt.vectors() == ["adagrad", "params"]
        ckpt.check_network(network)
        for name, ds in ckpt.tensor_datasets("params"):
            tensor = next(t for t in network.tensors if t.name == name)
            assert ds.shape == tensor.shape  # logical tensors, not shard blobs
            np.testing.assert_array_equal(ds[()], network.view(tensor, network.params))
        for a, b in [(0, network.n_params), (5, 123), (network.n_params - 40, network.n_params)]:
            np.testing.assert_array_equal(ckpt.read_range("adagrad", a, b), accum[a:b])
    with h5py.File(path) as f:  # readable by plain h5py: the shapes users expect
        assert f["params/local0/W"].shape == (4, 3, 3, 9)
        assert len(f["params/dense1/W"].attrs["sha256"]) == 64


def test_h5ls_and_h5dump_read_it(tmp_path, network):
    if not shutil.which("h5ls"):
        pytest.skip("hdf5-tools not installed")
    path = write(tmp_path / "c.h5", network, {"params": network.params})
    listing = subprocess.run(["h5ls", "-r", str(path)], capture_output=True, text=True, check=True).stdout
    assert "/params/dense1/W" in listing and "{11, 36}" in listing
    dump = subprocess.run(["h5dump", "-A", str(path)], capture_output=True, text=True, check=True).stdout
    assert "dbmpi-checkpoint" in dump


def test_a_failed_write_leaves_the_previous_checkpoint(tmp_path, network):
    path = tmp_path / "ckpt.h5"
    write(path, network, {"params": network.params})
    before = path.read_bytes()
    with pytest.raises(RuntimeError):
        with CheckpointWriter(path, network.tensors, algorithm="downpour", step=13, config_text="",
                              layout={}) as w:
            w.vector("params").write(0, network.params[:10])
            raise RuntimeError("crash mid-write")
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.h5"]  # no temp file left


def test_incomplete_vectors_are_refused(tmp_path, network):
    with pytest.raises(ValueError, match="only 10 of"):
        with CheckpointWriter(tmp_path / "x.h5", network.tensors, algorithm="downpour", step=1,
                              config_text="", layout={}) as w:
            w.vector("params").write(0, network.params[:10])
            w.commit()
    assert not (tmp_path / "x.h5").exists()
    with CheckpointWriter(tmp_path / "y.h5", network.tensors, algorithm="downpour", step=1,
                          config_text="", layout={}) as w:
        with pytest.raises(ValueError, match="expected the next at 0"):
            w.vector("params").write(5, network.params[5:10])


def test_corrupt_truncated_and_foreign_files_are_named(tmp_path, network):
    good = write(tmp_path / checkpoint_name(1), network, {"params": network.params})
    flipped = tmp_path / checkpoint_name(2)
    shutil.copy(good, flipped)
    with h5py.File(flipped, "r+") as f:
        f["params/dense1/W"][0, 0] += 1.0
    with pytest.raises(CheckpointError, match=r"corrupt: /params/dense1/W: checksum mismatch"):
        open_checkpoint(flipped)
    truncated = tmp_path / checkpoint_name(3)
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        open_checkpoint(truncated)
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.zeros(3)
    with pytest.raises(CheckpointError, match="not a dbmpi checkpoint"):
        open_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        open_checkpoint(tmp_path / "missing.h5")
    # --resume auto skips the broken newer ones and takes the newest valid one.
    assert newest_valid(tmp_path) == good


def test_a_checkpoint_of_another_model_is_named(tmp_path, network):
    path = write(tmp_path / "c.h5", network, {"params": network.params})
    other = Network.from_string(LOCAL_DENSE.replace("units = 11", "units = 12"))
    shapes = r"dense1.W \(11, 36\) in the checkpoint, \(12, 36\) in the model"
    with open_checkpoint(path) as ckpt, pytest.raises(CheckpointError, match=shapes):
        ckpt.check_network(other)


def test_keep_the_last_k(tmp_path, network):
    for step in (10, 20, 30, 40):
        write(tmp_path / checkpoint_name(step), network, {"params": network.params}, step=step)
    deleted = prune(tmp_path, keep=2)
    assert [p.name for p in deleted] == [checkpoint_name(10), checkpoint_name(20)]
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(30), checkpoint_name(40)]
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        newest_valid(tmp_path / "empty")


CRASHING_WRITER = """
import sys, time
from pathlib import Path
from dbmpi.io.checkpoint import CheckpointWriter, checkpoint_name
from dbmpi.model import Network
network = Network.from_string(sys.argv[2])
with CheckpointWriter(Path(sys.argv[1]) / checkpoint_name(50), network.tensors, algorithm="downpour",
                      step=50, config_text="", layout={}) as w:
    w.vector("params").write(0, network.params[:10])
    w.file.flush()
    print("writing", flush=True)
    time.sleep(60)
"""


def test_a_writer_killed_mid_write_leaves_the_old_checkpoints_and_its_temp_is_cleaned(tmp_path, network):
    """SIGKILL while a checkpoint is being written (no Python cleanup runs): the previous
    checkpoints still verify and --resume auto picks the newest of them; the next
    checkpoint written in that directory removes the orphaned temporary."""
    import sys

    from dbmpi.io.checkpoint import stale_temporaries

    write(tmp_path / checkpoint_name(40), network, {"params": network.params}, step=40)
    proc = subprocess.Popen([sys.executable, "-c", CRASHING_WRITER, str(tmp_path), LOCAL_DENSE],
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    orphans = stale_temporaries(tmp_path)
    assert [p.name for p in orphans] == [f".{checkpoint_name(50)}.tmp-{proc.pid}"]
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(40)]
    assert newest_valid(tmp_path).name == checkpoint_name(40)
    write(tmp_path / checkpoint_name(60), network, {"params": network.params}, step=60)
    deleted = prune(tmp_path, keep=3)
    assert deleted == orphans and not stale_temporaries(tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(40), checkpoint_name(60)]


def test_inspect_verify_tensor_and_export(tmp_path, network, capsys):
    from dbmpi.cli import main

    path = write(tmp_path / checkpoint_name(12), network, {"params": network.params})
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "step 12" in out and "/params/dense1/W" in out and "(11, 36)" in out and "float32" in out
    assert main(["inspect", str(path), "--verify"]) == 0
    assert "all checksums verified" in capsys.readouterr().out
    assert main(["inspect", str(path), "--tensor", "softmax2.b"]) == 0
    assert "/params/softmax2/b (5,)" in capsys.readouterr().out
    assert main(["inspect", str(path), "--tensor", "nope.W"]) == 2
    assert "no tensor 'nope.W'" in capsys.readouterr().err
    assert main(["export", str(path), "--format", "npz", "--out", str(tmp_path / "x.npz")]) == 0
    exported = np.load(tmp_path / "x.npz")
    np.testing.assert_array_equal(exported["params/dense1/W"], network.named_params()["dense1.W"])
    with h5py.File(path, "r+") as f:
        f["params/dense1/b"][0] += 1.0
    assert main(["inspect", str(path), "--verify"]) == 2
    captured = capsys.readouterr()
    assert "FAILED /params/dense1/b: checksum mismatch" in captured.out


DAMAGE = {  # case -> (damage done with h5py, what the one error line says)
    "no step": (lambda f: f.attrs.__delitem__("step"), "damaged checkpoint: no 'step' attribute"),
    "state not JSON": (lambda f: f.attrs.__setitem__("state", "{not json"),
                       "damaged checkpoint: attribute 'state' is not a JSON object"),
    "layout a list": (lambda f: f.attrs.__setitem__("layout", "[1, 2]"),
                      "damaged checkpoint: attribute 'layout' is not a JSON object"),
    "tensor without offset": (lambda f: f["params/dense1/W"].attrs.__delitem__("offset"),
                              "damaged checkpoint: tensor /params/dense1/W has no valid 'offset' attribute"),
    "missing tensor": (lambda f: f.__delitem__("params/softmax2/b"), "/params: missing tensor(s) softmax2.b"),
    "format_version not a number": (lambda f: f.attrs.__setitem__("format_version", "one"),
                                    "checkpoint format version 'one'; this dbmpi reads versions 1 and 2"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_damaged_checkpoint_is_one_error_naming_the_damage(tmp_path, network, case, capsys):
    """Resuming from it and `dbmpi inspect --verify` both end in one CheckpointError line."""
    from dbmpi.cli import main

    path = write(tmp_path / "c.h5", network, {"params": network.params}, config_text=LOCAL_DENSE)
    damage, message = DAMAGE[case]
    with h5py.File(path, "r+") as f:
        damage(f)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        with open_checkpoint(path) as ckpt:
            ckpt.check_network(network)
    assert main(["inspect", str(path), "--verify"]) == 2
    out, err = capsys.readouterr()
    assert err.count("dbmpi: error:") == 1 and err.startswith("dbmpi: error:") and message in out + err


def test_inspect_into_a_closed_pipe_ends_quietly(tmp_path, network):
    """`dbmpi inspect CKPT | head -2`: the reader is gone; no BrokenPipeError traceback."""
    import sys

    path = write(tmp_path / "c.h5", network, {"params": network.params})
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader has already exited
    try:
        result = subprocess.run([sys.executable, "-m", "dbmpi", "inspect", str(path)], stdout=write_end,
                                stderr=subprocess.PIPE, text=True, timeout=120)
    finally:
        os.close(write_end)
    assert result.stderr == "" and result.returncode == 141
