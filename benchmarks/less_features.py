"""LESS feature extraction speed: per-example gradients batched with ``vmap`` vs a per-example loop.

    python benchmarks/less_features.py [--examples=64] [--batch_size=32] [--dim=8192] [--loop_examples=16]

Three ways to get the same ``[N, dim]`` unit features of a small LoRA model (configs/less_demo.py's shape):
  vmap          ``make_feature_fn``: one jitted call per ``batch_size`` examples (what ``launch/select_data.py`` runs)
  loop          the same function called on one example at a time
  loop + batch  a jitted single-example gradient per example, projected ``batch_size`` at a time (the reference
                LESS code's scheme: a backward pass per example, the projection every few examples)
and the gradients alone (``per_example_grads`` under jit vs a loop of a jitted single-example gradient).
Prints examples/s (after compiling) and the ratios.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from maxlm.models import build_model
from maxlm.models.lora import LoraConfig, init_lora
from maxlm.models.transformer import ModelConfig
from maxlm.select import features as feats


def _examples(count: int, seq_len: int, vocab: int) -> feats.Examples:
    rng = np.random.default_rng(0)
    tokenized = []
    for _ in range(count):
        n = int(rng.integers(seq_len // 2, seq_len + 1))
        mask = np.zeros(n, np.float32)
        mask[n // 2:] = 1.0  # prompt, then a completion that carries the loss
        tokenized.append({"tokens": rng.integers(0, vocab, n), "loss_mask": mask})
    return feats.pad_examples(tokenized, seq_len)


def _rate(run, count: int, repeats: int = 2) -> float:
    """Examples per second of ``run()`` (which handles ``count`` examples), best of ``repeats`` after a warm-up."""
    jax.block_until_ready(run())
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(run())
        best = min(best, time.perf_counter() - start)
    return count / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--examples", type=int, default=64)
    parser.add_argument("--loop_examples", type=int, default=16, help="examples the slow loops time")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--seq_len", type=int, default=128)
    args = parser.parse_args()

    cfg = ModelConfig(vocab_size=100, d_model=64, num_layers=2, num_heads=4, num_kv_heads=4, head_dim=16, d_ff=256,
                      max_seq_len=args.seq_len, attention="xla")
    model = build_model(cfg)
    lora = LoraConfig(rank=8, alpha=16.0, targets=r"attn/w[qkvo]|mlp/w_(gate|up|down)")
    base = jax.jit(model.init)(jax.random.key(0))
    adapters = jax.tree.map(lambda x: x + 0.01, init_lora(jax.random.key(1), base, lora))
    size = ravel_pytree(adapters)[0].size
    examples = _examples(args.examples, args.seq_len, cfg.vocab_size)
    projection = feats.Projection(args.dim, seed=0)
    feature_fn = feats.make_feature_fn(model, lora, projection, None)
    single_grad = jax.jit(lambda a, ex, b: ravel_pytree(jax.grad(feats.example_loss_fn(model, lora))(a, ex, b))[0])
    project = jax.jit(lambda g: feats.normalize(feats.project(g, projection)))
    rows = lambda lo, hi: {k: v[lo:hi] for k, v in examples.items()}

    def batched():
        return [feature_fn(adapters, base, rows(i, i + args.batch_size), None)
                for i in range(0, args.examples, args.batch_size)]

    def loop():
        return [feature_fn(adapters, base, rows(i, i + 1), None) for i in range(args.loop_examples)]

    def loop_then_project():
        out = []
        for lo in range(0, args.loop_examples, args.batch_size):
            grads = [single_grad(adapters, {k: v[i] for k, v in examples.items()}, base)
                     for i in range(lo, min(lo + args.batch_size, args.loop_examples))]
            out.append(project(jnp.stack(grads)))
        return out

    batched_grads = jax.jit(lambda a, ex, b: jax.vmap(lambda g: ravel_pytree(g)[0])(
        feats.per_example_grads(model, lora)(a, ex, b)))

    def grads_vmap():
        return [batched_grads(adapters, rows(i, i + args.batch_size), base)
                for i in range(0, args.examples, args.batch_size)]

    def grads_loop():
        return [single_grad(adapters, {k: v[i] for k, v in examples.items()}, base) for i in range(args.examples)]

    single = jnp.concatenate(loop())
    np.testing.assert_allclose(np.concatenate(batched())[: args.loop_examples], single, rtol=1e-3, atol=1e-5)
    rates = {"vmap": _rate(batched, args.examples), "loop": _rate(loop, args.loop_examples),
             "loop + batch": _rate(loop_then_project, args.loop_examples)}
    grad_rates = {"vmap": _rate(grads_vmap, args.examples), "loop": _rate(grads_loop, args.examples)}
    print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; model {cfg.num_params() / 1e6:.2f}M params, "
          f"LoRA rank 8: {size} adapter params; seq_len {args.seq_len}; dim {args.dim}; vmap batch {args.batch_size}\n")
    print("| what | method | examples/s | vmap speed-up |")
    print("| --- | --- | ---: | ---: |")
    for what, table in (("features (gradient, projection, normalisation)", rates), ("gradients only", grad_rates)):
        for name, rate in table.items():
            print(f"| {what} | {name} | {rate:.1f} | {table['vmap'] / rate:.1f}x |")


if __name__ == "__main__":
    main()
