r"""Fault injection: SIGKILL the trainer K times under the supervisor; the result must not change.

  python benchmarks/fault_injection.py --kills=10 --steps=60 --every_steps=5 \
      --out=benchmarks/results/fault_injection_cpu.md

1. An uninterrupted reference run of `configs/tiny.py` (`launch/train.py`, CPU,
   `--devices` fake devices).
2. The same command under `launch/supervise.py`, while this script SIGKILLs the
   trainer child (its pid is in the supervisor's `supervisor_start` events) `--kills`
   times at seeded random moments: most kills land a random number of steps plus a
   random fraction of a step into the training of that attempt (so they hit the step,
   the metrics write or the checkpoint save), a `--startup_kill_fraction` of them at a
   random moment of start-up (imports, compile, restore).
3. Checks that the final train state (params, optimizer state, step, rng) is bitwise
   equal to the reference, and so is the loss of every step in metrics.jsonl.

"Data lost" per kill is the number of steps that had been computed before the kill
and had to be redone: the last step the killed attempt logged minus the step the
next attempt resumed from. With synchronous saves (the default here) it is at most
`--every_steps`; with `--async_save` a save still being written when the kill lands
is lost too, so it can reach every_steps + the steps run during that write.

All runs share JAX's persistent compilation cache (`--nocompile_cache` to turn it
off), so a restart costs a few seconds of start-up rather than a recompile.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from maxlm.checkpoint import read_state

REPO = Path(__file__).resolve().parents[1]


def _config_overrides(args) -> list[str]:
    return [
        f"--config.train.steps={args.steps}",
        "--config.train.log_every=1",
        "--config.train.eval_every=0",
        "--config.train.eval_batches=2",
        f"--config.checkpoint.every_steps={args.every_steps}",
        "--config.checkpoint.keep_last=3",
        f"--config.checkpoint.async_save={args.async_save}",
        "--config.sample.num_tokens=0",
    ]


def _train_command(args, workdir: Path, cache: Path) -> list[str]:
    return [
        sys.executable,
        str(REPO / "launch" / "train.py"),
        f"--config={REPO / 'configs' / 'tiny.py'}",
        f"--workdir={workdir}",
        f"--config.data.cache_dir={cache}",
        *_config_overrides(args),
    ]


def _env(args, root: Path) -> dict[str, str]:
    env = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={args.devices}",
        JAX_PLATFORMS="cpu",
        PYTHONUNBUFFERED="1",
    )
    if args.compile_cache:
        env.update(
            JAX_COMPILATION_CACHE_DIR=str(root / "jit_cache"),
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
        )
    return env


def _read_jsonl(path: Path) -> list[dict]:
    """The parsable lines of a JSONL file that may be rewritten or appended to right now."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return []
    records = []
    for line in text.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _wait_for(predicate, timeout_s: float, what: str, poll_s: float = 0.005):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:.0f}s waiting for {what}")
        time.sleep(poll_s)


def _parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


def _trees_equal(a, b) -> bool:
    import jax

    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(
        x.dtype == y.dtype and x.shape == y.shape and np.array_equal(x, y)
        for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
    )


def _losses(workdir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in _read_jsonl(workdir / "metrics.jsonl") if "loss" in r]


def run(args) -> dict:
    """Runs the reference and the supervised, killed run; returns the results (see `format_report`)."""
    rng = np.random.default_rng(args.seed)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="fault_injection_"))
    root.mkdir(parents=True, exist_ok=True)
    cache, env = root / "cache", _env(args, root)
    ref_dir, sup_dir = root / "reference", root / "supervised"
    for d in (ref_dir, sup_dir):
        if d.exists():
            raise FileExistsError(f"{d} exists: give a fresh --workdir")

    # 1. The reference (also fills the tokenizer and compilation caches).
    start = time.perf_counter()
    proc = subprocess.run(
        _train_command(args, ref_dir, cache),
        env=env,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    ref_wall = time.perf_counter() - start
    if proc.returncode:
        raise RuntimeError(f"reference run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")

    # 2. The supervised run, with kills.
    sup_dir.mkdir()
    supervisor_cmd = [
        sys.executable,
        str(REPO / "launch" / "supervise.py"),
        f"--workdir={sup_dir}",
        f"--max_restarts={args.kills + args.spare_restarts}",
        f"--backoff_s={args.backoff_s}",
        f"--max_backoff_s={args.max_backoff_s}",
        "--",
        *_train_command(args, sup_dir, cache),
    ]
    log = open(root / "supervised.log", "w")
    start = time.perf_counter()
    supervisor = subprocess.Popen(supervisor_cmd, env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    events = lambda name: [e for e in _read_jsonl(sup_dir / "events.jsonl") if e["event"] == name]
    kills: list[dict] = []
    startups: list[float] = []  # seconds from an attempt's start to its first step
    try:
        for k in range(args.kills):
            starts = _wait_for(
                lambda: (
                    [e for e in events("supervisor_start") if e["attempt"] == k]
                    or (supervisor.poll() is not None)
                ),
                args.timeout_s,
                f"attempt {k} to start",
            )
            if starts is True:
                break  # the supervisor is done (the run finished before all kills were made)
            pid, started = starts[0]["pid"], starts[0]["time"]

            def new_steps():
                return [
                    r["step"]
                    for r in _read_jsonl(sup_dir / "metrics.jsonl")
                    if r["time"] > started and "loss" in r
                ]

            # A start-up kill needs to know how long start-up takes: from the attempts so far.
            if startups and rng.random() < args.startup_kill_fraction:
                phase = "start-up"
                time.sleep(max(0.0, started + rng.uniform(0.0, min(startups)) - time.time()))
            else:
                phase = "training"
                try:
                    first = min(_wait_for(new_steps, args.timeout_s, f"attempt {k} to train"))
                except TimeoutError:
                    if supervisor.poll() is not None:
                        break
                    raise
                startups.append(
                    min(r["time"] for r in _read_jsonl(sup_dir / "metrics.jsonl") if r["time"] > started)
                    - started
                )
                target = min(first + int(rng.integers(0, args.every_steps + 2)), args.steps - 2)
                _wait_for(lambda: max(new_steps(), default=0) >= target, args.timeout_s, f"step {target}")
                time.sleep(rng.uniform(0.0, args.step_jitter_s))
            if _parent_pid(pid) != supervisor.pid:
                kills.append(dict(kill=k + 1, attempt=k, phase=phase, error="trainer gone before the kill"))
                continue
            os.kill(pid, signal.SIGKILL)
            exits = _wait_for(
                lambda: [e for e in events("supervisor_exit") if e["attempt"] == k],
                args.timeout_s,
                f"attempt {k} to exit",
            )
            steps = new_steps()
            kills.append(
                dict(
                    kill=k + 1,
                    attempt=k,
                    pid=pid,
                    phase=phase,
                    returncode=exits[0]["returncode"],
                    last_step=max(steps) if steps else None,
                )
            )
        supervisor.wait(timeout=args.timeout_s)
    finally:
        if supervisor.poll() is None:
            supervisor.send_signal(signal.SIGTERM)
            try:
                supervisor.wait(timeout=60)
            except subprocess.TimeoutExpired:
                supervisor.kill()
        log.close()
    sup_wall = time.perf_counter() - start

    # 3. What happened, from events.jsonl: the step each attempt resumed from (None: it was killed
    # before it restored; 0 without a resume event if it trained, i.e. it started afresh).
    resumed_from, attempt = {}, None
    for e in _read_jsonl(sup_dir / "events.jsonl"):
        if e["event"] == "supervisor_start":
            attempt = e["attempt"]
            resumed_from[attempt] = None
        elif e["event"] == "resume" and attempt is not None:
            resumed_from[attempt] = e["step"]
    trained = {k["attempt"] for k in kills if k.get("last_step") is not None} | {attempt}  # + the last one
    for a, step in resumed_from.items():
        if step is None and a in trained:
            resumed_from[a] = 0
    for kill in kills:
        kill["resumed_from"] = resumed_from.get(kill["attempt"])
        # Steps redone: up to the step the next attempt that got as far as restoring resumed from.
        nxt = next(
            (
                resumed_from[a]
                for a in sorted(resumed_from)
                if a > kill["attempt"] and resumed_from[a] is not None
            ),
            None,
        )
        kill["next_resumes_from"] = nxt
        kill["lost"] = 0 if kill.get("last_step") is None or nxt is None else kill["last_step"] - nxt

    ref_state, ref_losses = read_state(ref_dir), _losses(ref_dir)
    final_steps = [int(p.name) for p in (sup_dir / "checkpoints").iterdir() if p.name.isdigit()]
    sup_state = read_state(sup_dir) if final_steps else None
    survived = [k for k in kills if k.get("returncode") == -signal.SIGKILL]
    lost = [k["lost"] for k in survived]
    return dict(
        command=" ".join(["python benchmarks/fault_injection.py", *map(shlex.quote, args.argv)]),
        args=vars(args) | {"argv": None},
        root=str(root),
        supervisor_returncode=supervisor.returncode,
        kills=kills,
        kills_survived=len(survived) if supervisor.returncode == 0 else 0,
        restarts=len(events("supervisor_restart")),
        final_step=int(sup_state["step"]) if sup_state else None,
        params_equal=sup_state is not None and _trees_equal(sup_state["params"], ref_state["params"]),
        state_equal=sup_state is not None and _trees_equal(sup_state, ref_state),
        losses_equal=_losses(sup_dir) == ref_losses,
        max_lost=max(lost, default=0),
        mean_lost=float(np.mean(lost)) if lost else 0.0,
        ref_wall_s=ref_wall,
        sup_wall_s=sup_wall,
        startup_s=float(np.mean(startups)) if startups else None,
    )


def format_report(r: dict) -> str:
    a = r["args"]
    yes = lambda b: "yes" if b else "NO"
    bound = a["every_steps"]
    startup = "-" if r["startup_s"] is None else f"{r['startup_s']:.1f}"
    rows = [
        "| kills survived | restarts | final step | params equal | full state equal | losses equal (every step) "
        "| data lost per kill, steps (max / mean) | max <= checkpoint interval | wall time, s (reference / supervised) "
        "| restart to first step, s (mean) |",
        "|---|---|---|---|---|---|---|---|---|---|",
        f"| {r['kills_survived']} / {len(r['kills'])} | {r['restarts']} | {r['final_step']} / {a['steps']} "
        f"| {yes(r['params_equal'])} | {yes(r['state_equal'])} | {yes(r['losses_equal'])} "
        f"| {r['max_lost']} / {r['mean_lost']:.1f} | {yes(r['max_lost'] <= bound)} ({bound}"
        f"{', async: may exceed' if a['async_save'] else ''}) "
        f"| {r['ref_wall_s']:.1f} / {r['sup_wall_s']:.1f} "
        f"| {startup} |",
        "",
        "| kill | phase | attempt resumed from | last step logged before the kill | next attempt resumed from "
        "| steps redone |",
        "|---|---|---|---|---|---|",
    ]
    for k in r["kills"]:
        if "error" in k:
            rows.append(f"| {k['kill']} | {k['phase']} | {k['error']} | | | |")
            continue
        show = lambda v, none: none if v is None else v
        rows.append(
            f"| {k['kill']} | {k['phase']} | {show(k['resumed_from'], '- (killed before restoring)')} "
            f"| {show(k['last_step'], '- (none)')} | {show(k['next_resumes_from'], '-')} "
            f"| {k['lost']} |"
        )
    return "\n".join(rows)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n", 1)[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs to send to the trainer.")
    p.add_argument("--steps", type=int, default=60, help="train.steps.")
    p.add_argument("--every_steps", type=int, default=5, help="checkpoint.every_steps.")
    p.add_argument(
        "--async_save",
        action=argparse.BooleanOptionalAction,
        default=False,
        help="checkpoint.async_save (default: synchronous saves).",
    )
    p.add_argument("--devices", type=int, default=4, help="Fake CPU devices (mesh data=1, fsdp=devices).")
    p.add_argument("--seed", type=int, default=0, help="Seed of the kill schedule.")
    p.add_argument(
        "--startup_kill_fraction",
        type=float,
        default=0.2,
        help="Fraction of kills aimed at start-up (imports, compile, restore) instead of training.",
    )
    p.add_argument(
        "--step_jitter_s",
        type=float,
        default=0.05,
        help="A training kill lands up to this long after its target step was logged.",
    )
    p.add_argument("--backoff_s", type=float, default=0.2, help="Supervisor back-off.")
    p.add_argument("--max_backoff_s", type=float, default=1.0, help="Supervisor back-off cap.")
    p.add_argument("--spare_restarts", type=int, default=3, help="Supervisor max_restarts = kills + this.")
    p.add_argument(
        "--compile_cache",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Share JAX's persistent compilation cache between runs.",
    )
    p.add_argument(
        "--timeout_s", type=float, default=300.0, help="Give up waiting for any one thing after this."
    )
    p.add_argument("--workdir", default="", help="Where the runs go (default: a new temp dir).")
    p.add_argument("--out", default="", help="Also write the report (markdown) here.")
    p.add_argument("--append", action="store_true", help="Append the report to --out as one more section.")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    result = run(args)
    report = format_report(result)
    print(report)
    ok = (
        result["supervisor_returncode"] == 0
        and result["params_equal"]
        and result["losses_equal"]
        and (args.async_save or result["max_lost"] <= args.every_steps)
    )
    if args.out:
        import jax
        import orbax.checkpoint as ocp

        header = (
            f"# fault_injection on CPU\n\nDevice: the 2-core shared CPU development machine, jax {jax.__version__}, "
            f"orbax-checkpoint {ocp.__version__}, local disk. Reference and supervised runs: "
            f"`launch/train.py --config=configs/tiny.py` on fake CPU devices, compared bitwise.\n"
        )
        section = (
            f"\n## {'async' if args.async_save else 'sync'} saves\n\n    {result['command']}\n\n"
            f"configs/tiny.py, {args.devices} fake CPU devices, {args.steps} steps, checkpoint every "
            f"{args.every_steps} steps ({'async' if args.async_save else 'sync'} saves), supervisor back-off "
            f"{args.backoff_s}s (cap {args.max_backoff_s}s), kill schedule seed {args.seed}.\n\n{report}\n"
        )
        with open(args.out, "a" if args.append else "w") as f:
            f.write(section if args.append else header + section)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
