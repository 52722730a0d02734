"""Decode tokens/s with the KV cache versus recomputing the full prefix every step.

    python benchmarks/generate.py --new_tokens=256,1024 --out benchmarks/results/generate_cpu.md

The shakespeare_char model shape (4 layers, d_model 128, 4 heads, learned positions, GELU,
LayerNorm, vocab 65) with ``max_seq_len`` 1088, random weights, greedy decoding of one row after
a 64-token prompt, no eos (every run makes exactly ``new_tokens`` tokens). Both loops are one
jitted ``lax.while_loop`` (``maxlm.generate.decode_cached`` / ``decode_without_cache``); the
uncached one reruns the model over the whole ``prompt + new_tokens`` buffer every step. Times
exclude compilation (one warm-up call) and include the prefill. ``--num_beams=K`` adds beam search
(``maxlm.generate.beam_search``, K cached rows per prompt, cache reordered every step) as a column:
tokens of the best beam per second.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np

from maxlm import generate as G
from maxlm.models import build_model
from maxlm.models.transformer import ModelConfig


def timed(fn, args, repeats: int):
    """Median seconds per call after a warm-up (compile) call, and the warm-up's tokens."""
    tokens = np.asarray(jax.block_until_ready(fn(*args))[0])
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times)), tokens


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--new_tokens", default="256,1024")
    parser.add_argument("--prompt_len", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--uncached_repeats", type=int, default=1)
    parser.add_argument("--num_beams", type=int, default=4, help="0: no beam search column")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    cfg = ModelConfig(vocab_size=65, d_model=128, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=32,
                      d_ff=512, max_seq_len=1088, norm="layernorm", position="learned", mlp="gelu",
                      use_bias=True, tie_embeddings=True, attention="xla", scan_layers=False)
    model = build_model(cfg)
    params = jax.jit(model.init)(jax.random.key(0))
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, cfg.vocab_size, args.prompt_len).tolist() for _ in range(args.batch)]
    tokens, positions, valid, lengths = G.pad_prompts(prompts)

    rows = []
    for n in [int(x) for x in args.new_tokens.split(",")]:
        G.check_length(model, args.prompt_len, n)
        call = (params, tokens, positions, valid, lengths, jax.random.key(0))
        cached = G.jitted(G.decode_cached, model, max_new_tokens=n)
        plain = G.jitted(G.decode_without_cache, model, max_new_tokens=n)
        t_cached, out_cached = timed(cached, call, args.repeats)
        t_plain, out_plain = timed(plain, call, args.uncached_repeats)
        same = np.array_equal(out_cached, out_plain)
        made = args.batch * n
        t_beam = float("nan")
        if args.num_beams:
            beam = G.jitted(G.beam_search, model, num_beams=args.num_beams, max_new_tokens=n)
            t_beam, _ = timed(beam, call[:-1], args.repeats)
        rows.append((n, made / t_cached, made / t_plain, t_plain / t_cached, same, made / t_beam))
        print(rows[-1], flush=True)

    lines = [
        f"Command: `python benchmarks/generate.py --new_tokens={args.new_tokens} --batch={args.batch} "
        f"--prompt_len={args.prompt_len} --num_beams={args.num_beams}" + (f" --out {args.out}`" if args.out else "`"),
        "",
        (f"shakespeare_char shape (4 layers, d_model 128, max_seq_len 1088), batch {args.batch}, prompt "
         f"{args.prompt_len}, greedy, {jax.default_backend()} ({jax.device_count()} devices), jax {jax.__version__}"),
        "",
        f"| new tokens | cached tok/s | no cache tok/s | speed-up | same tokens | {args.num_beams} beams tok/s |",
        "| ---: | ---: | ---: | ---: | :---: | ---: |",
    ]
    lines += [f"| {n} | {c:.1f} | {p:.1f} | {r:.1f}x | {s} | {b:.1f} |" for n, c, p, r, s, b in rows]
    lines += ["", ("Both are one jitted while_loop including the prefill, compile excluded. The uncached loop "
                   "reruns the model over the whole prompt + new_tokens buffer each step (fixed shape, as "
                   "maxlm.train.sample does); the cached step attends over the whole preallocated cache (masked).")]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
