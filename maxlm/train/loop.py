"""The training loop: config -> mesh -> data -> model -> state -> steps -> metrics/checkpoints.

``train(config, workdir)`` is what ``launch/train.py`` runs; tests call it too.
Rerunning it on the same workdir resumes from the latest valid checkpoint.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import os
import time

import jax
import numpy as np
from absl import logging

from maxlm import config as config_lib
from maxlm import distributed, sharding
from maxlm.checkpoint import Checkpointer, load_params
from maxlm.models import build_model
from maxlm.models.lora import LoraConfig
from maxlm.models.transformer import ModelConfig
from maxlm.train import data as train_data
from maxlm.train.events import log_event, read_events
from maxlm.train.guard import DivergenceGuard
from maxlm.train.metrics import MetricsWriter, flops_per_token, peak_flops
from maxlm.train.objectives import PREFERENCE_OBJECTIVES, make_objective
from maxlm.train.optimizer import make_optimizer, set_rollback_scales
from maxlm.train.preemption import PREEMPTED_EXIT_CODE, PreemptionWatcher
from maxlm.train.reference import cached_reference_logps
from maxlm.train.sample import TextSampler
from maxlm.train.step import init_frozen, init_state, make_eval_step, make_train_step, state_layout


class Preempted(SystemExit):
    """Raised after the preemption checkpoint is written; exits with ``PREEMPTED_EXIT_CODE``."""

    def __init__(self):
        super().__init__(PREEMPTED_EXIT_CODE)


# Calls the host may queue ahead of the devices. XLA:CPU deadlocks when many programs with collectives are
# queued on several devices (200 on 8 host devices, 64 on 2); a few keep the devices busy.
_MAX_IN_FLIGHT = 8


def _queue_call(in_flight: collections.deque, result) -> None:
    """Adds a call's (device) result to ``in_flight``; waits for the oldest beyond ``_MAX_IN_FLIGHT``."""
    in_flight.append(result)
    if len(in_flight) > _MAX_IN_FLIGHT:
        jax.block_until_ready(in_flight.popleft())


def evaluate(eval_step, params, frozen, batches, mesh, rules) -> dict[str, float]:
    """``val_<name>``: every ``<name>_sum`` of the eval step over the given batches, per token (or per pair)."""
    totals, in_flight = [], collections.deque()
    for b in batches:  # the host queues batches ahead of the devices, and fetches every sum at the end
        totals.append(eval_step(params, sharding.to_global_batch(b, mesh, rules), frozen))
        _queue_call(in_flight, totals[-1])
    totals = jax.device_get(totals)
    count = max(sum(float(t["num_tokens"]) for t in totals), 1.0)
    return {f"val_{k.removesuffix('_sum')}": sum(float(t[k]) for t in totals) / count
            for k in totals[0] if k.endswith("_sum")}


def _use_hf_model(config) -> None:
    """``init_from_hf``: the HF config.json sets the model section; its tokenizer replaces ``char``."""
    from maxlm.convert import hf
    try:
        config.model.update(hf.model_overrides(hf.read_hf_config(config.init_from_hf)))
    except (OSError, ValueError) as e:
        raise config_lib.ConfigError(f"init_from_hf={config.init_from_hf!r}: {e}") from None
    if config.data.tokenizer == "char":
        config.data.tokenizer = config.init_from_hf


def _guard(config, workdir: str) -> DivergenceGuard | None:
    d = config.train.divergence
    if not d.enabled:
        return None
    done = sum(e["event"] == "divergence_rollback" for e in read_events(workdir))
    return DivergenceGuard(**{k: v for k, v in d.to_dict().items() if k != "enabled"}, rollbacks=done)


def _poison(batch, step: int, nan_steps: set[int]):
    """Test hook: a NaN loss mask at a configured step, once per process."""
    if step not in nan_steps:
        return batch
    nan_steps.discard(step)
    logging.warning("debug.nan_at_steps: poisoning the batch of step %d", step)
    return dict(batch, loss_mask=batch["loss_mask"] * float("nan"))


def train(config, workdir: str) -> dict:
    """Runs the experiment described by ``config`` in ``workdir``; returns the last metrics."""
    try:
        sharding.use_cpu_devices(config.mesh.cpu_devices)
    except ValueError as e:
        raise config_lib.ConfigError(str(e)) from None
    config_lib.check_distributed(config)
    distributed.initialize(config.distributed)
    if config.init_from_hf:
        _use_hf_model(config)
    config_lib.validate(config, jax.device_count())
    if config.compile_cache_dir:
        jax.config.update("jax_compilation_cache_dir", os.path.expanduser(config.compile_cache_dir))
        # every program, even the ~30 ms eager ones (optimizer init, checkpoint slices): a rerun compiles nothing
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    os.makedirs(workdir, exist_ok=True)
    c = config.checkpoint
    ckpt = Checkpointer(workdir, every_steps=c.every_steps, every_minutes=c.every_minutes,
                        keep_last=c.keep_last, keep_every=c.keep_every, async_save=c.async_save)
    with PreemptionWatcher(ckpt.reached_preemption) as watcher:  # a SIGTERM during set-up counts too
        return _train(config, workdir, ckpt, watcher)


def _make_data(config, workdir: str) -> train_data.TrainData:
    """The run's data, with a first val batch made: too little data for the batch shape (or an empty corpus, a
    bad record) is a ConfigError naming the settings involved, before anything compiles."""
    t, d = config.train, config.data
    split = (f"data.source={d.source!r}, data.val_fraction={d.val_fraction}, train.batch_size={t.batch_size}, "
             f"train.seq_len={t.seq_len}")
    try:
        data = train_data.make_data(config, workdir)
        no_val = t.eval_batches and next(iter(data.val_batches()), None) is None
    except ValueError as e:
        raise config_lib.ConfigError(f"{e} ({split})") from None
    if no_val:
        raise config_lib.ConfigError(
            f"the validation split (data.val_fraction={d.val_fraction}) does not fill one batch of "
            f"train.batch_size={t.batch_size} rows: raise data.val_fraction or lower train.batch_size")
    return data


def _train(config, workdir: str, ckpt: Checkpointer, watcher: PreemptionWatcher) -> dict:
    is_primary = jax.process_index() == 0
    rules = tuple(tuple(r) for r in config.mesh.rules)
    m = config.mesh
    mesh = sharding.make_mesh(m.data, m.fsdp, m.tensor, dcn=(m.dcn_data, m.dcn_fsdp, m.dcn_tensor))
    t = config.train

    data = _make_data(config, workdir)
    if config.model.vocab_size and config.model.vocab_size < data.tokenizer.vocab_size:
        raise config_lib.ConfigError(f"model.vocab_size={config.model.vocab_size} but the tokenizer "
                                     f"{data.tokenizer.path} has {data.tokenizer.vocab_size} pieces "
                                     "(a larger model vocabulary is fine, a smaller one is not)")
    model_cfg = ModelConfig.from_config(config.model, data.tokenizer.vocab_size)
    config.model.vocab_size = model_cfg.vocab_size
    config_json = config_lib.to_json(config)
    if is_primary:
        with open(os.path.join(workdir, "config.json"), "w") as f:
            f.write(config_json)

    model = build_model(model_cfg, rules)
    tx = make_optimizer(t)
    lora = LoraConfig.from_config(config.lora) if config.lora.rank else None
    dpo = t.objective == "dpo" and not t.dpo.reference_free
    precompute = dpo and t.dpo.precompute_reference
    # Without LoRA a DPO reference is a separate frozen copy (unless precomputed); under LoRA it is the base.
    layout = state_layout(model, tx, mesh, lora, reference=dpo and not precompute and not lora)
    objective = make_objective(t.objective, model, t)
    logging.info("model: %.2fM params, mesh %s", model_cfg.num_params() / 1e6, dict(mesh.shape))
    guard = _guard(config, workdir)

    with jax.set_mesh(mesh):
        pretrained = config.init_from or config.init_from_hf

        def read_pretrained(abstract_params):
            if config.init_from_hf:  # the body's HF tensors only: a value head is not among them
                from maxlm.convert import hf
                return hf.load_hf(config.init_from_hf, mesh=mesh, rules_table=rules, model=model)[1]
            return load_params(config.init_from, abstract_params)

        def load_pretrained(abstract_params):
            logging.info("loading params from %s", pretrained)
            if model_cfg.value_head:  # a fresh (zero) reward head on a pretrained/SFT body
                body = read_pretrained({k: v for k, v in abstract_params.items() if k != "value_head"})
                head = abstract_params["value_head"]
                return dict(body, value_head=jax.jit(lambda: jax.numpy.zeros(head.shape, head.dtype),
                                                     out_shardings=head.sharding)())
            return read_pretrained(abstract_params)

        # Frozen params: the LoRA base, or the DPO reference; loaded or made afresh on every (re)start, never
        # checkpointed. The DPO reference is init_from (validate() insists), which is also the policy's start.
        frozen = None
        if layout.frozen_abstract is not None:
            frozen = layout.store_frozen(load_pretrained(layout.frozen_abstract) if pretrained
                                         else init_frozen(model, layout, config.seed))
        if precompute:  # one pass of the reference over every pair, then no reference params are kept
            reference = layout.reference_params(frozen) if lora else load_pretrained(layout.abstract["params"])
            ref_logps = cached_reference_logps(model, reference, data.pairs, t.batch_size, mesh, rules,
                                               train_data.cache_dir(config, workdir))
            del reference
            data = train_data.with_reference_logps(config, data, ref_logps)

        def fresh_state():
            params = load_pretrained(layout.abstract["params"]) if pretrained and not lora else None
            return init_state(model, tx, layout, config.seed, params)

        restored = ckpt.restore(layout.abstract, data_iterator=data.train)
        restored_state, start_step = restored or (None, 0)
        if restored:
            log_event(workdir, "resume", step=start_step)
            if pretrained:
                logging.info("resuming from step %d; init_from gives %s", start_step,
                             "only the frozen params" if frozen is not None else "nothing")

        train_step = make_train_step(objective, tx, layout, mesh, rules, grad_accum=t.grad_accum,
                                     steps_per_call=t.steps_per_call)
        eval_step = make_eval_step(objective, layout, mesh, rules)
        sampler = (TextSampler(model, data.tokenizer, config.sample, seed=config.seed, window=t.seq_len)
                   if is_primary and config.sample.num_tokens else None)
        writer = MetricsWriter(workdir, t.steps, start_step, enabled=is_primary)
        tokens_per_step = t.batch_size * t.seq_len * (2 if t.objective in PREFERENCE_OBJECTIVES else 1)
        flops = flops_per_token(model_cfg, t.seq_len) * tokens_per_step
        peak = peak_flops(jax.devices()[0])
        nan_steps = set(config.debug.nan_at_steps)
        stacked = t.steps_per_call > 1

        def next_call_batch(step: int):
            """The global batch of the call that starts at ``step``: ``[n, batch, ...]`` when ``stacked``."""
            batches = [_poison(next(data.train), s, nan_steps)
                       for s in range(step, min(step + t.steps_per_call, t.steps))]
            batch = {k: np.stack([b[k] for b in batches]) for k in batches[0]} if stacked else batches[0]
            return sharding.to_global_batch(batch, mesh, rules, stacked)

        pending = next_call_batch(start_step) if start_step < t.steps else None
        # Every program compiles before the first step, the train step in a thread while the state initialises
        # (XLA compiles with the GIL released), so the compiles overlap: ~0.5 s sooner for the main job on 2 cores,
        # whose compiles already keep both busy; more where compiling leaves cores idle (GPU and TPU hosts).

        def compile_train_step():
            train_step.lower(layout.abstract, pending, frozen).compile()

        with _in_background(compile_train_step if pending is not None else None, mesh):
            state = restored_state if restored else fresh_state()
            if t.eval_batches:
                val_batch = sharding.to_global_batch(next(iter(data.val_batches())), mesh, rules)
                eval_step.lower(layout.abstract["params"], val_batch, frozen).compile()
            if sampler and not layout.lora:  # under LoRA it samples merged params, made (and compiled) at the end
                sampler.compile(layout.abstract["params"])
        last: dict = {}
        interval_start, interval_steps = time.perf_counter(), 0
        step = start_step
        # The guard reads each step's health one step late, so the host never waits for the device; a step
        # that is about to be checkpointed (or the last, or a preemption stop) is checked before it is saved.
        unchecked: list[tuple[int, dict]] = []
        in_flight: collections.deque = collections.deque()
        while step < t.steps:
            n = min(t.steps_per_call, t.steps - step)
            batch, pending = (pending if pending is not None else next_call_batch(step)), None
            state, metrics = train_step(state, batch, frozen)
            _queue_call(in_flight, metrics["loss"])
            interval_steps += n
            done = step + n
            if guard:
                unchecked.append((done, {k: metrics[k] for k in ("loss", "grad_norm", "loss_scale") if k in metrics}))
                settle = done == t.steps or ckpt.will_save(done)
                bad = _first_unhealthy(guard, unchecked if settle else unchecked[:-1])
                unchecked = [] if settle or bad else unchecked[-1:]
                if bad:
                    bad_step, reason = bad
                    state, step = _roll_back(reason, bad_step, guard, ckpt, layout, data, fresh_state, workdir, t)
                    writer.rewind(step)
                    writer.message(f"divergence at step {bad_step}: {reason}; rolled back to step {step}")
                    continue
            logged = [s for s in range(step + 1, done + 1) if s % t.log_every == 0 or s == t.steps]
            if logged:
                per_step = _per_step(jax.device_get(metrics))
                step_time = (time.perf_counter() - interval_start) / interval_steps
                for s in logged:
                    record = {k: float(v[s - step - 1]) for k, v in per_step.items()}
                    record.update(step_time_s=step_time, tokens_per_sec=tokens_per_step / step_time,
                                  mfu=(flops / step_time / (peak * jax.device_count())) if peak else None)
                    writer.write(s, record)
                    last.update(record)
                interval_start, interval_steps = time.perf_counter(), 0
            if t.eval_batches and ((t.eval_every and done % t.eval_every == 0) or done == t.steps):
                val = evaluate(eval_step, state["params"], frozen, data.val_batches(), mesh, rules)
                writer.write(done, val)
                last.update(val)
                interval_start, interval_steps = time.perf_counter(), 0
            if guard and guard.suspect and done == t.steps:  # checked healthy, but maybe a spike starting
                logging.warning("saving the last step %d although its loss is above the spike threshold", done)
            if not (guard and guard.suspect) or done == t.steps:
                ckpt.save(done, state, data_iterator=data.train, config_json=config_json, force=done == t.steps)
            if watcher.should_stop(done):
                if guard and _first_unhealthy(guard, unchecked):  # never save a diverged state
                    logging.warning("stopping at step %d without a checkpoint: the step is unhealthy", done)
                else:
                    ckpt.save(done, state, data_iterator=data.train, config_json=config_json, force=True)
                ckpt.wait()
                log_event(workdir, "preempted", step=done)
                writer.close()
                raise Preempted()
            step = done

        if sampler:
            text = sampler(layout.model_params(state["params"], frozen))
            with open(os.path.join(workdir, "sample.txt"), "w") as f:
                f.write(text)
            shown = config.sample.prompt.lstrip("\n") + text  # the prompt too: a chat prompt shows the turns
            writer.message(f"--- sample ---\n{shown}\n--------------")
        ckpt.wait()
        ckpt.close()
        writer.close()
    return last


@contextlib.contextmanager
def _in_background(compile_fn, mesh):
    """Runs ``compile_fn`` (if any) in a thread, under ``mesh``, while the block runs; re-raises its error."""
    if compile_fn is None:
        yield
        return

    def run():
        with jax.set_mesh(mesh):  # the mesh context is per thread, and part of the compiled program's cache key
            compile_fn()

    with concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="maxlm-compile") as pool:
        compiled = pool.submit(run)
        yield
        compiled.result()


def _per_step(metrics: dict) -> dict[str, np.ndarray]:
    """Host metrics of one call as 1-D arrays, one entry per step (a call runs ``train.steps_per_call`` steps)."""
    return {k: np.asarray(v).reshape(-1) for k, v in metrics.items()}


def _first_unhealthy(guard: DivergenceGuard, calls: list[tuple[int, dict]]) -> tuple[int, str] | None:
    """Feeds the steps of ``(last step of a call, device metrics)`` to the guard in order; the first step
    it rejects, with the reason."""
    for done, health in calls:
        health = _per_step(jax.device_get(health))
        count = len(health["loss"])
        for i in range(count):
            step = done - count + 1 + i
            scale = health["loss_scale"][i] if "loss_scale" in health else None
            reason = guard.observe(step, health["loss"][i], health["grad_norm"][i], scale)
            if reason:
                return step, reason
    return None


def _roll_back(reason, bad_step, guard, ckpt, layout, data, fresh_state, workdir, t):
    """Restores the last good checkpoint (or the initial state), skips the data since, scales lr/clip."""
    log_event(workdir, "divergence_detected", step=bad_step, reason=reason)
    guard.reset_after_rollback()  # raises DivergenceError past max_rollbacks
    restored = ckpt.restore(layout.abstract, data_iterator=data.train, step=bad_step - 1)
    if restored:
        state, good_step = restored
        for _ in range(bad_step - good_step):
            next(data.train)
    else:  # no checkpoint yet: the initial state; the iterator is already past the bad window
        state, good_step = fresh_state(), 0
    skipped = bad_step - good_step
    opt_state = set_rollback_scales(state["opt_state"], lr_scale=guard.lr_scale,
                                    clip_norm=t.clip_norm * guard.clip_scale)
    state = jax.device_put(dict(state, opt_state=opt_state), layout.shardings)
    log_event(workdir, "divergence_rollback", from_step=bad_step, to_step=good_step, skipped_batches=skipped,
              lr_scale=guard.lr_scale, clip_scale=guard.clip_scale, rollbacks=guard.rollbacks)
    return state, good_step
