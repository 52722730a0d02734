"""The training loop: config -> mesh -> data -> model -> state -> steps -> metrics/checkpoints.

``train(config, workdir)`` is what ``launch/train.py`` runs; tests call it too.
"""

from __future__ import annotations

import os
import time

import jax
import numpy as np
from absl import logging

from maxlm import config as config_lib
from maxlm import sharding
from maxlm.models import build_model
from maxlm.models.transformer import ModelConfig
from maxlm.train import data as train_data
from maxlm.train.metrics import MetricsWriter, flops_per_token, peak_flops
from maxlm.train.objectives import make_objective
from maxlm.train.optimizer import make_optimizer
from maxlm.train.sample import sample_text
from maxlm.train.step import init_state, make_eval_step, make_train_step, state_layout


def evaluate(eval_step, params, batches, mesh, rules) -> float:
    """Mean per-token loss over the given batches."""
    totals = [eval_step(params, sharding.to_global_batch(b, mesh, rules)) for b in batches]
    loss_sum = sum(float(t["loss_sum"]) for t in totals)
    return loss_sum / max(sum(float(t["num_tokens"]) for t in totals), 1.0)


def train(config, workdir: str) -> dict:
    """Runs the experiment described by ``config`` in ``workdir``; returns the final metrics."""
    config_lib.validate(config, jax.device_count())
    os.makedirs(workdir, exist_ok=True)
    is_primary = jax.process_index() == 0
    rules = tuple(tuple(r) for r in config.mesh.rules)
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    t = config.train

    data = train_data.pretrain_data(config, workdir)
    if config.model.vocab_size and config.model.vocab_size != data.tokenizer.vocab_size:
        raise config_lib.ConfigError(
            f"model.vocab_size={config.model.vocab_size} but the tokenizer has {data.tokenizer.vocab_size} pieces")
    model_cfg = ModelConfig.from_config(config.model, data.tokenizer.vocab_size)
    config.model.vocab_size = model_cfg.vocab_size
    if is_primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_lib.to_json(config))

    model = build_model(model_cfg, rules)
    tx, _ = make_optimizer(t)
    layout = state_layout(model, tx, mesh)
    objective = make_objective(t.objective, model, t)
    logging.info("model: %.2fM params, mesh %s", model_cfg.num_params() / 1e6, dict(mesh.shape))

    with jax.set_mesh(mesh):
        state = init_state(model, tx, layout, config.seed)
        train_step = make_train_step(objective, tx, layout, mesh, rules, grad_accum=t.grad_accum)
        eval_step = make_eval_step(objective, layout, mesh, rules)
        start_step = int(state["step"])
        writer = MetricsWriter(workdir, t.steps, start_step, enabled=is_primary)
        tokens_per_step = t.batch_size * t.seq_len
        flops = flops_per_token(model_cfg, t.seq_len) * tokens_per_step
        peak = peak_flops(jax.devices()[0])
        last = {}
        interval_start, interval_steps = time.perf_counter(), 0
        for step in range(start_step, t.steps):
            batch = sharding.to_global_batch(next(data.train), mesh, rules)
            state, metrics = train_step(state, batch)
            interval_steps += 1
            done = step + 1
            if done % t.log_every == 0 or done == t.steps:
                metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
                elapsed = time.perf_counter() - interval_start
                step_time = elapsed / interval_steps
                metrics.update(step_time_s=step_time, tokens_per_sec=tokens_per_step / step_time,
                               mfu=(flops / step_time / (peak * jax.device_count())) if peak else None)
                writer.write(done, metrics)
                last.update(metrics)
                interval_start, interval_steps = time.perf_counter(), 0
            if (t.eval_every and done % t.eval_every == 0) or done == t.steps:
                last["val_loss"] = evaluate(eval_step, state["params"], data.val_batches(), mesh, rules)
                writer.write(done, {"val_loss": last["val_loss"]})
                interval_start, interval_steps = time.perf_counter(), 0

        if is_primary and config.sample.num_tokens:
            text = sample_text(model, state["params"], data.tokenizer, config.sample, seed=config.seed)
            with open(os.path.join(workdir, "sample.txt"), "w") as f:
                f.write(text)
            writer.message(f"--- sample ---\n{text}\n--------------")
        writer.close()
    return last
