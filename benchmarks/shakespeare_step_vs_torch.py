"""maxlm's shakespeare_char train step against the PyTorch reference's, interleaved in one process.

    python benchmarks/shakespeare_step_vs_torch.py [--rounds 10] [--steps 100] [--out FILE]

Whole runs (``shakespeare_vs_torch.py``) swing with this VM's speed from one run to the next. Here
both steps alternate in rounds of ``--steps`` steps inside one process, so each round's ratio compares
the two under the same conditions. Same model and recipe as the main job (4 layers, d_model 128, batch
12 x 64, AdamW with clipping): maxlm's step as the job runs it (its mesh of ``mesh.cpu_devices`` CPU
devices, ``train.steps_per_call`` steps per call), torch's as ``torch_shakespeare.py`` does on all
cores. Both train on random windows of the corpus. Compilation and warm-up steps are not timed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


def maxlm_runner(config, corpus: np.ndarray, vocab: int, rng: np.random.Generator):
    """``run(n)``: n train steps of the main job's program (n a multiple of steps_per_call)."""
    import jax

    from maxlm import sharding
    from maxlm.models import build_model
    from maxlm.models.transformer import ModelConfig
    from maxlm.train.objectives import make_objective
    from maxlm.train.optimizer import make_optimizer
    from maxlm.train.step import init_state, make_train_step, state_layout

    t, per_call = config.train, config.train.steps_per_call
    mesh = sharding.make_mesh(config.mesh.data, config.mesh.fsdp, config.mesh.tensor)
    rules = sharding.DEFAULT_RULES
    model = build_model(ModelConfig.from_config(config.model, vocab), rules)
    tx = make_optimizer(t)
    layout = state_layout(model, tx, mesh)
    with jax.set_mesh(mesh):
        state = {"state": init_state(model, tx, layout, config.seed)}
        step = make_train_step(make_objective("pretrain", model, t), tx, layout, mesh, rules, steps_per_call=per_call)

    def call_batch():
        windows = _windows(corpus, per_call * t.batch_size, t.seq_len, rng).reshape(per_call, t.batch_size, -1)
        positions = np.broadcast_to(np.arange(t.seq_len, dtype=np.int32), windows[..., 1:].shape)
        host = {"tokens": windows[..., :-1], "targets": windows[..., 1:], "positions": positions.copy(),
                "segment_ids": np.ones_like(positions), "loss_mask": np.ones(positions.shape, np.float32)}
        return sharding.to_global_batch(host, mesh, rules, stacked=True)

    def run(n: int) -> None:
        with jax.set_mesh(mesh):
            for _ in range(n // per_call):
                state["state"], metrics = step(state["state"], call_batch(), None)
            jax.block_until_ready(metrics["loss"])

    return run


def torch_runner(corpus: np.ndarray, vocab: int, batch_size: int, seq_len: int, rng: np.random.Generator):
    import torch
    import torch_shakespeare as reference

    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    model, opt = reference.build(vocab, seq_len)

    def run(n: int) -> None:
        for _ in range(n):
            windows = torch.from_numpy(_windows(corpus, batch_size, seq_len, rng).astype(np.int64))
            reference.train_step(model, opt, windows[:, :-1], windows[:, 1:], reference.PEAK_LR)

    return run


def _windows(corpus: np.ndarray, count: int, seq_len: int, rng: np.random.Generator) -> np.ndarray:
    starts = rng.integers(0, len(corpus) - seq_len - 1, count)
    return corpus[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--steps", type=int, default=100, help="steps per side per round")
    parser.add_argument("--out", default="")
    args = parser.parse_args()

    from train_step import load_preset

    config = load_preset("shakespeare_char")
    from maxlm import sharding

    sharding.use_cpu_devices(config.mesh.cpu_devices)  # before anything touches jax.devices()
    import torch
    import torch_shakespeare as reference

    text = reference.load_corpus()
    chars = sorted(set(text))
    lookup = {c: i for i, c in enumerate(chars)}
    corpus = np.array([lookup[c] for c in text], np.int32)
    rng = np.random.default_rng(0)
    t = config.train
    steps = max(t.steps_per_call, args.steps - args.steps % t.steps_per_call)
    runners = {"maxlm": maxlm_runner(config, corpus, len(chars), rng),
               "torch": torch_runner(corpus, len(chars), t.batch_size, t.seq_len, rng)}
    for run in runners.values():  # compile, warm up
        run(2 * t.steps_per_call)
    times: dict[str, list[float]] = {name: [] for name in runners}
    for _ in range(args.rounds):
        for name, run in runners.items():
            start = time.perf_counter()
            run(steps)
            times[name].append((time.perf_counter() - start) / steps)
    ratios = [a / b for a, b in zip(times["maxlm"], times["torch"])]
    tokens = t.batch_size * t.seq_len
    lines = [f"shakespeare_char train step, {args.rounds} interleaved rounds of {steps} steps per side, "
             f"{os.cpu_count()} CPU cores, maxlm on {config.mesh.cpu_devices} CPU devices, torch {torch.__version__}",
             "", "| round | maxlm step (ms) | torch step (ms) | maxlm / torch |", "| --- | ---: | ---: | ---: |"]
    for i, (a, b, r) in enumerate(zip(times["maxlm"], times["torch"], ratios)):
        lines.append(f"| {i + 1} | {a * 1e3:.2f} | {b * 1e3:.2f} | {r:.3f} |")
    med_a, med_b = statistics.median(times["maxlm"]), statistics.median(times["torch"])
    lines.append(f"| median | {med_a * 1e3:.2f} | {med_b * 1e3:.2f} | {statistics.median(ratios):.3f} |")
    lines += ["", f"tokens/s (median round): maxlm {tokens / med_a:.4g}, torch {tokens / med_b:.4g}, "
              f"ratio {med_b / med_a:.3f}; maxlm faster in {sum(r < 1 for r in ratios)} of {len(ratios)} rounds"]
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"Command: `python benchmarks/shakespeare_step_vs_torch.py {' '.join(sys.argv[1:])}`\n\n{text}\n")


if __name__ == "__main__":
    main()
