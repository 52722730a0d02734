"""Config presets and validation, launch/train.py start-up errors, and one end-to-end tiny run."""

import collections
import glob
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from maxlm.config import ConfigError, validate
from maxlm.models import build_model
from maxlm.models.transformer import ModelConfig
from maxlm import sharding
from maxlm.train.loop import evaluate, train
from tests.helpers import ROOT, preset_config, tiny_config


@pytest.mark.parametrize("name,params_millions", [
    ("gpt2_small", 124.4), ("opt_125m", 125.2), ("llama_1b", 1235.8), ("llama3_8b", 8030.3),
    ("shakespeare_char", None), ("tiny", None),
])
def test_presets_validate_and_have_the_published_sizes(name, params_millions):
    config = preset_config(name)
    if not config.data.tokenizer:
        config.data.tokenizer = "some.model"
    validate(config, num_devices=4)
    if params_millions:
        model = build_model(ModelConfig.from_config(config.model))  # abstract: no memory is used
        assert model.cfg.num_params() / 1e6 == pytest.approx(params_millions, abs=0.1)


def test_evals_and_checkpoints_must_fall_between_calls_of_steps_per_call():
    config = tiny_config()
    config.train.update(steps=100, steps_per_call=4, eval_every=8)
    config.checkpoint.every_steps = 12
    validate(config, num_devices=8)
    for key, value in (("train.eval_every", 10), ("checkpoint.every_steps", 6)):
        bad = tiny_config()
        bad.train.update(steps=100, steps_per_call=4)
        section, field = key.split(".")
        bad[section][field] = value
        with pytest.raises(ConfigError, match=f"{key}={value} is not a multiple of train.steps_per_call=4"):
            validate(bad, num_devices=8)


@pytest.mark.parametrize("key,value,needle", [
    ("model.num_heads", 5, "model.num_heads=5 does not divide model.d_model"),
    ("model.num_kv_heads", 3, "model.num_kv_heads=3 does not divide model.num_heads"),
    ("model.attention", "flash", "model.attention='flash' is not one of"),
    ("mesh.data", 3, "mesh: 8 devices cannot be split"),
    ("mesh.fsdp", 2, "mesh: data*fsdp*tensor = 2 but 8 devices"),
    ("train.grad_accum", 3, "train.grad_accum=3 does not divide train.batch_size"),
    ("train.seq_len", 64, "train.seq_len=64 exceeds model.max_seq_len=32"),
    ("train.warmup_steps", 10, "train.warmup_steps=10 must be in"),
    ("data.tokenizer", "", "data.tokenizer is empty"),
    ("model.rope_scaling", "yarn", "model.rope_scaling='yarn' is not one of"),
    ("model.rope_high_freq_factor", 0.5, "model.rope_scaling=llama3 needs 0 < model.rope_low_freq_factor"),
    ("model.embed_dim", -1, "model.embed_dim=-1 must be >= 0"),
    ("lora.quantize_base", True, "lora.quantize_base stores the frozen LoRA base in int8: it needs lora.rank > 0"),
    ("mesh.cpu_devices", -1, "mesh.cpu_devices=-1 must be >= 0"),
    ("train.steps_per_call", 0, "train.steps_per_call=0 must be positive"),
    ("lora.dropout", 1.0, "lora.dropout=1.0 must be in"),
    ("mesh.dcn_fsdp", 3, "mesh.dcn_fsdp=3 must be >= 1 and divide mesh.fsdp=8"),
    ("train.eval_batches", -1, "train.eval_batches=-1 must be >= 0"),
    ("data.val_fraction", 0.0, "data.val_fraction=0.0 must be in"),
    ("sample.top_k", -1, "sample.top_k=-1 must be >= 0"),
    ("sample.temperature", -0.5, "sample.temperature=-0.5 must be >= 0"),
    ("sample.num_tokens", -1, "sample.num_tokens=-1 must be >= 0"),
    ("debug.nan_at_steps", (2,), "debug.nan_at_steps poisons the loss mask, which train.objective=reward"),
])
def test_validation_names_the_key(key, value, needle):
    config = tiny_config()
    if key == "model.rope_high_freq_factor":
        config.model.rope_scaling = "llama3"
    if key == "debug.nan_at_steps":
        config.train.objective, config.model.value_head = "reward", True
    section, field = key.split(".")
    config[section][field] = value
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("*", r"\*")):
        validate(config, num_devices=8)


def _launch(*flags, devices=1):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", "train.py"), *flags],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)


@pytest.mark.parametrize("flag,needle", [
    ("--config.model.d_modle=3", "unknown config key 'model.d_modle' (did you mean 'model.d_model'?)"),
    ("--config.trian.steps=3", "unknown config key 'trian.steps' (did you mean 'train'?)"),
    ("--config.model.d_model=abc", "--config.model.d_model=abc"),
    ("--config.model.num_heads=3", "model.num_heads=3 does not divide model.d_model=64"),
])
def test_launch_rejects_bad_overrides_with_one_line(tmp_path, flag, needle):
    result = _launch("--config=configs/tiny.py", f"--workdir={tmp_path}", flag)
    assert result.returncode != 0
    assert needle in result.stderr
    assert "Traceback" not in result.stderr
    assert not os.path.exists(os.path.join(tmp_path, "checkpoints"))


def test_tiny_run_writes_metrics_tensorboard_config_and_sample(tmp_path):
    config = tiny_config()
    config.train.update(steps=6, log_every=2, eval_every=3)
    config.sample.num_tokens = 8
    last = train(config, str(tmp_path))
    lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    train_lines = [l for l in lines if "loss" in l]
    assert [l["step"] for l in train_lines] == [2, 4, 6]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_sec", "step_time_s", "mfu", "last_layer_act_norm"):
        assert key in train_lines[0]
    assert train_lines[0]["mfu"] is None  # no peak FLOP/s is known for CPUs
    assert [l["step"] for l in lines if "val_loss" in l] == [3, 6]
    assert last["val_loss"] == lines[-1]["val_loss"]
    assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))
    resolved = json.load(open(tmp_path / "config.json"))
    assert resolved["model"]["vocab_size"] > 0 and resolved["train"]["steps"] == 6
    assert (tmp_path / "sample.txt").read_text()


def test_each_program_compiles_once_before_the_first_step(tmp_path):
    """The train step compiles in a thread while the state initialises, the eval step and the sampler
    after it: the loop must then reuse those executables, not compile them again."""
    compiles = collections.Counter()

    def count(event, duration, fun_name="", **_):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles[fun_name] += 1

    config = tiny_config()
    config.train.update(steps=6, steps_per_call=2, eval_every=2)
    config.sample.num_tokens = 8
    jax.monitoring.register_event_duration_secs_listener(count)
    try:
        train(config, str(tmp_path))
    finally:
        jax.monitoring.unregister_event_duration_listener(count)
    assert {"jit(train_steps)", "jit(eval_step)", "jit(generate)"} <= set(compiles), compiles
    assert set(compiles.values()) == {1}, compiles


def test_evaluate_bounds_the_calls_queued_on_the_devices():
    """XLA:CPU deadlocks (and aborts after 40 s) when a few hundred programs with an all-reduce are queued
    on 8 host devices; evaluate waits for older batches to keep the queue short."""
    mesh = sharding.make_mesh(8, 1, 1)

    def step(weights, batch, frozen):
        x = batch["tokens"]
        for _ in range(50):  # slower than the host's dispatch: unbounded, the queue would grow
            x = jnp.tanh(x @ weights)
        return {"loss_sum": x.sum(), "num_tokens": batch["loss_mask"].sum()}

    eval_step = jax.jit(step, out_shardings=NamedSharding(mesh, P()))
    weights = jnp.asarray(np.random.default_rng(0).normal(size=(256, 256)) / 16, jnp.float32)
    batches = [{"tokens": np.full((64, 256), i / 300, np.float32), "loss_mask": np.ones((64, 256), np.float32)}
               for i in range(300)]
    with jax.set_mesh(mesh):
        result = evaluate(eval_step, weights, None, batches, mesh, sharding.DEFAULT_RULES)
        one_by_one = [jax.device_get(eval_step(weights, sharding.to_global_batch(b, mesh, sharding.DEFAULT_RULES),
                                               None)) for b in batches]
    expected = sum(float(r["loss_sum"]) for r in one_by_one) / sum(float(r["num_tokens"]) for r in one_by_one)
    assert result["val_loss"] == pytest.approx(expected, rel=1e-6)


def test_vocab_mismatch_between_config_and_tokenizer_is_an_error(tmp_path):
    config = tiny_config(vocab_size=10)  # larger than the tokenizer is allowed (HF models pad their vocab)
    with pytest.raises(ConfigError, match="model.vocab_size=10 but the tokenizer"):
        train(config, str(tmp_path))


def test_cpu_devices_splits_the_host_and_the_mesh_uses_them(tmp_path):
    result = _launch("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.train.steps=3",
                     "--config.mesh.data=-1", "--config.mesh.fsdp=1", "--config.mesh.cpu_devices=2",
                     "--config.checkpoint.every_steps=0", "--config.sample.num_tokens=0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "mesh {'data': 2, 'fsdp': 1, 'tensor': 1}" in result.stderr


def test_cpu_devices_after_jax_started_is_a_config_error(tmp_path):
    assert len(jax.devices("cpu")) == 8  # starts JAX here (conftest's 8 devices) if no test did yet
    config = tiny_config()
    config.mesh.cpu_devices = 3
    with pytest.raises(ConfigError, match="mesh.cpu_devices=3, but JAX already started with 8 CPU devices"):
        train(config, str(tmp_path))


def test_compile_cache_dir_receives_the_compiled_programs(tmp_path):
    cache = tmp_path / "xla"
    result = _launch("--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}", "--config.train.steps=3",
                     f"--config.compile_cache_dir={cache}", "--config.checkpoint.every_steps=0",
                     "--config.sample.num_tokens=0")
    assert result.returncode == 0, result.stderr[-2000:]
    assert any("train_step" in p.name for p in cache.iterdir())


def test_the_last_step_is_saved_even_while_a_spike_is_unconfirmed(tmp_path):
    """Mid-run, a step under a suspected loss spike is not checkpointed; the last step always is."""
    config = tiny_config()
    config.train.update(steps=8, log_every=2, eval_batches=0)
    config.train.divergence.update(window=4, spike_sigma=-1000.0, spike_patience=100)  # every step past 2 "spikes"
    config.checkpoint.update(every_steps=2, async_save=False)
    config.sample.num_tokens = 0
    train(config, str(tmp_path))
    assert sorted(int(p) for p in os.listdir(tmp_path / "checkpoints") if p.isdigit()) == [2, 8]


def test_too_little_data_for_the_batch_shape_is_one_line_naming_the_settings(tmp_path):
    result = _launch("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.data.val_fraction=0.0005",
                     "--config.train.batch_size=64")
    assert result.returncode == 2, result.stderr[-2000:]
    assert "give no full batch of 64 rows" in result.stderr and "data.val_fraction=0.0005" in result.stderr
    assert "Traceback" not in result.stderr
