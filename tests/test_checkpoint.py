"""Tests for maxlm.checkpoint: round trips, policies, fallback, resharding, partial restore."""

import pickle
import time

import grain
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from maxlm.checkpoint import CheckpointMismatchError, CheckpointRestoreError, Checkpointer, load_params, read_state
from maxlm.train.events import read_events

# tests/conftest.py gives JAX 8 fake CPU devices.
needs_8_devices = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 (fake) devices")

SHAPES = {"w1": (16, 32), "w2": (32, 16), "b": (32,)}
TX = optax.adamw(1e-3)


def _mesh(shape: tuple[int, ...], names: tuple[str, ...]) -> jax.sharding.Mesh:
    n = int(np.prod(shape))
    return jax.make_mesh(shape, names, devices=jax.devices()[:n])


def _specs(a: str | None, b: str | None) -> dict[str, P]:
    """Param layout: w1 sharded (a, b), w2 sharded (b, a), bias on b."""
    return {"w1": P(a, b), "w2": P(b, a), "b": P(b)}


def _abstract(mesh, specs, shapes=SHAPES):
    rep = NamedSharding(mesh, P())
    params = {
        k: jax.ShapeDtypeStruct(s, jnp.float32, sharding=NamedSharding(mesh, specs.get(k, P())))
        for k, s in shapes.items()
    }
    on_mesh = lambda x: jax.ShapeDtypeStruct(
        x.shape,
        x.dtype,
        sharding=NamedSharding(mesh, x.sharding.spec) if isinstance(x.sharding, NamedSharding) else rep,
    )
    return {
        "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
        "params": params,
        "opt_state": jax.tree.map(on_mesh, jax.eval_shape(TX.init, params)),
        "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
    }


def _state(abstract, seed=0):
    """A train state with random params and a non-trivial adamw state, placed like `abstract`."""
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s).astype(np.float32) for k, s in SHAPES.items()}
    _, opt_state = TX.update(params, TX.init(params), params)
    state = {
        "step": np.int32(7),
        "params": params,
        "opt_state": opt_state,
        "rng": np.array([seed, 42], np.uint32),
    }
    return jax.tree.map(lambda v, a: jax.device_put(v, a.sharding), state, abstract)


def _assert_bitwise_equal(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    jax.tree.map(lambda x, y: np.testing.assert_array_equal(np.asarray(x), np.asarray(y)), a, b)


def _assert_placed_like(state, abstract):
    jax.tree.map(
        lambda x, a: (
            (x.shape, x.dtype) == (a.shape, a.dtype)
            and x.sharding.is_equivalent_to(a.sharding, x.ndim)
            or pytest.fail(f"{x.sharding}")
        ),
        state,
        abstract,
    )


def _iterator():
    return iter(grain.MapDataset.range(100).shuffle(seed=0).batch(4).to_iter_dataset())


@pytest.fixture
def small():
    mesh = _mesh((2,), ("data",))
    abstract = _abstract(mesh, _specs(None, "data"))
    return abstract, _state(abstract)


@pytest.mark.parametrize("async_save", [False, True])
def test_round_trip_is_bitwise_and_unpickled(tmp_path, small, monkeypatch, async_save):
    abstract, state = small
    ckpt = Checkpointer(tmp_path, every_steps=1, async_save=async_save)
    assert ckpt.save(7, state, config_json='{"model": {"d": 8}}')
    ckpt.close()

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle used while restoring")

    monkeypatch.setattr(pickle, "load", no_pickle)
    monkeypatch.setattr(pickle, "loads", no_pickle)
    ckpt = Checkpointer(tmp_path, every_steps=1)
    restored, step = ckpt.restore(abstract)
    assert step == 7
    _assert_bitwise_equal(restored, state)
    _assert_placed_like(restored, abstract)
    assert ckpt.read_config(7) == {"model": {"d": 8}}
    assert [e["event"] for e in read_events(tmp_path)] == ["checkpoint_save", "checkpoint_restore"]
    ckpt.close()


def test_no_checkpoint_restores_none(tmp_path, small):
    ckpt = Checkpointer(tmp_path, every_steps=1)
    assert ckpt.latest_step() is None
    assert ckpt.restore(small[0]) is None
    ckpt.close()


def test_step_and_keep_policies(tmp_path, small):
    _, state = small
    ckpt = Checkpointer(tmp_path, every_steps=2, keep_last=2, keep_every=4, async_save=False)
    saved = [step for step in range(1, 11) if ckpt.save(step, state)]
    assert saved == [2, 4, 6, 8, 10]
    assert ckpt.all_steps() == [4, 8, 10]
    assert ckpt.save(11, state, force=True)  # e.g. the final or preemption save
    assert not ckpt.save(11, state, force=True)  # already there: a no-op, not an error
    assert ckpt.all_steps() == [4, 8, 10, 11]
    ckpt.close()


def test_time_policy(tmp_path, small):
    _, state = small
    ckpt = Checkpointer(tmp_path, every_minutes=1 / 60, async_save=False)
    assert ckpt.save(1, state)  # a fresh run saves its first step
    assert not ckpt.save(2, state)
    time.sleep(1.1)
    assert ckpt.save(3, state)
    ckpt.close()


def test_the_time_policy_decides_a_step_once(tmp_path, small):
    """The loop checks a step's health when will_save says yes; save() must then agree, whatever the clock says."""
    _, state = small
    ckpt = Checkpointer(tmp_path, every_minutes=1 / 60, async_save=False)
    assert ckpt.save(1, state)
    assert not ckpt.will_save(2)  # unchecked: it must not be saved later
    time.sleep(1.1)
    assert not ckpt.save(2, state)
    assert ckpt.will_save(3) and ckpt.save(3, state)
    assert ckpt.all_steps() == [1, 3]
    ckpt.close()


# Orbax/TensorStore may leave a callback on a closed event loop after a failed read.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupted_latest_is_quarantined_and_previous_used(tmp_path, small, damage):
    abstract, _ = small
    ckpt = Checkpointer(tmp_path, every_steps=1, async_save=False)
    states = {step: _state(abstract, seed=step) for step in (1, 2, 3)}
    for step, state in states.items():
        ckpt.save(step, state)
    for f in (tmp_path / "checkpoints" / "3" / "state" / "d").iterdir():
        if damage == "truncate":
            with open(f, "r+b") as fh:
                fh.truncate(5)
        else:
            f.unlink()

    restored, step = ckpt.restore(abstract)
    assert step == 2
    _assert_bitwise_equal(restored, states[2])
    assert ckpt.all_steps() == [1, 2]
    assert [p.name.split("-")[0] for p in (tmp_path / "quarantine").iterdir()] == ["3"]
    quarantined = [e for e in read_events(tmp_path) if e["event"] == "checkpoint_quarantined"]
    assert len(quarantined) == 1 and quarantined[0]["step"] == 3 and quarantined[0]["error"]
    ckpt.close()


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_when_nothing_restores_nothing_is_quarantined(tmp_path, small):
    abstract, state = small
    ckpt = Checkpointer(tmp_path, every_steps=1, async_save=False)
    ckpt.save(1, state)
    (tmp_path / "checkpoints" / "1" / "state" / "_METADATA").write_text('{"tree_meta')
    with pytest.raises(CheckpointRestoreError, match=r"latest \(step 1\) failed with"):
        ckpt.restore(abstract)
    assert ckpt.all_steps() == [1] and not (tmp_path / "quarantine").exists()
    ckpt.close()


def test_half_written_step_is_ignored(tmp_path, small):
    abstract, state = small
    ckpt = Checkpointer(tmp_path, every_steps=1, async_save=False)
    ckpt.save(1, state)
    ckpt.close()
    partial = tmp_path / "checkpoints" / "2.orbax-checkpoint-tmp" / "state"
    partial.mkdir(parents=True)
    (partial / "_METADATA").write_text('{"tree_meta')

    ckpt = Checkpointer(tmp_path, every_steps=1)
    assert ckpt.latest_step() == 1
    assert ckpt.restore(abstract)[1] == 1
    assert not (tmp_path / "quarantine").exists()
    ckpt.close()


def test_shape_mismatch_names_the_parameter_and_keeps_the_checkpoint(tmp_path, small):
    abstract, state = small
    ckpt = Checkpointer(tmp_path, every_steps=1, async_save=False)
    ckpt.save(1, state)
    mesh = _mesh((2,), ("data",))
    wrong = _abstract(mesh, _specs(None, "data"), shapes={**SHAPES, "w1": (16, 64)})
    with pytest.raises(
        CheckpointMismatchError,
        match=r"params\.w1: checkpoint has shape \(16, 32\), "
        r"config expects \(16, 64\)",
    ):
        ckpt.restore(wrong)
    missing = _abstract(mesh, _specs(None, "data"), shapes={**SHAPES, "w3": (4,)})
    with pytest.raises(
        CheckpointMismatchError,
        match=r"params\.w3: config expects shape \(4,\), "
        r"missing in the checkpoint",
    ):
        ckpt.restore(missing)
    assert ckpt.all_steps() == [1]
    ckpt.close()


def test_data_iterator_state_is_taken_at_save_time(tmp_path, small):
    abstract, state = small
    ckpt = Checkpointer(tmp_path, every_steps=1, async_save=True)
    it = _iterator()
    for _ in range(3):
        next(it)
    ckpt.save(3, state, data_iterator=it)
    expected = [next(it) for _ in range(3)]  # advances while the async save runs
    ckpt.wait()

    resumed = _iterator()
    assert ckpt.restore(abstract, data_iterator=resumed)[1] == 3
    for want in expected:
        np.testing.assert_array_equal(next(resumed), want)
    ckpt.close()


@needs_8_devices
def test_load_params_partial_restore(tmp_path):
    abstract = _abstract(_mesh((2, 4), ("data", "model")), _specs("data", "model"))
    state = _state(abstract)
    ckpt = Checkpointer(tmp_path, every_steps=1, async_save=False)
    ckpt.save(5, state)
    ckpt.close()

    target = _abstract(_mesh((4,), ("fsdp",)), _specs("fsdp", None))["params"]
    for path in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / "5"):
        params = load_params(path, target)
        _assert_bitwise_equal(params, state["params"])
        _assert_placed_like(params, target)
    wrong = {**target, "b": jax.ShapeDtypeStruct((33,), jnp.float32, sharding=target["b"].sharding)}
    with pytest.raises(CheckpointMismatchError, match=r"params\.b: checkpoint has shape \(32,\)"):
        load_params(tmp_path, wrong)
    with pytest.raises(FileNotFoundError, match="no checkpoint found"):
        load_params(tmp_path / "nothing", target)


@pytest.fixture(scope="module")
def saved_on_2x4(tmp_path_factory):
    if len(jax.devices()) < 8:
        pytest.skip("needs 8 (fake) devices")
    workdir = tmp_path_factory.mktemp("resharding")
    abstract = _abstract(_mesh((2, 4), ("data", "model")), _specs("data", "model"))
    state = _state(abstract, seed=3)
    ckpt = Checkpointer(workdir, every_steps=1, async_save=True)
    ckpt.save(9, state)
    ckpt.close()
    return workdir, state


@pytest.mark.parametrize(
    "shape,names,specs",
    [
        ((4,), ("fsdp",), _specs("fsdp", None)),
        ((2,), ("fsdp",), _specs(None, "fsdp")),
        ((1,), ("fsdp",), _specs("fsdp", None)),
        ((4, 2), ("model", "data"), _specs("model", "data")),  # axes swapped
        ((8,), ("data",), _specs(None, None)),  # fully replicated
    ],
)
def test_restore_onto_another_mesh(saved_on_2x4, shape, names, specs):
    workdir, state = saved_on_2x4
    target = _abstract(_mesh(shape, names), specs)
    ckpt = Checkpointer(workdir, every_steps=1)
    restored, step = ckpt.restore(target)
    assert step == 9
    _assert_bitwise_equal(restored, state)
    _assert_placed_like(restored, target)
    ckpt.close()


def test_async_save_is_not_disturbed_by_donating_the_state(tmp_path):
    mesh = _mesh((2,), ("data",))
    abstract = _abstract(mesh, _specs(None, "data"))
    state = _state(abstract)
    expected = jax.tree.map(np.array, state)
    ckpt = Checkpointer(tmp_path, every_steps=1, async_save=True)
    ckpt.save(7, state)
    step = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
    for _ in range(3):  # the train step donates (frees) the saved buffers at once
        state = step(state)
    jax.block_until_ready(state)
    _assert_bitwise_equal(ckpt.restore(abstract)[0], expected)
    ckpt.close()


def test_relative_workdirs_work(tmp_path, monkeypatch):
    """README's command uses --workdir=runs/NAME: Orbax itself only takes absolute paths."""
    monkeypatch.chdir(tmp_path)
    state = {"w": jnp.arange(4.0)}
    ckpt = Checkpointer("runs/rel", every_steps=1, async_save=True)
    for step in (1, 2):
        ckpt.save(step, state)
    ckpt.wait()
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    restored, step = Checkpointer("runs/rel").restore(abstract)
    assert step == 2 and np.array_equal(restored["w"], state["w"])
    np.testing.assert_array_equal(read_state("runs/rel")["w"], state["w"])
    ckpt.close()


def test_saving_replicated_arrays_in_one_process_compiles_nothing(tmp_path):
    """One process holds every replica: Orbax writes each array from one device instead of jit-slicing it
    between replicas (one compile per array shape before the first save)."""
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    state = {"w": jax.device_put(np.arange(6 * 22, dtype=np.float32).reshape(6, 22), NamedSharding(mesh, P()))}
    compiles = []
    jax.monitoring.register_event_duration_secs_listener(
        lambda event, _secs, **_: compiles.append(event) if event.endswith("backend_compile_duration") else None)
    ckpt = Checkpointer(tmp_path, every_steps=1)
    assert ckpt.save(1, state)
    ckpt.wait()
    assert compiles == []
    abstract = {"w": jax.ShapeDtypeStruct((6, 22), jnp.float32, sharding=state["w"].sharding)}
    restored, step = ckpt.restore(abstract)
    np.testing.assert_array_equal(restored["w"], state["w"])
    assert step == 1 and restored["w"].sharding.is_equivalent_to(state["w"].sharding, 2)
