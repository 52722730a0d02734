r"""How long does a checkpoint save block the training loop? Async vs sync, per train step.

  python benchmarks/checkpoint_blocking.py --params_millions=124 --tokens=64 --saves=3

The state is `params_millions` float32 parameters (width x width matrices) plus their
adam moments; the step is a jitted forward/backward of one matmul per matrix over
`tokens` rows plus the adam update, so its cost scales like a real train step.
"Blocked" is the time `Checkpointer.save()` takes to return: the loop waits that
long. Target: blocked < one step for async saving. "Step while saving" is the next
step, run while the async save writes: on CPU it competes with the writer for the
cores, and a donated state also waits for the writer to finish reading its buffers.
"""

import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import optax
from absl import app, flags

from maxlm.checkpoint import Checkpointer

_PARAMS_MILLIONS = flags.DEFINE_float("params_millions", 124.0, "Model size in millions of params.")
_WIDTH = flags.DEFINE_integer("width", 1024, "Each parameter is a width x width matrix.")
_TOKENS = flags.DEFINE_integer("tokens", 64, "Rows of the activation matrix per step.")
_SAVES = flags.DEFINE_integer("saves", 3, "Saves measured per mode.")
_DONATE = flags.DEFINE_bool("donate", True, "Donate the state to the step, as real training does.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Where to write checkpoints (default: a temp dir).")

TX = optax.adam(1e-4)


def _init_state(n_params: int, width: int) -> dict:
    keys = jax.random.split(jax.random.key(0), max(1, round(n_params / width**2)))
    params = {f"w{i:03d}": jax.random.normal(k, (width, width)) * 0.02 for i, k in enumerate(keys)}
    return {
        "step": jnp.int32(0),
        "params": params,
        "opt_state": TX.init(params),
        "rng": jax.random.key_data(jax.random.key(1)),
    }


def _make_train_step(donate: bool):
    def train_step(state: dict, x: jax.Array) -> dict:
        def loss_fn(params):
            return sum(jnp.mean(jnp.square(x @ w)) for w in params.values())

        grads = jax.grad(loss_fn)(state["params"])
        updates, opt_state = TX.update(grads, state["opt_state"], state["params"])
        return {
            **state,
            "step": state["step"] + 1,
            "opt_state": opt_state,
            "params": optax.apply_updates(state["params"], updates),
        }

    return jax.jit(train_step, donate_argnums=0 if donate else ())


def _timed_step(train_step, state: dict, x: jax.Array) -> tuple[dict, float]:
    start = time.perf_counter()
    state = jax.block_until_ready(train_step(state, x))
    return state, time.perf_counter() - start


def _measure(workdir: str, async_save: bool, train_step, state: dict, x: jax.Array) -> dict:
    ckpt = Checkpointer(workdir, keep_last=1, async_save=async_save)
    blocked, during, done = [], [], []
    for _ in range(_SAVES.value):
        state, _ = _timed_step(train_step, state, x)
        start = time.perf_counter()
        ckpt.save(int(state["step"]), state, force=True)
        blocked.append(time.perf_counter() - start)
        state, step_time = _timed_step(train_step, state, x)  # runs while an async save writes
        during.append(step_time)
        ckpt.wait()
        done.append(time.perf_counter() - start)
    ckpt.close()
    return {"blocked": blocked, "during": during, "done": done, "state": state}


def main(argv):
    del argv
    train_step = _make_train_step(_DONATE.value)
    state = _init_state(int(_PARAMS_MILLIONS.value * 1e6), _WIDTH.value)
    x = jax.random.normal(jax.random.key(2), (_TOKENS.value, _WIDTH.value))
    for _ in range(2):  # compile, warm up the allocator
        state, _ = _timed_step(train_step, state, x)
    step_times = []
    for _ in range(5):
        state, t = _timed_step(train_step, state, x)
        step_times.append(t)
    step = statistics.median(step_times)
    n_params = sum(p.size for p in state["params"].values())
    gbytes = sum(a.nbytes for a in jax.tree.leaves(state)) / 1e9

    print(
        f"device: {jax.devices()[0].device_kind} x{jax.device_count()}, "
        f"params: {n_params / 1e6:.0f}M, state: {gbytes:.2f} GB, donate: {_DONATE.value}, "
        f"step: {step:.3f} s (median of 5)"
    )
    print(
        "| mode | blocked per save, s (median / max) | blocked / step | "
        "step while saving, s | save on disk after, s |"
    )
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(prefix="ckpt_bench_") as tmp:
        workdir = _WORKDIR.value or tmp
        for mode in ("async", "sync"):
            r = _measure(f"{workdir}/{mode}", mode == "async", train_step, state, x)
            state = r["state"]
            blocked = statistics.median(r["blocked"])
            print(
                f"| {mode} | {blocked:.3f} / {max(r['blocked']):.3f} | {blocked / step:.2f} | "
                f"{statistics.median(r['during']):.3f} | {statistics.median(r['done']):.3f} |"
            )


if __name__ == "__main__":
    app.run(main)
