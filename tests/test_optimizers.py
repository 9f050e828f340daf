"""The optimizers (dbmpi.algorithms.optimizers): chunked updates equal whole-vector ones,
`scale` scales the learning rate, Adam's update count, and agreement with torch.optim."""
import numpy as np
import pytest

from dbmpi import config
from dbmpi.algorithms.optimizers import EVERYWHERE, make_optimizer, resume_state, resumed_updates
from tests.conftest import assert_close, randn

N = 1000
CUTS = [0, 1, 300, 301, 999, 1000]  # chunks of 1, 299, 1, 698 and 1 values


def train_table(name: str, lr: float = 0.01, **extra) -> dict:
    """A [train] table with every optimizer key at its default."""
    table = {key: field.default for key, field in config.TRAIN_FIELDS.items()}
    return dict(table, optimizer=name, learning_rate=lr, **extra)


def apply(optimizer, params, grads, chunked: bool, scales=None) -> None:
    """Apply one update per gradient, whole or chunk by chunk as a shard does."""
    for i, grad in enumerate(grads):
        scale = 1.0 if scales is None else scales[i]
        optimizer.begin_update()
        if not chunked:
            optimizer.step(params, grad, EVERYWHERE, scale=scale)
            continue
        for lo, hi in zip(CUTS[:-1], CUTS[1:], strict=True):
            optimizer.step(params[lo:hi], grad[lo:hi], slice(lo, hi), scale=scale)


@pytest.mark.parametrize("name", config.OPTIMIZERS)
def test_chunked_updates_equal_whole_vector_updates(rng, name):
    p0, grads = randn(rng, N), [randn(rng, N) for _ in range(4)]
    whole, chunked = make_optimizer(train_table(name), N), make_optimizer(train_table(name), N)
    p_whole, p_chunked = p0.copy(), p0.copy()
    apply(whole, p_whole, grads, chunked=False)
    apply(chunked, p_chunked, grads, chunked=True)
    # Equal up to rounding (BLAS and vectorised loops may round a chunk's edges differently).
    assert_close(p_chunked, p_whole, rtol=1e-6, atol=1e-7)
    for key in whole.state:
        assert_close(chunked.state[key], whole.state[key], rtol=1e-6, atol=1e-7, name=key)
    assert whole.updates == chunked.updates == 4
    assert not np.array_equal(p_whole, p0)


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adagrad"])
def test_scale_multiplies_the_learning_rate(rng, name):
    p0, grads = randn(rng, N), [randn(rng, N) for _ in range(3)]
    scaled, slower = make_optimizer(train_table(name, 0.02), N), make_optimizer(train_table(name, 0.01), N)
    p_scaled, p_slower = p0.copy(), p0.copy()
    apply(scaled, p_scaled, grads, chunked=True, scales=[0.5] * 3)
    apply(slower, p_slower, grads, chunked=True)
    assert_close(p_scaled, p_slower, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_scale_scales_adams_step_and_decay(rng, name):
    # Adam's state does not depend on the learning rate, so lr 0.02 at scale 0.5 is lr 0.01.
    p0, grads = randn(rng, N), [randn(rng, N) for _ in range(3)]
    scaled, slower = make_optimizer(train_table(name, 0.02), N), make_optimizer(train_table(name, 0.01), N)
    p_scaled, p_slower = p0.copy(), p0.copy()
    apply(scaled, p_scaled, grads, chunked=True, scales=[0.5, 0.5, 0.5])
    apply(slower, p_slower, grads, chunked=True)
    assert_close(p_scaled, p_slower, rtol=1e-5, atol=1e-6)
    assert not np.allclose(p_scaled, p0)


def test_adam_counts_an_update_once_and_not_an_empty_one(rng):
    adam = make_optimizer(train_table("adam"), N)
    p, g = randn(rng, N), randn(rng, N)
    adam.begin_update()  # nothing applied (every chunk empty or dropped): not counted
    adam.begin_update()
    adam.step(p[:10], g[:10], slice(0, 10))
    adam.step(p[10:], g[10:], slice(10, N))
    assert adam.updates == 1
    adam.step(p, g)  # a whole-vector step without begin_update is one update
    assert adam.updates == 2


def test_adamw_decays_weights_where_adam_does_not(rng):
    p0, zero = randn(rng, N), np.zeros(N, np.float32)
    adam, adamw = make_optimizer(train_table("adam", 0.1), N), make_optimizer(train_table("adamw", 0.1), N)
    p_adam, p_adamw = p0.copy(), p0.copy()
    adam.step(p_adam, zero)
    adamw.step(p_adamw, zero)
    np.testing.assert_array_equal(p_adam, p0)
    assert_close(p_adamw, p0 * (1 - 0.1 * 0.01), rtol=1e-6, atol=1e-7)


def test_resumed_updates_take_the_old_shards_count():
    slices = [{"shard": 0, "lo": 0, "hi": 50}, {"shard": 1, "lo": 50, "hi": 100}]
    assert resumed_updates([70, 68], slices, 0, 50) == 70  # the same shards: its own count
    assert resumed_updates([70, 68], slices, 50, 100) == 68
    assert resumed_updates([70, 68], slices, 0, 100) == 68  # one shard over both: the smaller
    assert resumed_updates([70, 68], slices, 10, 40) == 70
    assert resumed_updates(None, slices, 0, 100) == 0



@pytest.mark.parametrize("name", ["momentum", "nesterov", "adam", "adamw"])
def test_agrees_with_torch_optim(rng, name):
    torch = pytest.importorskip("torch")
    p0, grads = randn(rng, N), [randn(rng, N) for _ in range(5)]
    ours = make_optimizer(train_table(name, 0.01), N)
    p = p0.copy()
    apply(ours, p, grads, chunked=True)
    tp = torch.nn.Parameter(torch.from_numpy(p0.copy()))
    make = {"momentum": lambda: torch.optim.SGD([tp], lr=0.01, momentum=0.9),
            "nesterov": lambda: torch.optim.SGD([tp], lr=0.01, momentum=0.9, nesterov=True),
            "adam": lambda: torch.optim.Adam([tp], lr=0.01),
            "adamw": lambda: torch.optim.AdamW([tp], lr=0.01, weight_decay=0.01)}[name]
    opt = make()
    for g in grads:
        tp.grad = torch.from_numpy(g.copy())
        opt.step()
    assert_close(p, tp.detach().numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["nesterov", "adam", "adamw"])
@pytest.mark.parametrize("new_cuts", [[0, 150, 700], [0, 700], [0, 100, 400, 800]], ids=["same-S", "S=1", "S=3"])
def test_a_shard_resumes_its_state_from_a_sliced_checkpoint(tmp_path, rng, name, new_cuts):
    """A checkpoint written by 2 shards (slices [0, 150) and [150, 700) of the test model
    cut at 150 and 700, then the rest): each new shard's optimizer, with the same S or
    another, holds the checkpoint's state over its own range and the old shards' count."""
    from dbmpi.io.checkpoint import open_checkpoint
    from dbmpi.model import Network
    from tests.models import LOCAL_DENSE
    from tests.test_checkpoint import write_sliced

    network = Network.from_string(LOCAL_DENSE)
    n = network.n_params
    template = make_optimizer(train_table(name), n)
    vectors = {"params": network.params.copy()}
    vectors.update({f"{name}/{key}": randn(rng, n) for key in template.state})
    old_cuts, counts = [0, 150, 700, n], [41, 40, 39]
    path = write_sliced(tmp_path, network.tensors, vectors, old_cuts,
                        state={"step": 12, "shard_versions": counts, "optimizer_updates": counts})
    bounds = [*new_cuts, n]
    with open_checkpoint(path) as ckpt:
        for lo, hi in zip(bounds[:-1], bounds[1:], strict=True):
            optimizer = make_optimizer(train_table(name), hi - lo)
            assert resume_state(optimizer, ckpt, lo, hi)
            for key, value in optimizer.state.items():
                np.testing.assert_array_equal(value, vectors[f"{name}/{key}"][lo:hi])
            spanned = [c for c, a, b in zip(counts, old_cuts[:-1], old_cuts[1:], strict=True) if a < hi and lo < b]
            assert optimizer.updates == min(spanned)
            other = make_optimizer(train_table("adagrad"), hi - lo)  # another optimizer's state: fresh
            assert not resume_state(other, ckpt, lo, hi) and other.updates == 0
