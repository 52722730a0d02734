"""Train-step throughput and MFU of a preset's model shape, per attention implementation.

    python benchmarks/train_step.py --config=gpt2_small --batch_size=16 --seq_len=1024 --impls=pallas,cudnn,xla

Random tokens (no data pipeline, so it runs where grain is not installed), one device mesh over all
local devices, bf16 compute as in the preset. Prints step time, tokens/s, model TFLOP/s and MFU per
implementation, with the ratio to the first one.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import time

import jax
import numpy as np

from maxlm import sharding
from maxlm.models import build_model
from maxlm.models.transformer import ModelConfig
from maxlm.train.metrics import flops_per_token, peak_flops
from maxlm.train.objectives import make_objective
from maxlm.train.optimizer import make_optimizer
from maxlm.train.step import init_state, make_train_step, state_layout

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_preset(name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def measure(config, impl: str, steps: int) -> dict:
    config.model.attention = impl
    config.model.dropout = 0.0
    cfg = ModelConfig.from_config(config.model, vocab_size=256)  # presets without a vocab: 256
    mesh = sharding.make_mesh(1, -1, 1)
    rules = sharding.DEFAULT_RULES
    model = build_model(cfg, rules)
    tx = make_optimizer(config.train)
    layout = state_layout(model, tx, mesh)
    b, t = config.train.batch_size, config.train.seq_len
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (b, t + 1)).astype(np.int32)
    batch = {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((b, t), np.float32),
             "segment_ids": np.ones((b, t), np.int32), "positions": np.tile(np.arange(t, dtype=np.int32), (b, 1))}
    with jax.set_mesh(mesh):
        state = init_state(model, tx, layout, seed=0)
        step = make_train_step(make_objective("pretrain", model, config.train), tx, layout, mesh, rules)
        batch = sharding.to_global_batch(batch, mesh, rules)
        for _ in range(2):
            state, metrics = step(state, batch, None)
        jax.block_until_ready(metrics)
        times = []
        for _ in range(steps):
            start = time.perf_counter()
            state, metrics = step(state, batch, None)
            jax.block_until_ready(metrics)
            times.append(time.perf_counter() - start)
    step_time = statistics.median(times)
    flops = flops_per_token(cfg, t) * b * t / step_time
    peak = peak_flops(jax.devices()[0])
    return {"step_ms": step_time * 1e3, "tokens_per_sec": b * t / step_time, "tflops": flops / 1e12,
            "mfu": flops / (peak * jax.device_count()) if peak else None, "loss": float(metrics["loss"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="gpt2_small")
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--seq_len", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--impls", type=lambda s: s.split(","), default=["pallas", "cudnn", "xla"])
    args = parser.parse_args()
    rows = []
    for impl in args.impls:
        config = load_preset(args.config)
        config.train.update(batch_size=args.batch_size, seq_len=args.seq_len)
        rows.append((impl, measure(config, impl, args.steps)))
    device = jax.devices()[0].device_kind
    print(f"{args.config}, batch {args.batch_size} x {args.seq_len}, {jax.device_count()} x {device}\n")
    print("| attention | step ms | tokens/s | model TFLOP/s | MFU | loss | tokens/s vs first |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for impl, r in rows:
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        ratio = r["tokens_per_sec"] / rows[0][1]["tokens_per_sec"]
        print(f"| {impl} | {r['step_ms']:.1f} | {r['tokens_per_sec']:.0f} | {r['tflops']:.1f} | {mfu} | "
              f"{r['loss']:.3f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
