"""maxlm's main job against the plain PyTorch reference of the same model and recipe, side by side.

Each side runs in its own subprocess, one after the other, on the same cores, interleaved
(maxlm cold, torch, maxlm warm, torch) so that each maxlm run is compared with the torch run next to
it: this VM's speed drifts by tens of percent over minutes.

    python benchmarks/shakespeare_vs_torch.py [--steps 2000] [--repeats 3] [--out benchmarks/results/shakespeare_cpu.md]

``--repeats N`` runs N such rounds, each on a fresh compile cache, and ends with every round's ratios and
their median: one round is at the mercy of the VM's drift. ``shakespeare_step_vs_torch.py`` compares the
train steps alone, alternating inside one process.

maxlm: the README's main command, ``launch/train.py --config=configs/shakespeare_char.py`` (with ``--steps``
other than the config's 2000, only the step count and warmup change). Its wall time includes start-up,
compilation, the periodic evals and checkpoints and the final sample. It runs twice on one fresh XLA compilation
cache: ``cold`` is a first run, ``warm`` a rerun that finds its programs compiled. PyTorch:
``benchmarks/torch_shakespeare.py`` (needs the ``hf`` extra for torch) with the config's eval and checkpoint
schedule (``train.eval_every``, ``train.eval_batches``, ``checkpoint.every_steps``), so both do the same work.
Prints wall time, median step time, tokens/s and val loss with maxlm/torch ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_maxlm(config, steps: int, cache_dir: str) -> dict:
    overrides = [] if steps == config.train.steps else [
        f"--config.train.steps={steps}", f"--config.train.warmup_steps={min(100, steps // 2)}"]
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, os.path.join(ROOT, "launch", "train.py"), "--config=configs/shakespeare_char.py",
             f"--workdir={workdir}", f"--config.compile_cache_dir={cache_dir}", *overrides],
            check=True, cwd=ROOT, capture_output=True)
        wall = time.perf_counter() - start
        lines = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    step_times = [l["step_time_s"] for l in lines if "step_time_s" in l][1:]  # the first interval compiles
    step = statistics.median(step_times)
    return {"wall_s": wall, "step_time_s": step, "tokens_per_sec": 12 * 64 / step,
            "val_loss": [l["val_loss"] for l in lines if "val_loss" in l][-1]}


def run_torch(config, steps: int) -> dict:
    """The torch reference with the job's eval and checkpoint schedule."""
    schedule = dict(steps=steps, eval_batches=config.train.eval_batches, eval_every=config.train.eval_every,
                    checkpoint_every=config.checkpoint.every_steps)
    code = (f"import json, sys; sys.path.insert(0, {os.path.join(ROOT, 'benchmarks')!r}); "
            f"import torch_shakespeare as t; print(json.dumps(t.run(**{schedule!r})))")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, capture_output=True, text=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_s"] = time.perf_counter() - start  # include interpreter start-up and imports, as for maxlm
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--out", default="")
    parser.add_argument("--repeats", type=int, default=1,
                        help="rounds of (maxlm cold, torch, maxlm warm, torch), each on a fresh compile cache")
    args = parser.parse_args()
    from train_step import load_preset

    config = load_preset("shakespeare_char")
    rounds = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory() as cache_dir:  # cold: compiles everything; warm: a rerun, cache hits
            cold = run_maxlm(config, args.steps, cache_dir)
            torch_1 = run_torch(config, args.steps)
            warm = run_maxlm(config, args.steps, cache_dir)
            torch_2 = run_torch(config, args.steps)
        rounds.append((cold, torch_1, warm, torch_2))
        print(_round_table(*rounds[-1]), flush=True)
    text = (f"shakespeare_char, {args.steps} steps, batch 12 x 64, {os.cpu_count()} CPU cores, "
            f"torch {rounds[0][1].get('torch_version')}\n\n"
            + "\n\n".join(_round_table(*r) for r in rounds))
    if args.repeats > 1:
        text += "\n\n" + _summary(rounds)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"Command: `python benchmarks/shakespeare_vs_torch.py {' '.join(sys.argv[1:])}`\n\n{text}\n")


ROWS = [("wall time (s)", "wall_s"), ("median step (ms)", "step_time_s"), ("tokens/s", "tokens_per_sec"),
        ("val loss", "val_loss")]


def _round_table(cold: dict, torch_1: dict, warm: dict, torch_2: dict) -> str:
    table = ["| metric | maxlm (cold compile cache) | pytorch (run 1) | maxlm (warm) | pytorch (run 2) "
             "| cold / run 1 | warm / run 2 |", "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, key in ROWS:
        scale = 1000.0 if key == "step_time_s" else 1.0
        a, b, w, c = (run[key] * scale for run in (cold, torch_1, warm, torch_2))
        table.append(f"| {name} | {a:.4g} | {b:.4g} | {w:.4g} | {c:.4g} | {a / b:.3f} | {w / c:.3f} |")
    return "\n".join(table)


def _summary(rounds: list[tuple[dict, dict, dict, dict]]) -> str:
    """Each maxlm/torch ratio of every round, and their median."""
    lines = ["| ratio (maxlm / torch run next to it) | " + " | ".join(f"round {i + 1}" for i in range(len(rounds)))
             + " | median |", "| --- |" + " ---: |" * (len(rounds) + 1)]
    for label, key, maxlm_index in (("wall, cold", "wall_s", 0), ("wall, warm", "wall_s", 2),
                                    ("median step, cold", "step_time_s", 0), ("median step, warm", "step_time_s", 2)):
        ratios = [r[maxlm_index][key] / r[maxlm_index + 1][key] for r in rounds]
        lines.append(f"| {label} | " + " | ".join(f"{x:.3f}" for x in ratios)
                     + f" | {statistics.median(ratios):.3f} |")
    return "\n".join(lines)

if __name__ == "__main__":
    main()
