"""LoRA: identity at init, only adapters train, merge == base + A@B, adapter-only checkpoints, memory."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import sharding
from maxlm.checkpoint import read_state
from maxlm.models import build_model, lora
from maxlm.models.transformer import ModelConfig
from maxlm.train.events import read_events
from maxlm.train.loop import train
from maxlm.train.objectives import make_objective
from maxlm.train.optimizer import make_optimizer
from maxlm.train.step import init_frozen, init_state, make_train_step, state_layout
from tests.helpers import preset_config, random_batch, tiny_config, tree_nbytes

CFG = lora.LoraConfig(rank=4, alpha=8.0, targets=r"attn/w[qkvo]|mlp/w_(gate|up|down)")


def _model():
    cfg = ModelConfig(vocab_size=61, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                      max_seq_len=32, attention="xla")
    model = build_model(cfg)
    return model, jax.jit(model.init)(jax.random.key(0))


def _logits(model, params, batch):
    return model.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"])[0]


def test_lora_at_init_is_the_base_model():
    model, base = _model()
    adapters = lora.init_lora(jax.random.key(1), base, CFG)
    assert sorted(adapters) == ["blocks/attn/wk", "blocks/attn/wo", "blocks/attn/wq", "blocks/attn/wv",
                                "blocks/mlp/w_down", "blocks/mlp/w_gate", "blocks/mlp/w_up"]
    batch = random_batch(2, 8, 61)
    np.testing.assert_array_equal(_logits(model, lora.merge(base, adapters, CFG), batch), _logits(model, base, batch))


def test_merge_adds_scaled_a_times_b():
    model, base = _model()
    adapters = lora.init_lora(jax.random.key(1), base, CFG)
    adapters = jax.tree.map(lambda x: x + 0.1, adapters)  # non-zero B
    merged = lora.merge(base, adapters, CFG)
    a, b = adapters["blocks/attn/wo"]["a"], adapters["blocks/attn/wo"]["b"]  # wo: [L, heads, head_dim | embed]
    expected = base["blocks"]["attn"]["wo"] + CFG.scale * jnp.einsum("lhkr,lrd->lhkd", a, b)
    np.testing.assert_allclose(merged["blocks"]["attn"]["wo"], expected, rtol=1e-6)
    np.testing.assert_array_equal(merged["embed"], base["embed"])
    batch = random_batch(2, 8, 61)
    assert not np.allclose(_logits(model, merged, batch), _logits(model, base, batch))


def test_dropout_masks_only_the_adapter_branch_input():
    model, base = _model()
    dropped = lora.LoraConfig(4, 8.0, CFG.targets, dropout=0.5)
    adapters = lora.init_lora(jax.random.key(1), base, dropped)
    batch = random_batch(2, 8, 61)
    # B = 0: the branch adds nothing whatever its mask, so the model is the base model exactly
    fresh = lora.with_dropout(base, adapters, dropped, jax.random.key(2))
    np.testing.assert_allclose(_logits(model, fresh, batch), _logits(model, base, batch), rtol=1e-6, atol=1e-6)

    adapters = jax.tree.map(lambda x: x + 0.1, adapters)
    update = lora.with_dropout(base, adapters, dropped, jax.random.key(2))["blocks"]["mlp"]["w_up"]
    assert isinstance(update, lora.LowRankUpdate) and update.rng.shape == (2, 2)  # a key per layer
    layer = jax.tree.map(lambda a: a[1], update)
    x = jax.random.normal(jax.random.key(3), (2, 8, 32))
    keep = jax.random.bernoulli(jax.random.wrap_key_data(layer.rng), 0.5, x.shape)
    expected = x @ layer.base + dropped.scale * (jnp.where(keep, 2 * x, 0) @ layer.a) @ layer.b
    np.testing.assert_allclose(lora.project("btd,df->btf", x, layer), expected, rtol=1e-5, atol=1e-6)
    # inverted dropout: over many masks the branch averages to the merged weight's
    mean = jnp.mean(jnp.stack([lora.project("btd,df->btf", x, dataclasses.replace(
        layer, rng=jax.random.key_data(jax.random.key(i)))) for i in range(400)]), 0)
    merged = x @ (layer.base + dropped.scale * layer.a @ layer.b)
    np.testing.assert_allclose(mean, merged, atol=0.15 * float(jnp.std(merged - x @ layer.base)))
    assert not np.allclose(lora.project("btd,df->btf", x, layer), merged, atol=1e-3)


def test_lora_dropout_trains_with_different_masks_every_step_and_evaluates_merged():
    config = tiny_config()
    mesh = sharding.make_mesh(2, 1, 1, devices=jax.devices()[:2])
    rules = sharding.DEFAULT_RULES
    model = build_model(ModelConfig.from_config(config.model, 61), rules)
    tx = make_optimizer(config.train)
    losses = {}
    for rate in (0.0, 0.3):
        layout = state_layout(model, tx, mesh, lora.LoraConfig(4, 8.0, CFG.targets, dropout=rate))
        with jax.set_mesh(mesh):
            frozen = init_frozen(model, layout, seed=0)
            state = init_state(model, tx, layout, seed=0)
            step = make_train_step(make_objective("pretrain", model, config.train), tx, layout, mesh, rules)
            batch = sharding.to_global_batch(random_batch(8, 16, 61), mesh, rules)
            losses[rate] = []
            for _ in range(3):  # the same batch: only the masks differ between steps
                state, metrics = step(state, batch, frozen)
                losses[rate].append(float(metrics["loss"]))
            assert layout.model_params(state["params"], frozen)["blocks"]["attn"]["wq"].shape == (2, 32, 4, 8)
    assert losses[0.3][0] == pytest.approx(losses[0.0][0], rel=1e-5)  # B = 0 at step 0: dropout changes nothing
    assert losses[0.3][1:] != pytest.approx(losses[0.0][1:], rel=1e-4)


def test_bad_targets_are_errors():
    _, base = _model()
    with pytest.raises(ValueError, match="matches no parameter"):
        lora.init_lora(jax.random.key(0), base, lora.LoraConfig(4, 8.0, "nothing_here"))
    with pytest.raises(ValueError, match="not a weight matrix"):
        lora.init_lora(jax.random.key(0), base, lora.LoraConfig(4, 8.0, "norm"))


def test_only_adapters_train_and_the_base_is_untouched():
    config = tiny_config()
    mesh = sharding.make_mesh(2, 2, 2)
    rules = sharding.DEFAULT_RULES
    model = build_model(ModelConfig.from_config(config.model, 61), rules)
    tx = make_optimizer(config.train)
    layout = state_layout(model, tx, mesh, CFG)
    with jax.set_mesh(mesh):
        frozen = init_frozen(model, layout, seed=0)
        before = jax.device_get(frozen)
        state = init_state(model, tx, layout, seed=0)
        adapters0 = jax.device_get(state["params"])
        step = make_train_step(make_objective("pretrain", model, config.train), tx, layout, mesh, rules)
        for i in range(3):  # B moves first (A's gradient is 0 while B is 0), then A
            batch = sharding.to_global_batch(random_batch(8, 16, 61, seed=i), mesh, rules)
            state, metrics = step(state, batch, frozen)
    assert np.isfinite(float(metrics["loss"]))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(frozen), before)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), jax.device_get(state["params"]), adapters0)
    assert all(jax.tree.leaves(changed))
    assert set(state["opt_state"][1].inner_state[0].mu) == set(adapters0)  # optimizer state: adapters only


def test_adapter_only_checkpoint_round_trip(tmp_path):
    config = tiny_config()
    config.lora.rank = 4
    config.train.update(steps=4)
    config.checkpoint.update(every_steps=2, async_save=False)
    train(config, str(tmp_path))
    saved = read_state(tmp_path)
    assert set(saved["params"]) == {"blocks/attn/wq", "blocks/attn/wk", "blocks/attn/wv", "blocks/attn/wo",
                                    "blocks/mlp/w_gate", "blocks/mlp/w_up", "blocks/mlp/w_down"}
    config.train.steps = 6
    train(config, str(tmp_path))  # resumes the adapters onto the same (seeded) base
    assert [e["step"] for e in read_events(tmp_path) if e["event"] == "resume"] == [4]
    assert int(read_state(tmp_path)["step"]) == 6


def test_lora_shrinks_the_optimizer_state_of_a_124m_model_over_50x():
    config = preset_config("gpt2_small")
    model = build_model(ModelConfig.from_config(config.model))
    tx = make_optimizer(config.train)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    full = state_layout(model, tx, mesh)
    low = state_layout(model, tx, mesh, lora.LoraConfig(8, 16.0, r"attn/w[qkvo]|mlp/w_(gate|up|down)"))
    assert tree_nbytes(full.abstract["opt_state"]) / tree_nbytes(low.abstract["opt_state"]) > 50


def test_int8_base_round_trips_within_half_a_step_per_channel():
    model, params = _model()
    cfg = lora.LoraConfig(4, 8.0, CFG.targets, quantize_base=True)
    stored = lora.quantize_int8(params, cfg)
    back = lora.dequantize(stored)
    for path in lora.target_paths(params, cfg):
        block, module, name = path.split("/")
        q, w = stored[block][module][name], params[block][module][name]
        assert q["int8"].dtype == jnp.int8 and q["int8"].shape == w.shape
        error = jnp.abs(back[block][module][name] - w)
        assert bool(jnp.all(error <= q["scale"] / 2 + 1e-7))
    np.testing.assert_array_equal(back["embed"], params["embed"])  # untargeted params are not touched
    np.testing.assert_array_equal(back["blocks"]["attn_norm"]["scale"], params["blocks"]["attn_norm"]["scale"])


def test_int8_base_stores_a_quarter_of_the_targeted_bytes_of_a_124m_model():
    config = preset_config("gpt2_small")
    model = build_model(ModelConfig.from_config(config.model))
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    cfg = lora.LoraConfig(8, 16.0, CFG.targets, quantize_base=True)
    layout = state_layout(model, make_optimizer(config.train), mesh, cfg)
    stored = jax.eval_shape(lambda p: lora.quantize_int8(p, cfg), layout.frozen_abstract)
    targets = lora.target_paths(layout.frozen_abstract, cfg)
    targeted = sum(np.prod(leaf.shape) for path, leaf in jax.tree_util.tree_flatten_with_path(
        layout.frozen_abstract)[0] if "/".join(k.key for k in path) in targets)
    assert tree_nbytes(layout.frozen_abstract) - tree_nbytes(stored) > 0.74 * 3 * targeted  # 4 bytes -> 1 (+ scales)
    assert jax.tree.structure(layout.frozen_shardings) == jax.tree.structure(stored)


def test_qlora_trains_on_the_int8_base_close_to_the_float_base(tmp_path):
    losses = {}
    for quantize in (False, True):
        config = tiny_config()
        config.lora.update(rank=4, alpha=8.0, quantize_base=quantize)
        config.train.steps = 3
        losses[quantize] = train(config, str(tmp_path / str(quantize)))["loss"]
    assert np.isfinite(losses[True]) and losses[True] == pytest.approx(losses[False], rel=1e-2)
