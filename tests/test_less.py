"""LESS: per-example gradients, the blockwise projection, Adam features, scores, a resumable deterministic run."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

from maxlm import sharding
from maxlm.config import ConfigError
from maxlm.models import build_model, lora
from maxlm.models.transformer import ModelConfig
from maxlm.select import features as feats
from maxlm.select import less
from tests.helpers import ROOT, random_batch

CFG = lora.LoraConfig(rank=4, alpha=8.0, targets=r"attn/w[qkvo]|mlp/w_(gate|up|down)")


@pytest.fixture(scope="module")
def tiny():
    """A tiny model, its base params, non-trivial adapters (B != 0) and a jitted single-example gradient."""
    cfg = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                      max_seq_len=32, attention="xla")
    model = build_model(cfg)

    def init(rng):
        base = model.init(rng)
        adapters = lora.init_lora(jax.random.fold_in(rng, 1), base, CFG)
        return base, jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.fold_in(rng, 2), x.shape),
                                  adapters)

    rng = jax.random.key(0)  # compiled at XLA's lowest optimisation level: it runs once
    base, adapters = jax.jit(init).lower(rng).compile(compiler_options={"xla_backend_optimization_level": 0})(rng)
    return model, base, adapters, jax.jit(jax.grad(feats.example_loss_fn(model, CFG)))


def _examples(count: int, seq: int = 12, seed: int = 0) -> dict[str, np.ndarray]:
    batch = random_batch(count, seq, 61, seed=seed)
    batch["loss_mask"][:, : seq // 3] = 0  # prompt tokens carry no loss
    batch["segment_ids"][1, seq - 3:] = 0  # a shorter, padded example
    batch["loss_mask"][1, seq - 3:] = 0
    return batch


def test_vmapped_per_example_grads_equal_a_loop_of_single_example_grads(tiny):
    model, base, adapters, single_grad = tiny
    examples = _examples(4)
    batched = jax.jit(feats.per_example_grads(model, CFG))(adapters, examples, base)
    for i in range(4):
        single = single_grad(adapters, {k: v[i] for k, v in examples.items()}, base)
        jax.tree.map(lambda b, s, i=i: np.testing.assert_allclose(b[i], s, rtol=2e-5, atol=1e-7), batched, single)
    # the mean token loss: example 1's padding adds nothing, and only adapters have gradients
    assert set(batched) == set(adapters)
    assert not np.allclose(ravel_pytree(jax.tree.map(lambda g: g[0], batched))[0],
                           ravel_pytree(jax.tree.map(lambda g: g[1], batched))[0])


def test_projection_preserves_inner_products_within_the_jl_tolerance():
    count, size, dim = 20, 3000, 1024
    vectors = jax.random.normal(jax.random.key(0), (count, size))
    vectors = vectors / jnp.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors.at[1].set(vectors[0] * 0.8 + vectors[1] * 0.6)  # a correlated pair too
    project = jax.jit(feats.project, static_argnums=1)
    projected = project(vectors, feats.Projection(dim, seed=3))
    # JL: d >= 8 ln(n) / eps^2 keeps every pairwise inner product of unit vectors within eps
    eps = np.sqrt(8 * np.log(count) / dim)
    error = np.abs(np.asarray(projected @ projected.T) - np.asarray(vectors @ vectors.T))
    assert error.max() < eps
    # blockwise and seeded: zero-padding the input changes nothing, another seed changes everything
    padded = jnp.pad(vectors, ((0, 0), (0, 700)))
    np.testing.assert_allclose(project(padded, feats.Projection(dim, seed=3)), projected, rtol=1e-4, atol=1e-5)
    assert not np.allclose(project(vectors, feats.Projection(dim, seed=4)), projected, atol=1e-2)


def test_adam_feature_matches_a_hand_computation_from_given_moments(tiny):
    model, base, adapters, single_grad = tiny
    examples = _examples(2)
    rng = np.random.default_rng(5)
    mu = jax.tree.map(lambda x: 0.01 * rng.standard_normal(x.shape, np.float32), adapters)
    nu = jax.tree.map(lambda x: 1e-4 * rng.uniform(size=x.shape).astype(np.float32), adapters)
    adam, projection = feats.AdamMoments(b1=0.9, b2=0.95, eps=1e-8), feats.Projection(256, seed=0)
    got = feats.make_feature_fn(model, CFG, projection, adam)(adapters, base, examples, (mu, nu))

    m, v = (np.asarray(ravel_pytree(t)[0], np.float64) for t in (mu, nu))
    project = jax.jit(feats.project, static_argnums=1)
    for i in range(2):
        g = np.asarray(ravel_pytree(single_grad(adapters, {k: x[i] for k, x in examples.items()}, base))[0],
                       np.float64)
        direction = (0.9 * m + 0.1 * g) / np.sqrt(0.95 * v + 0.05 * g ** 2 + 1e-8)
        expected = np.asarray(project(jnp.asarray(direction[None], jnp.float32), projection))[0]
        np.testing.assert_allclose(got[i], expected / np.linalg.norm(expected), rtol=1e-4, atol=1e-5)
        plain = np.asarray(project(jnp.asarray(g[None], jnp.float32), projection))[0]
        assert abs(plain @ expected) / np.linalg.norm(plain) / np.linalg.norm(expected) < 0.9  # preconditioning matters
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)


def test_sharded_features_are_the_projected_normalised_single_example_grads(tiny):
    model, base, adapters, single_grad = tiny
    examples = _examples(4)
    projection = feats.Projection(64, seed=1)
    mesh = sharding.make_mesh(2, 1, 1, devices=jax.devices()[:2])
    with jax.set_mesh(mesh):
        got = feats.make_feature_fn(model, CFG, projection, None, mesh=mesh)(adapters, base, examples, None)
    assert got.sharding.spec[0] == ("data", "fsdp")  # examples split over the batch axes
    grads = jnp.stack([ravel_pytree(single_grad(adapters, {k: v[i] for k, v in examples.items()}, base))[0]
                       for i in range(4)])
    expected = feats.normalize(jax.jit(feats.project, static_argnums=1)(grads, projection))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_scores_weight_checkpoints_average_subtasks_and_take_the_max():
    pool = [np.array([[1.0, 0.0], [0.0, 1.0]]), np.array([[0.0, 1.0], [1.0, 0.0]])]
    val = [np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])]
    weights, subtasks = np.array([0.75, 0.25]), np.array(["a", "a", "b"])
    sim = 0.75 * pool[0] @ val[0].T + 0.25 * pool[1] @ val[1].T  # [[0.75, 0, 0.45+0.25], [0.25, 1, 0.6]]
    expected = np.maximum(sim[:, :2].mean(1), sim[:, 2])
    np.testing.assert_allclose(less.less_scores(pool, val, weights, subtasks), expected)
    np.testing.assert_array_equal(less.top_indices(np.array([0.1, 0.9, 0.5, 0.9]), 0.5), [1, 3])


def _write(path, records):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _chat(user, assistant):
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _select_config(tmp, workdir, **overrides):
    words = ["apple", "river", "stone", "light", "cloud", "green", "music", "table"]
    pool = ([_chat(f"reverse {w}", w[::-1]) for w in words] + [_chat(f"add {i} {i + 3}", str(2 * i + 3))
                                                                for i in range(8)])
    _write(tmp / "pool.jsonl", pool)
    _write(tmp / "val.jsonl", [_chat("reverse horse", "esroh"), _chat("reverse plant", "tnalp")])
    c = less.select_config()
    c.update(workdir=str(workdir), pool=f"jsonl:{tmp / 'pool.jsonl'}", percentage=0.25, dim=64, batch_size=8,
             shard_size=8, seed=1)
    c.validation = {"reverse": f"jsonl:{tmp / 'val.jsonl'}"}
    c.warmup.update(fraction=0.5, epochs=2)
    t = c.train
    t.model.update(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_seq_len=64, attention="xla")
    t.train.update(batch_size=8, seq_len=48, lr=1e-2, log_every=1)
    t.data.update(sft_format="chat", tokenizer_text="builtin:tinyshakespeare", val_fraction=0.25)
    t.mesh.update(data=-1, fsdp=1, tensor=1)
    t.lora.rank = 4
    c.update(overrides)
    return c


@pytest.fixture(scope="module")
def selection(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("less")
    config = _select_config(tmp, tmp / "run")
    path = less.run_selection(config)
    return tmp, config, path


def _read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_selection_writes_sft_records_with_scores_and_is_deterministic(selection):
    tmp, _, path = selection
    chosen = _read_jsonl(path)
    assert len(chosen) == 4 and all("messages" in r and "less_score" in r for r in chosen)
    assert [r["less_score"] for r in chosen] == sorted((r["less_score"] for r in chosen), reverse=True)
    steps = sorted(os.listdir(tmp / "run" / "features"), key=int)
    assert len(steps) == 2 and sorted(os.listdir(tmp / "run" / "features" / steps[0])) == ["pool", "val_reverse"]
    again = less.run_selection(_select_config(tmp, tmp / "again"))  # a fresh workdir, the same seeds
    assert _read_jsonl(again) == chosen
    np.testing.assert_array_equal(np.load(tmp / "again" / "scores.npy"), np.load(tmp / "run" / "scores.npy"))


def test_stored_shards_are_not_recomputed(selection):
    tmp, config, _ = selection
    workdir = tmp / "run"
    pool_dir = workdir / "features" / min(os.listdir(workdir / "features"), key=int) / "pool"
    shard = pool_dir / "shard_00000.npy"
    original = np.load(shard)
    np.save(shard, -original)  # a stand-in: if the shard were recomputed the sign would come back
    (pool_dir / "shard_00001.npy").unlink()  # a shard lost mid-extraction: recomputed
    checkpoints = sorted(os.listdir(workdir / "warmup" / "checkpoints"))
    before = {c: os.path.getmtime(workdir / "warmup" / "checkpoints" / c) for c in checkpoints}
    less.run_selection(config)
    np.testing.assert_array_equal(np.load(shard), -original)
    assert (pool_dir / "shard_00001.npy").exists()
    assert {c: os.path.getmtime(workdir / "warmup" / "checkpoints" / c) for c in checkpoints} == before  # no warmup
    np.save(shard, original)


def test_feature_dir_of_other_examples_is_refused(tmp_path):
    rows = _examples(2)
    fn = lambda adapters, base, batch, moments: np.zeros((len(batch["tokens"]), 4), np.float32)
    key = feats.fingerprint(rows, feats.Projection(4, 0))
    feats.extract_features(fn, (None, None, None), rows, str(tmp_path), batch_size=2, shard_size=2, key=key)
    with pytest.raises(feats.FeatureDirMismatch, match="other examples"):
        feats.extract_features(fn, (None, None, None), rows, str(tmp_path), batch_size=2, shard_size=2,
                               key=feats.fingerprint(rows, feats.Projection(4, 1)))


@pytest.mark.parametrize("key, value, message", [
    ("percentage", 0.0, r"percentage=0.0 must be in \(0, 1\]"),
    ("dim", 0, "dim=0 must be positive"),
    ("validation", {}, "validation needs at least one subtask"),
])
def test_bad_select_config_is_one_clear_error(tmp_path, key, value, message):
    config = _select_config(tmp_path, tmp_path / "run")
    config[key] = value
    with pytest.raises(ConfigError, match=message):
        less.run_selection(config)


def test_warmup_config_errors_name_the_nested_key(tmp_path):
    config = _select_config(tmp_path, tmp_path / "run")
    config.train.lora.rank = 0
    with pytest.raises(ConfigError, match=r"train.lora.rank=0"):
        less.run_selection(config)
    config = _select_config(tmp_path, tmp_path / "run")
    config.train.model.num_heads = 3
    with pytest.raises(ConfigError, match=r"^train.model.num_heads=3 does not divide model.d_model=32"):
        less.run_selection(config)


@pytest.mark.parametrize("flag, line", [
    ("--config.percentage=1.5", "error: percentage=1.5 must be in (0, 1]"),
    ("--config.percentag=0.1", "config error: unknown config key 'percentag' (did you mean 'percentage'?)"),
])
def test_launch_select_bad_config_exits_2_with_one_line(tmp_path, flag, line):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "select_data.py"), f"--config={ROOT}/configs/less_demo.py:{tmp_path}",
         f"--config.workdir={tmp_path}/run", flag],
        check=False, capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [line]
