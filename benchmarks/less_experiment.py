"""LESS on CPU: does it find the target task in a mixed pool, and does SFT on its pick help the target?

    python benchmarks/less_experiment.py [--seeds=0,1,2] [--target=reverse] [--workdir=runs/less_experiment]
    python benchmarks/less_experiment.py --write_data=DIR   # only the data (for configs/less_demo.py)

The pool mixes four clearly different synthetic task types, 100 ``{"messages": [...]}`` records each:
arithmetic ("What is 23 + 48?" -> "71"), string reversal ("Reverse: apple river" -> "revir elppa"),
uppercase copying ("Uppercase: apple river" -> "APPLE RIVER") and the first turn of HH-RLHF dialogues
(builtin:hh_rlhf_harmless_test). Eight held-out records of the target type (``--target``, default reverse)
are LESS's validation set, 40 more are the target's test set. For each seed, LESS (configs/less_demo.py: a 2-layer random-init model, LoRA
warmup on 5% of the pool for 4 epochs, d=2048) and a uniformly random pick each choose 5% of the pool;
the table gives the share of the target type in each pick (random's expected share, the base rate, is 25%) and
the test loss of the target after fine-tuning the same random-init model on each pick.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import time

import jax
import numpy as np

from maxlm.data import sft
from maxlm.data.sources import BUILTIN_CORPORA, asset_path, load_jsonl
from maxlm.select.less import run_selection, top_indices
from maxlm.train.loop import train

TASKS = ("arithmetic", "reverse", "uppercase", "hh")
PER_TASK, VALIDATION, TEST = 100, 8, 40
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _chat(task: str, user: str, assistant: str) -> dict:
    return {"task": task, "messages": [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]}


def _words() -> list[str]:
    with open(asset_path(BUILTIN_CORPORA["tinyshakespeare"][0])) as f:
        return sorted({w for w in re.findall(r"[a-z]+", f.read()) if 3 <= len(w) <= 8})


def make_records(rng: np.random.Generator, task: str, count: int, hh: list[dict], words: list[str]) -> list[dict]:
    """``count`` records of one task type."""
    out = []
    for _ in range(count):
        phrase = " ".join(rng.choice(words, int(rng.integers(2, 5))))
        if task == "arithmetic":
            a, b = (int(x) for x in rng.integers(10, 100, 2))
            out.append(_chat(task, f"What is {a} + {b}?", str(a + b)))
        elif task == "reverse":
            out.append(_chat(task, f"Reverse: {phrase}", phrase[::-1]))
        elif task == "uppercase":
            out.append(_chat(task, f"Uppercase: {phrase}", phrase.upper()))
        else:
            turns = sft.parse_hh(hh[int(rng.integers(len(hh)))]["chosen"])
            out.append(_chat(task, turns[0]["content"][:150], turns[1]["content"][:150]))
    return out


def write_data(directory: str, target: str = "reverse", seed: int = 0) -> None:
    """``pool.jsonl`` (400 records, shuffled), ``val.jsonl`` (8 held-out target records), ``test.jsonl`` (40 more)."""
    rng = np.random.default_rng(seed)
    hh = load_jsonl(asset_path(BUILTIN_CORPORA["hh_rlhf_harmless_test"][0]), fields=("chosen",), on_bad_record="error")
    words = _words()
    pool = [r for task in TASKS for r in make_records(rng, task, PER_TASK, hh, words)]
    pool = [pool[i] for i in rng.permutation(len(pool))]
    held_out = make_records(rng, target, VALIDATION + TEST, hh, words)
    os.makedirs(directory, exist_ok=True)
    for name, records in (("pool", pool), ("val", held_out[:VALIDATION]), ("test", held_out[VALIDATION:])):
        with open(os.path.join(directory, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)


def _read(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def demo_config(data_dir: str):
    import importlib.util
    spec = importlib.util.spec_from_file_location("less_demo", os.path.join(ROOT, "configs", "less_demo.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(data_dir)


def target_loss_after_sft(config, picked: list[dict], test: list[dict], workdir: str, steps: int) -> float:
    """The target test loss after full SFT of the warmup's random-init model on ``picked``.

    The data file is ``picked`` then ``test``; ``data.val_fraction`` holds out exactly ``test``.
    """
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "data.jsonl")
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in picked + test)
    c = config.train
    c.data.update(source=f"jsonl:{path}", val_fraction=len(test) / (len(picked) + len(test)))
    c.train.update(objective="sft", steps=steps, warmup_steps=5, schedule="cosine", lr=3e-3, eval_every=0,
                   eval_batches=100, log_every=steps)
    c.lora.rank = 0
    c.checkpoint.update(every_steps=0, async_save=False)
    return float(train(c, workdir)["val_loss"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--workdir", default=os.path.join(ROOT, "runs", "less_experiment"))
    parser.add_argument("--sft_steps", type=int, default=60)
    parser.add_argument("--target", default="reverse", choices=TASKS)
    parser.add_argument("--write_data", default="", help="only write the data to this directory")
    args = parser.parse_args()
    if args.write_data:
        write_data(args.write_data, args.target)
        return
    data_dir = os.path.join(args.workdir, f"data_{args.target}")
    write_data(data_dir, args.target)
    pool, test = _read(os.path.join(data_dir, "pool.jsonl")), _read(os.path.join(data_dir, "test.jsonl"))
    is_target = np.array([r["task"] == args.target for r in pool])
    rows = []
    start = time.perf_counter()
    for seed in args.seeds:
        config = demo_config(data_dir)
        config.update(seed=seed, workdir=os.path.join(args.workdir, f"select_{args.target}_{seed}"))
        config.validation = {args.target: f"jsonl:{data_dir}/val.jsonl"}
        config.train.seed = seed
        chosen = _read(run_selection(config))
        scores = np.load(os.path.join(config.workdir, "scores.npy"))
        less_pick = top_indices(scores, config.percentage)
        random_pick = np.random.default_rng(1000 + seed).choice(len(pool), len(less_pick), replace=False)
        losses = {name: target_loss_after_sft(demo_config(data_dir), [pool[i] for i in pick], test,
                                              os.path.join(args.workdir, f"sft_{args.target}_{name}_{seed}"), args.sft_steps)
                  for name, pick in (("less", less_pick), ("random", random_pick))}
        by_task = {t: sum(r["task"] == t for r in chosen) for t in TASKS}
        rows.append((seed, is_target[less_pick].mean(), is_target[random_pick].mean(), losses["less"],
                     losses["random"], by_task))
    minutes = (time.perf_counter() - start) / 60
    print(f"\ndevice: {jax.devices()[0].device_kind} x{jax.device_count()}; pool {len(pool)} ({PER_TASK} per task: "
          f"{', '.join(TASKS)}), target {args.target!r}: {VALIDATION} validation, {TEST} test examples; "
          f"select 5% = {len(less_pick)}; {minutes:.1f} min\n")
    print("| seed | LESS precision@5% | random precision@5% | base rate | target test loss, SFT on LESS 5% | "
          "target test loss, SFT on random 5% | LESS pick by task |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | --- |")
    for seed, p_less, p_random, l_less, l_random, by_task in rows:
        picks = ", ".join(f"{t} {n}" for t, n in by_task.items())
        print(f"| {seed} | {p_less:.0%} | {p_random:.0%} | {is_target.mean():.0%} | {l_less:.3f} | {l_random:.3f} | "
              f"{picks} |")
    mean = np.mean([r[1:5] for r in rows], 0)
    print(f"| mean | {mean[0]:.0%} | {mean[1]:.0%} | {is_target.mean():.0%} | {mean[2]:.3f} | {mean[3]:.3f} | |")


if __name__ == "__main__":
    main()
