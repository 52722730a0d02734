"""The jitted train step: sharded == unsharded, gradient accumulation, optimizer masks, schedule, z-loss."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import sharding
from maxlm.models import build_model
from maxlm.models.lora import LoraConfig, init_lora
from maxlm.models.transformer import ModelConfig
from maxlm.train.objectives import make_objective
from maxlm.train.optimizer import decay_mask, lr_schedule, make_optimizer
from maxlm.train.step import flat_grad_all_reduce, init_state, make_train_step, state_layout
from tests.helpers import random_batch, tiny_config

VOCAB = 61


def _losses(config, mesh_shape, steps=3, grad_accum=1, devices=None):
    """Trains a few steps on fixed random batches; returns losses and final params (host)."""
    mesh = sharding.make_mesh(*mesh_shape, devices=devices)
    rules = sharding.DEFAULT_RULES
    model = build_model(ModelConfig.from_config(config.model, VOCAB), rules)
    tx = make_optimizer(config.train)
    layout = state_layout(model, tx, mesh)
    objective = make_objective("pretrain", model, config.train)
    with jax.set_mesh(mesh):
        state = init_state(model, tx, layout, seed=0)
        step = make_train_step(objective, tx, layout, mesh, rules, grad_accum=grad_accum)
        losses = []
        for i in range(steps):
            batch = random_batch(config.train.batch_size, config.train.seq_len, VOCAB, seed=i, packed=i % 2 == 1)
            state, metrics = step(state, sharding.to_global_batch(batch, mesh, rules), None)
            losses.append(float(metrics["loss"]))
        return np.array(losses), jax.device_get(state["params"])


@pytest.mark.parametrize("mesh_shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 1, 8), (1, 2, 4)])
def test_sharded_matches_single_device(mesh_shape):
    config = tiny_config(num_heads=8, num_kv_heads=8)
    ref_losses, ref_params = _losses(config, (1, 1, 1), devices=jax.devices()[:1])
    losses, params = _losses(config, mesh_shape)
    np.testing.assert_allclose(losses, ref_losses, rtol=2e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-6), params, ref_params)


def test_pure_data_parallel_on_cpu_sums_gradients_in_one_flat_all_reduce():
    config = tiny_config(num_heads=8, num_kv_heads=8)
    rules = sharding.DEFAULT_RULES
    model = build_model(ModelConfig.from_config(config.model, VOCAB), rules)
    tx = make_optimizer(config.train)
    for shape, flat in [((8, 1, 1), True), ((2, 4, 1), False), ((2, 1, 4), False), ((1, 1, 1), False)]:
        mesh = sharding.make_mesh(*shape, devices=jax.devices()[:int(np.prod(shape))])
        assert flat_grad_all_reduce(state_layout(model, tx, mesh), mesh) == flat, shape
    mesh = sharding.make_mesh(8, 1, 1)
    layout = state_layout(model, tx, mesh)
    with jax.set_mesh(mesh):
        state = init_state(model, tx, layout, seed=0)
        step = make_train_step(make_objective("pretrain", model, config.train), tx, layout, mesh, rules)
        batch = sharding.to_global_batch(random_batch(8, 16, VOCAB), mesh, rules)
        hlo = step.lower(state, batch, None).compile().as_text()
    all_reduces = [line.split(" = ", 1)[1].split(" all-reduce(")[0] for line in hlo.splitlines() if " all-reduce(" in line]
    assert len(all_reduces) == 1, all_reduces
    arrays = re.findall(r"f32\[(\d+)\]", all_reduces[0])  # non-scalar operands (the loss normalizer is a scalar)
    num_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    assert arrays == [str(num_params + 4)], all_reduces  # the gradients and 4 metrics (loss, z-loss, tokens, act norm)


def test_steps_per_call_scans_the_same_steps_in_one_call():
    config = tiny_config()
    mesh = sharding.make_mesh(2, 1, 1, devices=jax.devices()[:2])
    rules = sharding.DEFAULT_RULES
    model = build_model(ModelConfig.from_config(config.model, VOCAB), rules)
    tx = make_optimizer(config.train)
    layout = state_layout(model, tx, mesh)
    objective = make_objective("pretrain", model, config.train)
    batches = [random_batch(config.train.batch_size, config.train.seq_len, VOCAB, seed=i, packed=i == 1)
               for i in range(3)]
    with jax.set_mesh(mesh):
        one = make_train_step(objective, tx, layout, mesh, rules)
        state, losses = init_state(model, tx, layout, seed=0), []
        for batch in batches:
            state, metrics = one(state, sharding.to_global_batch(batch, mesh, rules), None)
            losses.append(float(metrics["loss"]))
        expected = jax.device_get(state["params"])
        three = make_train_step(objective, tx, layout, mesh, rules, steps_per_call=3)
        stacked = {k: np.stack([b[k] for b in batches]) for k in batches[0]}
        state, metrics = three(init_state(model, tx, layout, seed=0),
                               sharding.to_global_batch(stacked, mesh, rules, stacked=True), None)
    assert metrics["loss"].shape == (3,) and int(state["step"]) == 3
    np.testing.assert_allclose(metrics["loss"], losses, rtol=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), jax.device_get(state["params"]),
                 expected)


def test_params_and_opt_state_are_created_sharded():
    config = tiny_config(num_heads=8, num_kv_heads=8)
    mesh = sharding.make_mesh(2, 2, 2)
    model = build_model(ModelConfig.from_config(config.model, VOCAB))
    tx = make_optimizer(config.train)
    layout = state_layout(model, tx, mesh)
    with jax.set_mesh(mesh):
        state = init_state(model, tx, layout, seed=0)
    wq = state["params"]["blocks"]["attn"]["wq"]
    assert wq.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    shard_shape = wq.addressable_shards[0].data.shape
    assert shard_shape == (wq.shape[0], wq.shape[1] // 2, wq.shape[2] // 2, wq.shape[3])
    mu = state["opt_state"][1].inner_state[0].mu["blocks"]["attn"]["wq"]
    assert mu.sharding == wq.sharding


@pytest.mark.parametrize("grad_accum", [2, 4])
def test_gradient_accumulation_equals_the_large_batch(grad_accum):
    config = tiny_config()
    mesh_shape, devices = (2, 1, 1), jax.devices()[:2]
    ref_losses, ref_params = _losses(config, mesh_shape, steps=2, devices=devices)
    losses, params = _losses(config, mesh_shape, steps=2, grad_accum=grad_accum, devices=devices)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), params, ref_params)


def test_weight_decay_skips_norms_biases_and_embeddings():
    config = tiny_config(use_bias=True, norm="layernorm", position="learned")
    model = build_model(ModelConfig.from_config(config.model, VOCAB))
    mask = decay_mask(model.abstract_params(), decay_embeddings=False)
    assert mask["blocks"]["attn"]["wq"] and mask["blocks"]["mlp"]["w_down"] and mask["lm_head"]
    assert not mask["blocks"]["attn"]["bq"] and not mask["blocks"]["attn_norm"]["scale"]
    assert not mask["embed"] and not mask["pos_embed"] and not mask["final_norm"]["bias"]
    assert decay_mask(model.abstract_params(), decay_embeddings=True)["embed"]
    adapters = jax.eval_shape(lambda: init_lora(jax.random.key(0), model.abstract_params(),
                                                LoraConfig(rank=2, alpha=4.0, targets="attn/w[qv]|lm_head")))
    assert all(jax.tree.leaves(decay_mask(adapters, decay_embeddings=False)))  # LoRA's A and B are matrices


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays_to_the_floor(schedule):
    t = tiny_config().train
    t.update(steps=100, warmup_steps=10, lr=1e-3, min_lr_ratio=0.1, schedule=schedule)
    lr = lr_schedule(t)
    assert float(lr(0)) == 0.0 and float(lr(5)) == pytest.approx(5e-4)
    assert float(lr(10)) == pytest.approx(1e-3)
    assert float(lr(100)) == pytest.approx(1e-3 if schedule == "constant" else 1e-4)


def test_z_loss_adds_the_squared_log_partition():
    config = tiny_config()
    model = build_model(ModelConfig.from_config(config.model, VOCAB))
    params = jax.jit(model.init)(jax.random.key(0))
    batch = jax.tree.map(jnp.asarray, random_batch(2, 8, VOCAB))
    config.train.z_loss = 1e-2
    loss_sum, metrics = make_objective("pretrain", model, config.train)(params, batch)
    logits, _ = model.apply(params, batch["tokens"], batch["positions"], batch["segment_ids"])
    log_z = jax.nn.logsumexp(logits, -1)
    ce = jnp.sum(log_z - jnp.take_along_axis(logits, batch["targets"][..., None], -1)[..., 0])
    np.testing.assert_allclose(metrics["loss_sum"], ce, rtol=1e-5)
    np.testing.assert_allclose(loss_sum, ce + 1e-2 * jnp.sum(log_z**2), rtol=1e-5)


def test_pallas_attention_trains_like_xla_on_a_sharded_mesh():
    config = tiny_config(num_heads=4, num_kv_heads=2, head_dim=16)
    ref_losses, _ = _losses(config, (1, 1, 1), steps=2, devices=jax.devices()[:1])
    config.model.attention = "pallas"  # interpret mode on CPU, run per shard under shard_map
    losses, _ = _losses(config, (2, 2, 2), steps=2)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)


def test_float16_uses_dynamic_loss_scaling_and_skips_overflowing_steps():
    config = tiny_config(compute_dtype="float16")
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    rules = sharding.DEFAULT_RULES
    model = build_model(ModelConfig.from_config(config.model, VOCAB), rules)
    tx = make_optimizer(config.train)
    layout = state_layout(model, tx, mesh)
    with jax.set_mesh(mesh):
        state = init_state(model, tx, layout, seed=0)
        step = make_train_step(make_objective("pretrain", model, config.train), tx, layout, mesh, rules)
        batch = sharding.to_global_batch(random_batch(8, 16, VOCAB), mesh, rules)
        state, metrics = step(state, batch, None)
        assert np.isfinite(float(metrics["loss"])) and float(metrics["loss_scale"]) <= 2.0**15
        before = jax.device_get(state["params"])
        state["loss_scale"] = {"scale": jnp.float32(1e38), "good_steps": jnp.int32(0)}  # overflows in float16
        state, metrics = step(state, batch, None)
        assert float(metrics["loss_scale"]) == pytest.approx(5e37)
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(state["params"]), before)


def test_clip_norm_bounds_the_update_and_zero_turns_it_off():
    def first_update(clip_norm):
        config = tiny_config()
        config.train.update(clip_norm=clip_norm, weight_decay=0.0, warmup_steps=0, schedule="constant", b1=0.0,
                            b2=0.0, eps=1e-30)  # signSGD-like Adam: the update is lr * g / |g|
        return _losses(config, (1, 1, 1), steps=1, devices=jax.devices()[:1])[1]

    config = tiny_config()
    model = build_model(ModelConfig.from_config(config.model, VOCAB))
    init = jax.device_get(jax.jit(model.init)(jax.random.split(jax.random.key(0))[0]))
    unclipped, clipped = first_update(0.0), first_update(1e-30)
    moved = lambda p: max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(init)))
    assert moved(unclipped) > 1e-3  # lr=1e-2 steps
    assert moved(clipped) < moved(unclipped)
