"""HDF5 checkpoints without MPI: streamed writing, atomicity, verification, range reads."""
import itertools
import os
import re
import shutil
import subprocess
from pathlib import Path

import h5py
import numpy as np
import pytest

from dbmpi.io.checkpoint import (
    FORMAT_VERSION,
    SINGLE_FILE_VERSION,
    CheckpointError,
    CheckpointWriter,
    checkpoint_name,
    list_checkpoints,
    newest_valid,
    open_checkpoint,
    prune,
    write_checkpoint,
    write_slice,
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


def kill_while_writing(script: str, *args):
    """Run `script` in a child, SIGKILL it once it says "writing"; the ended process."""
    import sys

    proc = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc


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
    from dbmpi.io.checkpoint import stale_temporaries

    write(tmp_path / checkpoint_name(40), network, {"params": network.params}, step=40)
    proc = kill_while_writing(CRASHING_WRITER, tmp_path, LOCAL_DENSE)
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


# Format 2: slice files joined by virtual datasets -----------------------------------------
def write_sliced(directory, tensors, vectors, cuts, step=12, state=None, config_text="[model]\n"):
    """What the shards do (dbmpi.ps.checkpoint): one slice file per range of `cuts`, then the
    top-level file. `vectors`: name -> full canonical vector."""
    records = [write_slice(directory, step, k, len(cuts) - 1, a, [(name, full[a:b]) for name, full in vectors.items()])
               for k, (a, b) in enumerate(itertools.pairwise(cuts))]
    return write_checkpoint(Path(directory) / checkpoint_name(step), tensors, records, algorithm="downpour",
                            step=step, config_text=config_text, layout={"n_shards": len(cuts) - 1},
                            state=state or {"a": 1})


@pytest.fixture
def sliced(tmp_path, network):
    """A format-2 checkpoint of params and Adagrad in 3 slices whose bounds cut rows of
    dense1.W and local0.W in the middle; (path, {vector: full values}, cuts)."""
    rng = np.random.default_rng(1)
    vectors = {"params": network.params.copy(), "adagrad/accum": rng.random(network.n_params, dtype=np.float32)}
    cuts = [0, 150, 700, network.n_params]
    return write_sliced(tmp_path / "run" / "checkpoints", network.tensors, vectors, cuts), vectors, cuts


def test_sliced_virtual_datasets_equal_the_slices_and_whole_tensors(sliced, network):
    path, vectors, cuts = sliced
    with open_checkpoint(path) as ckpt:  # structure and every slice's checksum
        assert ckpt.format_version == FORMAT_VERSION == 2 and ckpt.step == 12 and ckpt.state == {"a": 1}
        assert sorted(ckpt.vectors()) == ["adagrad/accum", "params"]
        ckpt.check_network(network)
        assert [(s["lo"], s["hi"]) for s in ckpt.slices] == list(itertools.pairwise(cuts))
        for record in ckpt.slices:  # each slice file holds its range, flat
            with h5py.File(ckpt.slice_path(record)) as f:
                for name, full in vectors.items():
                    np.testing.assert_array_equal(f[name][()], full[record["lo"]:record["hi"]])
        for a, b in [(0, network.n_params), (140, 710), (151, 152)]:
            np.testing.assert_array_equal(ckpt.read_range("adagrad/accum", a, b), vectors["adagrad/accum"][a:b])
    with h5py.File(path) as f:  # plain h5py sees whole tensors in their logical shapes
        for t in network.tensors:
            np.testing.assert_array_equal(f[f"params/{t.name.replace('.', '/')}"][...],
                                          network.view(t, vectors["params"]))
            assert f[f"adagrad/accum/{t.name.replace('.', '/')}"].shape == t.shape
        assert f["params/local0/W"].is_virtual and f["params/local0/W"].shape == (4, 3, 3, 9)
        assert all(not os.path.isabs(m.file_name) for m in f["params/dense1/W"].virtual_sources())


def test_h5dump_reads_a_moved_sliced_checkpoint_from_another_directory(sliced, network, tmp_path, capsys):
    """Relative source paths: a run directory moved elsewhere still opens, with h5py, with
    h5dump started in another working directory, and with `dbmpi inspect --verify`."""
    from dbmpi.cli import main

    if not shutil.which("h5dump"):
        pytest.skip("hdf5-tools not installed")
    path, vectors, _ = sliced
    moved = tmp_path / "elsewhere" / "run-copy"
    shutil.move(str(tmp_path / "run"), str(moved))
    top = moved / "checkpoints" / path.name
    elsewhere = tmp_path / "cwd"
    elsewhere.mkdir()
    dense1 = next(t for t in network.tensors if t.name == "dense1.W")
    out = elsewhere / "dense1.bin"
    subprocess.run(["h5dump", "-d", "/params/dense1/W", "-b", "LE", "-o", str(out), str(top)], cwd=elsewhere,
                   capture_output=True, check=True)
    expected = network.view(dense1, vectors["params"])
    np.testing.assert_array_equal(np.fromfile(out, "<f4").reshape(dense1.shape), expected)
    with h5py.File(top) as f:
        np.testing.assert_array_equal(f["params/dense1/W"][...], network.view(dense1, vectors["params"]))
    assert main(["inspect", str(top), "--verify"]) == 0
    assert main(["inspect", str(top)]) == 0
    shown = capsys.readouterr().out
    assert "all checksums verified (2 vectors)" in shown and "/params/dense1/W" in shown and "(11, 36)" in shown
    assert "slice ckpt-000000012/slice-00001-of-00003-" in shown and "[150, 700)" in shown
    assert main(["export", str(top), "--out", str(elsewhere / "w.npz")]) == 0
    np.testing.assert_array_equal(np.load(elsewhere / "w.npz")["adagrad/accum/dense1/W"],
                                  network.view(dense1, vectors["adagrad/accum"]))


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_a_resume_with_other_shards_hashes_only_the_slices_its_range_reads(sliced, network, n_shards):
    """A new shard range verifies and reads the old slices it spans; a corrupted slice file
    is found by exactly the ranges that read from it, and named."""
    from dbmpi.runtime.layout import balanced_ranges

    path, vectors, cuts = sliced
    victim = open_checkpoint(path, verify=False)
    bad = victim.slice_path(victim.slices[1])
    victim.close()
    with h5py.File(bad, "r+") as f:
        f["adagrad/accum"][3] += 1.0
    with open_checkpoint(path, verify="structure") as ckpt:  # the root's check: no hashing
        for lo, hi in balanced_ranges(network.n_params, n_shards):
            problems = ckpt.verify_range(lo, hi)
            reads_bad = lo < cuts[2] and cuts[1] < hi
            assert problems == ([f"/adagrad/accum [{cuts[1]}, {cuts[2]}): checksum mismatch in slice file {bad}"]
                                if reads_bad else [])
            assert ckpt.verify_range(lo, hi, ["params"]) == []
            np.testing.assert_array_equal(ckpt.read_range("params", lo, hi), vectors["params"][lo:hi])
    with pytest.raises(CheckpointError, match=r"corrupt: /adagrad/accum \[150, 700\): checksum mismatch"):
        open_checkpoint(path)


def test_a_missing_or_foreign_slice_file_fails_the_structure_check(sliced, tmp_path):
    path, _, _ = sliced
    with open_checkpoint(path, verify=False) as ckpt:
        first, second = (ckpt.slice_path(r) for r in ckpt.slices[:2])
    first.rename(first.with_name("gone.h5"))
    with pytest.raises(CheckpointError, match=f"slice file {re.escape(str(first))} is missing"):
        open_checkpoint(path, verify="structure")
    first.with_name("gone.h5").rename(first)
    shutil.copy(second, first)  # another shard's slice under this one's name
    with pytest.raises(CheckpointError, match=r"is not the slice \[0, 150\) of this checkpoint"):
        open_checkpoint(path, verify="structure")
    with pytest.raises(CheckpointError, match="no valid checkpoint to resume from"):
        newest_valid(path.parent)  # --resume auto skips it


def test_the_single_file_format_still_loads_everywhere(tmp_path, network):
    """Format 1 (written by CheckpointWriter, as dbmpi did before): opened, verified by its
    tensors' checksums, read by range, picked by --resume auto beside format 2."""
    from dbmpi.algorithms.run import resolve_resume

    old = write(tmp_path / checkpoint_name(10), network, {"params": network.params}, step=10)
    with open_checkpoint(old, verify="structure") as ckpt:  # format 1: the structure check re-hashes
        assert ckpt.format_version == SINGLE_FILE_VERSION and not ckpt.slices
        np.testing.assert_array_equal(ckpt.read_range("params", 3, 300), network.params[3:300])
    resumed = resolve_resume(str(old), tmp_path, network)
    assert resumed["format_version"] == 1 and resumed["step"] == 10
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copy(old, run / "checkpoints" / old.name)
    assert resolve_resume("auto", run, network)["step"] == 10
    write_sliced(run / "checkpoints", network.tensors, {"params": network.params}, [0, 500, network.n_params], step=20)
    assert resolve_resume("auto", run, network)["format_version"] == 2


SLICE_CRASH = """
import os, sys, time
from pathlib import Path
import h5py, numpy as np
from dbmpi.io.atomic import atomic_path
from dbmpi.io.checkpoint import checkpoint_name, write_slice
from dbmpi.model import Network
directory, phase = Path(sys.argv[1]), sys.argv[3]
network = Network.from_string(sys.argv[2])
n = network.n_params
for k, (a, b) in enumerate([(0, 400), (400, n)]):
    write_slice(directory, 50, k, 2, a, [("params", network.params[a:b])])
if phase == "top-level":  # killed while the top-level file is being written
    with atomic_path(directory / checkpoint_name(50)) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["format"] = "dbmpi-checkpoint"
        f.flush()
        print("writing", flush=True)
        time.sleep(60)
print("writing", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("phase", ["between", "top-level"])
def test_a_kill_between_slices_and_top_level_leaves_the_previous_checkpoint(tmp_path, network, phase):
    """SIGKILL after every slice file of step 50 is written, before or while its top-level
    file is: step 40 stays the newest checkpoint and --resume auto picks it; the next
    checkpoint's prune removes the orphaned slice files, their directory and the temp."""
    from dbmpi.io.checkpoint import stale_slices, stale_temporaries

    write_sliced(tmp_path, network.tensors, {"params": network.params}, [0, 300, network.n_params], step=40)
    kill_while_writing(SLICE_CRASH, tmp_path, LOCAL_DENSE, phase)
    orphans = sorted((tmp_path / "ckpt-000000050").iterdir())
    assert len(orphans) == 2
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(40)]
    assert newest_valid(tmp_path).name == checkpoint_name(40)
    assert len(stale_temporaries(tmp_path)) == (phase == "top-level")
    assert stale_slices(tmp_path) == []  # step 50 is past the newest checkpoint: maybe being written
    write_sliced(tmp_path, network.tensors, {"params": network.params}, [0, 300, network.n_params], step=60)
    temporaries = stale_temporaries(tmp_path)
    deleted = prune(tmp_path, keep=3)
    assert sorted(deleted) == sorted(orphans + temporaries) and not stale_temporaries(tmp_path)
    assert not (tmp_path / "ckpt-000000050").exists()
    assert [p.name for p in list_checkpoints(tmp_path)] == [checkpoint_name(40), checkpoint_name(60)]
    for path in list_checkpoints(tmp_path):
        open_checkpoint(path).close()


def test_prune_removes_a_checkpoint_with_its_slices_and_rewriting_a_step_keeps_it_valid(tmp_path, network):
    for step in (10, 20, 30):
        write_sliced(tmp_path, network.tensors, {"params": network.params}, [0, 300, network.n_params], step=step)
    deleted = prune(tmp_path, keep=2)
    assert checkpoint_name(10) in {p.name for p in deleted} and not (tmp_path / "ckpt-000000010").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000000020", "ckpt-000000020.h5",
                                                           "ckpt-000000030", "ckpt-000000030.h5"]
    # Writing step 30 again (a resume with nothing left to do) makes fresh slice files: the
    # checkpoint in place stays valid until the new top-level file replaces it.
    before = sorted((tmp_path / "ckpt-000000030").iterdir())
    changed = network.params + 1
    write_sliced(tmp_path, network.tensors, {"params": changed}, [0, 500, network.n_params], step=30)
    prune(tmp_path, keep=2)
    after = sorted((tmp_path / "ckpt-000000030").iterdir())
    assert len(after) == 2 and not set(before) & set(after)
    with open_checkpoint(tmp_path / checkpoint_name(30)) as ckpt:
        np.testing.assert_array_equal(ckpt.read_range("params", 0, network.n_params), changed)


def test_a_diverged_checkpoint_keeps_its_slices(tmp_path, network):
    """A final checkpoint set aside as *.h5.diverged (docs/GUIDE.md) still opens: prune leaves
    the slice files it refers to."""
    from dbmpi.algorithms.run import set_aside

    path = write_sliced(tmp_path, network.tensors, {"params": network.params}, [0, 300, network.n_params], step=10)
    aside = set_aside(path)
    write_sliced(tmp_path, network.tensors, {"params": network.params}, [0, 300, network.n_params], step=20)
    prune(tmp_path, keep=1)
    with open_checkpoint(aside) as ckpt:
        assert ckpt.step == 10


@pytest.mark.parametrize("n_shards", [1, 2, 4])
def test_a_big_model_writes_and_verifies_by_shard(tmp_path, n_shards):
    """16M parameters (64 MB per vector), two vectors: every shard's slice written, the
    top-level file joins them, each shard's range verifies and reads back; whole tensors
    through the virtual datasets equal the vectors."""
    from dbmpi.model.network import Tensor
    from dbmpi.runtime.layout import balanced_ranges

    shapes = [(3001, 4000), (3001,), (1000, 3, 1333), (7, 999)]
    tensors, offset = [], 0
    for i, shape in enumerate(shapes):
        tensors.append(Tensor(f"layer{i}.W", i, shape, offset))
        offset += int(np.prod(shape))
    n = offset
    rng = np.random.default_rng(2)
    vectors = {"params": rng.standard_normal(n, dtype=np.float32), "adagrad/accum": rng.random(n, dtype=np.float32)}
    ranges = balanced_ranges(n, n_shards)
    path = write_sliced(tmp_path, tensors, vectors, [lo for lo, _ in ranges] + [n])
    with open_checkpoint(path, verify="structure") as ckpt:
        for lo, hi in ranges:
            assert ckpt.verify_range(lo, hi) == []
            np.testing.assert_array_equal(ckpt.read_range("adagrad/accum", lo, hi), vectors["adagrad/accum"][lo:hi])
        for name, ds in ckpt.tensor_datasets("params"):
            t = next(t for t in tensors if t.name == name)
            np.testing.assert_array_equal(ds[()].reshape(-1), vectors["params"][t.offset:t.offset + t.size])
