"""Benchmark of the Pallas flash attention against cuDNN and XLA attention; prints markdown.

    PYTHONPATH=. python3 benchmarks/attention.py                # the table
    PYTHONPATH=. python3 benchmarks/attention.py --packed       # with segment ids (dense mask for cudnn/xla)
    PYTHONPATH=. python3 benchmarks/attention.py --check        # compiled kernels vs a float32 reference first
    PYTHONPATH=. python3 benchmarks/attention.py --tune         # sweep Triton parameters, table with the best

FLOPs: forward 4*B*H*T*T*D, halved under the causal mask; forward+backward counts 3.5x the
forward (the backward as 2.5 forward passes, the FlashAttention-2 convention). Memory is the
temporary buffer size XLA reports for the compiled forward+backward (activations excluded).
Imports only jax, numpy and maxlm.kernels, so it runs on a bare GPU image.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import statistics
import time
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from maxlm.kernels import KernelParams, Tuning, default_tuning, flash_attention, reference_attention

IMPLEMENTATIONS = ("pallas", "cudnn", "xla")


def make_inputs(batch: int, seq: int, heads: int, kv_heads: int, head_dim: int, dtype, packed: bool, seed: int = 0):
    """Random q, k, v, cotangent and (if packed) segment ids of 1-4 documents per row."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (batch, seq, heads, head_dim), dtype)
    k = jax.random.normal(keys[1], (batch, seq, kv_heads, head_dim), dtype)
    v = jax.random.normal(keys[2], (batch, seq, kv_heads, head_dim), dtype)
    d_out = jax.random.normal(keys[3], q.shape, dtype)
    segment_ids = None
    if packed:
        rng = np.random.default_rng(seed)
        rows = []
        for _ in range(batch):
            cuts = np.sort(rng.choice(np.arange(1, seq), size=3, replace=False))
            row = np.searchsorted(cuts, np.arange(seq), side="right") + 1
            row[-seq // 16 :] = 0  # a padded tail
            rows.append(row)
        segment_ids = jnp.asarray(np.stack(rows), jnp.int32)
    return q, k, v, d_out, segment_ids


def attention_fn(impl: str, segment_ids, causal: bool, tuning: Tuning | None = None) -> Callable:
    """(q, k, v) -> out for one implementation; cudnn/xla get packed segments as a dense mask."""
    if impl == "pallas":
        return lambda q, k, v: flash_attention(q, k, v, segment_ids=segment_ids, causal=causal, tuning=tuning)
    mask = None
    if segment_ids is not None:
        mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    return lambda q, k, v: jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal, implementation=impl)


def time_fn(fn: Callable, args, *, calls: int, repeats: int) -> float:
    """Median seconds per call; each repeat dispatches `calls` calls back to back."""
    jax.block_until_ready(fn(*args))
    jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = None
        for _ in range(calls):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - start) / calls)
    return statistics.median(samples)


@dataclasses.dataclass
class Result:
    fwd_s: float | str
    fwd_bwd_s: float | str
    temp_bytes: int | str


def failure(err: Exception) -> str:
    text = str(err)
    return "OOM" if "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower() else "n/a"


def time_forward(attend: Callable, inputs, args) -> float | str:
    q, k, v, _, _ = inputs
    try:
        return time_fn(jax.jit(attend), (q, k, v), calls=args.calls, repeats=args.repeats)
    except Exception as err:  # noqa: BLE001 - a failed entry prints OOM/n/a, the sweep goes on
        return failure(err)


def time_forward_backward(attend: Callable, inputs, args) -> tuple[float | str, int | str]:
    """(seconds, temporary bytes of the compiled program)."""
    q, k, v, d_out, _ = inputs

    def fwd_bwd(q, k, v, d_out):
        _, vjp = jax.vjp(attend, q, k, v)
        return vjp(d_out)

    try:
        compiled = jax.jit(fwd_bwd).lower(q, k, v, d_out).compile()
        seconds = time_fn(compiled, (q, k, v, d_out), calls=args.calls, repeats=args.repeats)
        return seconds, compiled.memory_analysis().temp_size_in_bytes
    except Exception as err:  # noqa: BLE001
        return failure(err), failure(err)


def run_impl(impl: str, inputs, causal: bool, args, tuning: Tuning | None = None) -> Result:
    seq = inputs[0].shape[1]
    if impl == "xla" and seq > args.max_seq_xla:
        return Result("skip", "skip", "skip")
    attend = attention_fn(impl, inputs[4], causal, tuning)
    fwd_s = time_forward(attend, inputs, args)
    if fwd_s in ("OOM", "n/a"):
        return Result(fwd_s, fwd_s, fwd_s)
    return Result(fwd_s, *time_forward_backward(attend, inputs, args))


def attention_flops(batch: int, heads: int, seq: int, head_dim: int, causal: bool) -> float:
    return 4 * batch * heads * seq * seq * head_dim * (0.5 if causal else 1.0)


def fmt_ms(t) -> str:
    return f"{t * 1e3:.2f}" if isinstance(t, float) else t


def fmt_tflops(flops: float, t) -> str:
    return f"{flops / t / 1e12:.0f}" if isinstance(t, float) else t


def fmt_ratio(ours, theirs) -> str:
    """Throughput of ours relative to theirs (>1: ours is faster)."""
    return f"{theirs / ours:.2f}x" if isinstance(ours, float) and isinstance(theirs, float) else "-"


def fmt_mib(b) -> str:
    return f"{b / 2**20:.0f}" if isinstance(b, int) else b


def benchmark(args, tuned: dict[int, Tuning]) -> None:
    """The table; pallas uses `tuned[head_dim]` where given, else the default tuning."""
    dtype = jnp.dtype(args.dtype)
    rows = []
    for head_dim in args.head_dims:
        for seq in args.seq_lens:
            batch = max(1, args.tokens // seq)
            inputs = make_inputs(batch, seq, args.heads, args.kv_heads, head_dim, dtype, args.packed)
            results = {impl: run_impl(impl, inputs, args.causal, args, tuned.get(head_dim)) for impl in args.impls}
            flops = attention_flops(batch, args.heads, seq, head_dim, args.causal)
            rows.append((seq, head_dim, batch, flops, results))
            summary = ", ".join(f"{i} {fmt_ms(r.fwd_s)}/{fmt_ms(r.fwd_bwd_s)} ms" for i, r in results.items())
            print(f"seq={seq} D={head_dim} B={batch} fwd/fwd+bwd: {summary}", flush=True)

    print(
        f"\n{jax.devices()[0].device_kind}, jax {jax.__version__}, {datetime.date.today()}, {args.dtype}, "
        f"causal={args.causal}, packed={args.packed}, heads={args.heads}, kv_heads={args.kv_heads}, "
        f"tokens per batch={args.tokens}. pallas/x = time of x / time of pallas (>1: pallas is faster)."
    )
    print_table("Forward", rows, args.impls, lambda r: r.fwd_s, flops_multiple=1.0, with_memory=False)
    print_table("Forward + backward", rows, args.impls, lambda r: r.fwd_bwd_s, flops_multiple=3.5, with_memory=True)


def print_table(title: str, rows, impls, get_time: Callable, flops_multiple: float, with_memory: bool) -> None:
    others = [i for i in impls if i != "pallas"] if "pallas" in impls else []
    header = ["seq", "D", "B"] + [f"{i} ms" for i in impls] + [f"{i} TF/s" for i in impls]
    header += [f"pallas/{o}" for o in others] + ([f"{i} temp MiB" for i in impls] if with_memory else [])
    lines = [f"\n{title}\n", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for seq, head_dim, batch, flops, res in rows:
        cells = [str(seq), str(head_dim), str(batch)]
        cells += [fmt_ms(get_time(res[i])) for i in impls]
        cells += [fmt_tflops(flops_multiple * flops, get_time(res[i])) for i in impls]
        cells += [fmt_ratio(get_time(res["pallas"]), get_time(res[o])) for o in others]
        if with_memory:
            cells += [fmt_mib(res[i].temp_bytes) for i in impls]
        lines.append("| " + " | ".join(cells) + " |")
    print("\n".join(lines), flush=True)


def check(args) -> None:
    """Compiled kernels (fwd and grads) vs a float32 HIGHEST-precision XLA reference."""
    cases = [  # (batch, seq, heads, kv_heads, head_dim, dtype, causal, window, packed)
        (2, 1000, 4, 4, 64, "bfloat16", True, None, False),
        (1, 777, 8, 2, 128, "bfloat16", True, None, True),
        (1, 1024, 8, 1, 64, "float16", False, None, False),
        (1, 900, 4, 4, 128, "float32", True, 200, False),
        (2, 513, 8, 2, 64, "float32", True, None, True),
        (1, 2048, 16, 2, 128, "bfloat16", True, 512, True),
    ]
    worst = 0.0
    for batch, seq, heads, kv_heads, head_dim, dtype, causal, window, packed in cases:
        q, k, v, d_out, segment_ids = make_inputs(batch, seq, heads, kv_heads, head_dim, jnp.dtype(dtype), packed, seed=seq)
        kwargs = dict(segment_ids=segment_ids, causal=causal, sliding_window=window)
        out, vjp = jax.vjp(lambda q, k, v: flash_attention(q, k, v, **kwargs), q, k, v)
        grads = vjp(d_out)
        with jax.default_matmul_precision("highest"):
            upcast = [x.astype(jnp.float32) for x in (q, k, v)]
            ref_out, ref_vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, **kwargs), *upcast)
            ref_grads = ref_vjp(d_out.astype(jnp.float32))
        errors = []
        for got, want in zip((out, *grads), (ref_out, *ref_grads)):
            got = got.astype(jnp.float32)
            errors.append(float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want)))
        tolerance = 1e-5 if dtype == "float32" else 2e-2
        worst = max(worst, max(e / tolerance for e in errors))
        status = "ok" if max(errors) < tolerance and np.all(np.isfinite(errors)) else "FAIL"
        print(f"check {status}: B={batch} T={seq} H={heads}/{kv_heads} D={head_dim} {dtype} causal={causal} "
              f"window={window} packed={packed} rel err out/dq/dk/dv = " + " ".join(f"{e:.1e}" for e in errors), flush=True)
    print(f"check worst error / tolerance = {worst:.2f}")


FWD_CANDIDATES = [(128, 64, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (64, 64, 4, 4), (128, 32, 4, 4), (64, 128, 4, 3)]
BWD_CANDIDATES = [  # (dq params, dkdv params); dkdv rows are keys, so its block_k is the tall side
    ((64, 64, 4, 2), (64, 64, 4, 2)), ((64, 64, 4, 3), (64, 64, 4, 3)), ((128, 32, 4, 3), (32, 128, 4, 3)),
    ((128, 32, 8, 3), (32, 128, 8, 3)), ((64, 32, 4, 3), (32, 64, 4, 3)), ((128, 64, 8, 2), (64, 128, 8, 2)),
]


def tune(args) -> dict[int, Tuning]:
    """Best Triton parameters per head dim: forward candidates by forward time, then (dq, dk/dv)
    candidates by forward+backward time with the best forward."""
    dtype = jnp.dtype(args.dtype)
    seq = args.tune_seq
    batch = max(1, args.tokens // seq)
    best = {}
    for head_dim in args.head_dims:
        inputs = make_inputs(batch, seq, args.heads, args.kv_heads, head_dim, dtype, args.packed)
        flops = attention_flops(batch, args.heads, seq, head_dim, args.causal)
        print(f"\n## tune seq={seq} D={head_dim} B={batch}; (block_q, block_k, num_warps, num_stages)")
        tuning = default_tuning("gpu", head_dim)
        timings = []
        for candidate in FWD_CANDIDATES:
            trial = dataclasses.replace(tuning, fwd=KernelParams(*candidate))
            seconds = time_forward(attention_fn("pallas", inputs[4], args.causal, trial), inputs, args)
            print(f"fwd {candidate}: {fmt_ms(seconds)} ms, {fmt_tflops(flops, seconds)} TF/s", flush=True)
            if isinstance(seconds, float):
                timings.append((seconds, trial))
        tuning = min(timings, key=lambda t: t[0])[1]
        timings = []
        for dq, dkdv in BWD_CANDIDATES:
            trial = dataclasses.replace(tuning, dq=KernelParams(*dq), dkdv=KernelParams(*dkdv))
            seconds, _ = time_forward_backward(attention_fn("pallas", inputs[4], args.causal, trial), inputs, args)
            print(f"dq {dq} dkdv {dkdv}: fwd+bwd {fmt_ms(seconds)} ms, {fmt_tflops(3.5 * flops, seconds)} TF/s", flush=True)
            if isinstance(seconds, float):
                timings.append((seconds, trial))
        best[head_dim] = min(timings, key=lambda t: t[0])[1]
        print(f"best D={head_dim}: {best[head_dim]}", flush=True)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seq_lens", type=lambda s: [int(x) for x in s.split(",")], default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--head_dims", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128])
    parser.add_argument("--tokens", type=int, default=32768, help="batch * seq, so work stays comparable")
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv_heads", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--causal", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--packed", action="store_true", help="segment ids (3-4 documents + padding per row)")
    parser.add_argument("--impls", type=lambda s: s.split(","), default=list(IMPLEMENTATIONS))
    parser.add_argument("--calls", type=int, default=5, help="calls per timed repeat")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--check", action="store_true", help="run the correctness check before timing")
    parser.add_argument("--tune", action="store_true", help="sweep Triton parameters first; the table uses the best")
    parser.add_argument("--max_seq_xla", type=int, default=1 << 30, help="longer sequences print 'skip' for xla")
    parser.add_argument("--tune_seq", type=int, default=4096)
    parser.add_argument("--skip_table", action="store_true")
    args = parser.parse_args()
    print(f"devices: {jax.devices()}", flush=True)
    if args.check:
        check(args)
    tuned = tune(args) if args.tune else {}
    if not args.skip_table:
        benchmark(args, tuned)


if __name__ == "__main__":
    main()
