"""DPO and the pairwise reward model: loss formulas, the reference (frozen copy, LoRA base with adapters
off, precomputed), its immutability, memory under LoRA, and end-to-end runs."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm import sharding
from maxlm.config import ConfigError, validate
from maxlm.models import build_model, lora
from maxlm.models.transformer import ModelConfig
from maxlm.train import objectives as obj
from maxlm.train.loop import train
from maxlm.train.optimizer import make_optimizer
from maxlm.train.reference import cache_key, cached_reference_logps
from maxlm.train.step import init_frozen, init_state, make_train_step, state_layout
from tests.helpers import preset_config, tiny_config, tree_nbytes

VOCAB = 61
LORA = lora.LoraConfig(rank=4, alpha=8.0, targets=r"attn/w[qkvo]|mlp/w_(gate|up|down)")

# Fixed summed log-probs [pairs, (chosen, rejected)] of a policy and a reference, and completion lengths.
POLICY = np.array([[-10.0, -12.0], [-20.0, -15.0], [-7.0, -7.5]])
REFERENCE = np.array([[-11.0, -11.0], [-18.0, -16.0], [-7.0, -7.0]])
LENGTHS = np.array([[4.0, 6.0], [10.0, 5.0], [2.0, 3.0]])


def _log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def _hand_loss(variant: str, beta: float, eps: float = 0.0, reference_free: bool = False) -> float:
    """The papers' per-pair formulas written out in plain Python, averaged over the pairs."""
    losses = []
    for (pw, pl), (rw, rl), (nw, nl) in zip(POLICY, REFERENCE, LENGTHS):
        rw, rl = (0.0, 0.0) if reference_free else (rw, rl)
        if variant == "ipo":  # Azar et al. 2023, with length-averaged log-probs
            h = (pw / nw - rw / nw) - (pl / nl - rl / nl)
            losses.append((h - 1 / (2 * beta)) ** 2)
            continue
        h = beta * ((pw - rw) - (pl - rl))
        if variant == "sigmoid":  # Rafailov et al. 2023; eps > 0: conservative DPO
            losses.append(-(1 - eps) * _log_sigmoid(h) - eps * _log_sigmoid(-h))
        else:  # hinge (SLiC-HF)
            losses.append(max(0.0, 1 - h))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("variant,beta,eps,free", [("sigmoid", 0.1, 0.0, False), ("sigmoid", 0.5, 0.2, False),
                                                   ("ipo", 0.1, 0.0, False), ("ipo", 0.7, 0.0, False),
                                                   ("hinge", 0.3, 0.0, False), ("sigmoid", 0.1, 0.0, True)])
def test_each_loss_variant_equals_the_papers_formula(variant, beta, eps, free):
    cfg = obj.DpoConfig(beta=beta, loss=variant, label_smoothing=eps, reference_free=free)
    reference = np.zeros_like(REFERENCE) if free else REFERENCE
    losses, rewards = obj.dpo_loss(jnp.asarray(POLICY), jnp.asarray(reference), jnp.asarray(LENGTHS), cfg)
    np.testing.assert_allclose(float(jnp.mean(losses)), _hand_loss(variant, beta, eps, free), rtol=1e-6)
    scale = LENGTHS if variant == "ipo" else 1.0
    np.testing.assert_allclose(rewards, beta * (POLICY - reference) / scale, rtol=1e-6)


def _model(value_head=False):
    cfg = ModelConfig(vocab_size=VOCAB, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
                      max_seq_len=32, attention="xla", value_head=value_head)
    return build_model(cfg)


def pair_batch(pairs: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random pairs [pairs, 2, seq]: a shared prompt, completions of different lengths, padding after."""
    rng = np.random.default_rng(seed)
    batch = {k: np.zeros((pairs, 2, seq), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
    batch["loss_mask"] = np.zeros((pairs, 2, seq), np.float32)
    for i in range(pairs):
        prompt = rng.integers(1, VOCAB, rng.integers(3, seq // 2))
        for j in range(2):
            seqn = np.concatenate([prompt, rng.integers(1, VOCAB, rng.integers(2, seq - len(prompt) + 1))])
            n = len(seqn) - 1
            batch["tokens"][i, j, :n], batch["targets"][i, j, :n] = seqn[:-1], seqn[1:]
            batch["loss_mask"][i, j, len(prompt) - 1:n] = 1
            batch["segment_ids"][i, j, :n], batch["positions"][i, j, :n] = 1, np.arange(n)
    return batch


def _dpo_setup(config, lora_cfg=None, mesh_shape=(1, 2, 1)):
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[: math.prod(mesh_shape)])
    rules = sharding.DEFAULT_RULES
    model = build_model(ModelConfig.from_config(config.model, VOCAB), rules)
    tx = make_optimizer(config.train)
    layout = state_layout(model, tx, mesh, lora_cfg, reference=lora_cfg is None)
    return mesh, rules, model, tx, layout


def test_step_0_loss_is_log2_with_zero_margins_and_the_reference_stays_bitwise_unchanged():
    config = tiny_config()
    config.train.objective = "dpo"
    mesh, rules, model, tx, layout = _dpo_setup(config, mesh_shape=(1, 2, 2))
    with jax.set_mesh(mesh):
        reference = init_frozen(model, layout, seed=0)  # == the policy's init of the same seed
        before = jax.device_get(reference)
        state = init_state(model, tx, layout, seed=0)
        step = make_train_step(obj.make_objective("dpo", model, config.train), tx, layout, mesh, rules)
        history = []
        for i in range(3):
            state, metrics = step(state, sharding.to_global_batch(pair_batch(8, 16, seed=i), mesh, rules), reference)
            history.append(jax.device_get(metrics))
    np.testing.assert_allclose(history[0]["loss"], math.log(2), rtol=1e-6)
    for key in ("rewards/margins", "rewards/chosen", "rewards/rejected", "rewards/accuracies"):
        assert history[0][key] == 0.0, key
    assert history[0]["num_tokens"] == 8  # the step's normaliser: pairs
    assert history[0]["logps/chosen"] < 0 and history[0]["grad_norm"] > 0
    assert history[-1]["loss"] != pytest.approx(math.log(2))
    assert reference["embed"].sharding == state["params"]["embed"].sharding  # sharded like the policy
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(reference), before)
    assert not np.array_equal(jax.device_get(state["params"]["embed"]), before["embed"])


def test_the_lora_reference_is_the_base_with_adapters_off():
    model = _model()
    base = jax.jit(model.init)(jax.random.key(0))
    adapters = jax.tree.map(lambda x: x + 0.05, lora.init_lora(jax.random.key(1), base, LORA))  # non-zero B
    batch = jax.tree.map(jnp.asarray, pair_batch(4, 16))
    objective = jax.jit(obj.dpo_objective(model, obj.DpoConfig(beta=0.1)))
    logps = jax.jit(lambda p, b: obj.pair_logps(model, p, b)[0])
    policy = lora.merge(base, adapters, LORA)
    _, metrics = objective(policy, batch, None, base)  # what the step passes under LoRA: (merged, frozen base)
    policy_logps, base_logps = logps(policy, batch), logps(base, batch)
    assert not np.allclose(policy_logps, base_logps)
    expected = 0.1 * (policy_logps[:, 0] - base_logps[:, 0])
    np.testing.assert_allclose(metrics["rewards/chosen_sum"], jnp.sum(expected), rtol=1e-5)
    # The base's log-probs are the sums of the plain model's per-token log-softmax over the completions.
    logits, _ = jax.jit(model.apply)(base, batch["tokens"][:, 1], batch["positions"][:, 1],
                                     batch["segment_ids"][:, 1])
    token = jnp.take_along_axis(jax.nn.log_softmax(logits), batch["targets"][:, 1, :, None], -1)[..., 0]
    np.testing.assert_allclose(base_logps[:, 1], jnp.sum(token * batch["loss_mask"][:, 1], -1), rtol=1e-5)


def test_precomputed_reference_logps_equal_the_on_the_fly_ones(tmp_path):
    model = _model()
    mesh = sharding.make_mesh(1, 2, 1, devices=jax.devices()[:2])
    rules = sharding.DEFAULT_RULES
    reference = jax.jit(model.init)(jax.random.key(0))
    policy = jax.jit(model.init)(jax.random.key(1))
    pairs = pair_batch(10, 16)  # 10 pairs in batches of 4: the last batch wraps around
    with jax.set_mesh(mesh):
        cached = cached_reference_logps(model, reference, pairs, 4, mesh, rules, str(tmp_path))
        assert len(list(tmp_path.glob("ref_logps_*.npy"))) == 1
        np.testing.assert_array_equal(cached_reference_logps(model, reference, pairs, 4, mesh, rules,
                                                             str(tmp_path)), cached)  # read back
    other = jax.tree.map(lambda x: x * 1.01, reference)  # another checkpoint, or other pairs: another cache file
    assert cache_key(pairs, other, model) != cache_key(pairs, reference, model)
    assert cache_key(pair_batch(10, 16, seed=1), reference, model) != cache_key(pairs, reference, model)
    on_the_fly = jax.jit(lambda p, b: obj.pair_logps(model, p, b)[0])(reference, jax.tree.map(jnp.asarray, pairs))
    np.testing.assert_allclose(cached, on_the_fly, rtol=1e-5)
    objective = jax.jit(obj.dpo_objective(model, obj.DpoConfig(beta=0.1)))
    batch = jax.tree.map(jnp.asarray, pairs)
    loss_a, m_a = objective(policy, batch, None, reference)
    loss_b, m_b = objective(policy, dict(batch, ref_logps=jnp.asarray(cached)), None, None)
    np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
    np.testing.assert_allclose(m_a["rewards/margins_sum"], m_b["rewards/margins_sum"], rtol=1e-4, atol=1e-5)


def test_under_lora_the_state_holds_one_copy_of_the_base_weights():
    config = preset_config("gpt2_small")
    model = build_model(ModelConfig.from_config(config.model))
    tx = make_optimizer(config.train)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    base = tree_nbytes(model.abstract_params())
    low = state_layout(model, tx, mesh, lora.LoraConfig(8, 16.0, LORA.targets))  # what train() builds for LoRA DPO
    held = tree_nbytes(low.abstract) + tree_nbytes(low.frozen_abstract)  # everything the step is given
    assert tree_nbytes(low.frozen_abstract) == base  # the base, which is also the reference
    assert tree_nbytes(low.abstract) < 0.05 * base  # adapters, their optimizer state, step, rng
    assert base <= held < 1.05 * base
    full = state_layout(model, tx, mesh, reference=True)  # full fine-tuning: policy + opt + a reference copy
    assert tree_nbytes(full.abstract["params"]) + tree_nbytes(full.frozen_abstract) == 2 * base


def test_reward_objective_is_bradley_terry_on_the_last_token_values():
    model = _model(value_head=True)
    params = jax.jit(model.init)(jax.random.key(0))
    params["value_head"] = params["value_head"] + 0.5  # a non-trivial head
    batch = jax.tree.map(jnp.asarray, pair_batch(4, 16))
    loss_sum, metrics = jax.jit(obj.reward_objective(model))(params, batch)
    rewards = np.zeros((4, 2))
    apply = jax.jit(model.apply)
    for j in range(2):
        _, aux = apply(params, batch["tokens"][:, j], batch["positions"][:, j], batch["segment_ids"][:, j])
        last = np.asarray(batch["segment_ids"][:, j]).sum(-1) - 1
        rewards[:, j] = np.asarray(aux["values"])[np.arange(4), last]
    expected = sum(-_log_sigmoid(c - r) for c, r in rewards)
    np.testing.assert_allclose(loss_sum, expected, rtol=1e-5)
    np.testing.assert_allclose(metrics["rewards/accuracies_sum"], np.sum(rewards[:, 0] > rewards[:, 1]))
    np.testing.assert_allclose(metrics["rewards/margins_sum"], np.sum(rewards[:, 0] - rewards[:, 1]), rtol=1e-5)


def test_config_errors_are_one_line():
    config = tiny_config()
    config.train.objective = "dpo"
    with pytest.raises(ConfigError, match="needs a reference model"):
        validate(config, jax.device_count())
    config.train.dpo.reference_free = True
    validate(config, jax.device_count())
    config.train.dpo.update(reference_free=False, label_smoothing=0.1, loss="ipo")
    config.lora.rank = 4
    with pytest.raises(ConfigError, match="applies to train.dpo.loss=sigmoid"):
        validate(config, jax.device_count())
    config.train.objective = "reward"
    with pytest.raises(ConfigError, match="model.value_head=True"):
        validate(config, jax.device_count())


def _preference_config(objective: str, steps: int = 3):
    config = tiny_config(max_seq_len=64)
    config.train.update(objective=objective, steps=steps, seq_len=64, batch_size=8, lr=3e-3, eval_batches=2,
                        eval_every=0)
    config.data.update(source="builtin:hh_rlhf_harmless_test", val_fraction=0.02)
    return config


def _lines(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_end_to_end_sft_then_full_dpo_and_a_reward_model_from_its_checkpoint(tmp_path):
    sft = tiny_config(max_seq_len=64)
    sft.train.update(objective="sft", steps=2, seq_len=64)
    sft.data.update(source="builtin:hh_rlhf_harmless_test", truncate=True, val_fraction=0.02)
    sft.checkpoint.update(every_steps=2, async_save=False)
    cache = str(tmp_path / "cache")
    sft.data.cache_dir = cache
    train(sft, str(tmp_path / "sft"))

    full = _preference_config("dpo")
    full.init_from, full.data.cache_dir = str(tmp_path / "sft"), cache
    last = train(full, str(tmp_path / "dpo"))
    keys = ("loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
            "logps/rejected")
    first = _lines(tmp_path / "dpo")[0]
    assert first["loss"] == pytest.approx(math.log(2), rel=1e-5) and first["rewards/margins"] == 0.0
    assert all(np.isfinite(last[k]) and np.isfinite(last[f"val_{k}"]) for k in keys)

    reward = _preference_config("reward")
    reward.init_from, reward.data.cache_dir = str(tmp_path / "sft"), cache
    reward.model.value_head = True
    last = train(reward, str(tmp_path / "reward"))
    assert _lines(tmp_path / "reward")[0]["loss"] == pytest.approx(math.log(2), rel=1e-5)  # zero head at start
    assert 0.0 <= last["val_rewards/accuracies"] <= 1.0 and np.isfinite(last["val_loss"])


def test_end_to_end_lora_dpo_with_precomputed_reference_logps(tmp_path):
    low = _preference_config("dpo")  # a random (seeded) base: the reference is the base with adapters off
    low.lora.rank = 4
    low.train.dpo.update(precompute_reference=True, loss="ipo")
    last = train(low, str(tmp_path))
    assert len(list((tmp_path / "cache").glob("ref_logps_*.npy"))) == 1
    assert _lines(tmp_path)[0]["rewards/margins"] == 0.0  # B = 0: the policy starts as the reference
    assert np.isfinite(last["val_rewards/accuracies"]) and np.isfinite(last["val_logps/chosen"])


@pytest.mark.parametrize("stage", ["sft", "dpo", "dpo_lora", "reward"])
def test_the_hh_demo_config_validates_at_every_stage(stage):
    config = preset_config("dpo_hh", stage)
    config.init_from = "runs/hh_sft"
    validate(config, num_devices=8)
