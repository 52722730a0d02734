"""Train state, its shardings, and the jitted train / eval steps.

``TrainState`` is a plain dict pytree ``{step, params, opt_state, rng}``.
``make_train_step`` turns any objective into a ``jax.jit``-ed step with
explicit in/out shardings and a donated state.

Besides the state, the step takes ``frozen``: params that are never trained, never in the optimizer,
never donated, sharded like the policy. Under LoRA it is the base (the policy is the base with the
adapters folded in; with the adapters off it is also the DPO reference, so there is one copy of the
base weights). Without LoRA it is the DPO reference, or None.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxlm import sharding
from maxlm.models import Model
from maxlm.models import lora as lora_lib
from maxlm.train import loss_scale
from maxlm.train.objectives import Objective, loss_normalizer
from maxlm.train.optimizer import current_lr

TrainState = dict[str, Any]
_LORA_DROPOUT_STREAM = 0x10A  # folded into the step's dropout key for the LoRA branches' masks


@dataclasses.dataclass(frozen=True)
class StateLayout:
    """Abstract shapes and NamedShardings of the train state and of the frozen params (LoRA base or DPO reference)."""

    abstract: TrainState  # leaves: jax.ShapeDtypeStruct with .sharding
    shardings: TrainState
    lora: lora_lib.LoraConfig | None = None
    frozen_abstract: Any = None  # the base params under LoRA, the reference params for DPO, else None
    frozen_shardings: Any = None  # as the step takes them: int8 targeted weights under lora.quantize_base

    @property
    def param_shardings(self):
        return self.shardings["params"]

    @property
    def quantized(self) -> bool:
        return bool(self.lora and self.lora.quantize_base)

    def store_frozen(self, params):
        """The frozen params (``frozen_abstract``'s float layout) as the step takes them."""
        if not self.quantized:
            return params
        return jax.jit(lambda p: lora_lib.quantize_int8(p, self.lora), out_shardings=self.frozen_shardings)(params)

    def reference_params(self, frozen):
        """The frozen params as a model runs them (the DPO reference; the LoRA base with adapters off)."""
        return lora_lib.dequantize(frozen) if self.quantized and frozen is not None else frozen

    def model_params(self, trainable, frozen, lora_rng=None):
        """What the model runs with: the trained params, or the frozen base with the adapters folded in
        (kept apart, with dropout on their input, given ``lora_rng`` and ``lora.dropout`` > 0)."""
        if not self.lora:
            return trainable
        if self.lora.dropout and lora_rng is not None:
            return lora_lib.with_dropout(self.reference_params(frozen), trainable, self.lora, lora_rng)
        return lora_lib.merge(self.reference_params(frozen), trainable, self.lora)


def state_layout(model: Model, tx: optax.GradientTransformation, mesh: Mesh,
                 lora: lora_lib.LoraConfig | None = None, reference: bool = False) -> StateLayout:
    """``reference``: a frozen copy of the model's params goes with the state (the DPO reference
    without LoRA; under LoRA the frozen base already serves as the reference)."""
    fit = lambda specs, shapes: jax.tree.map(lambda spec, a: sharding.fit_spec(spec, a.shape, mesh), specs, shapes,
                                             is_leaf=lambda x: isinstance(x, P))
    base_params = model.abstract_params()
    base_specs = fit(model.param_specs(), base_params)
    if lora:
        abstract_params = jax.eval_shape(lambda rng: lora_lib.init_lora(rng, base_params, lora), jax.random.key(0))
        param_specs = fit(lora_lib.lora_specs(base_specs, lora, base_params), abstract_params)
    else:
        abstract_params, param_specs = base_params, base_specs
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    # tx.init traced, not run: run eagerly it would compile a dozen tiny programs for the schedule's first value
    opt_specs = optax.tree_map_params(lambda p: jax.eval_shape(lambda: tx.init(p)), lambda _, spec: spec,
                                      abstract_opt, param_specs,
                                      transform_non_params=lambda _: P(), is_leaf=lambda x: isinstance(x, P))
    specs = {"step": P(), "params": param_specs, "opt_state": opt_specs, "rng": P()}
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
                "opt_state": abstract_opt, "rng": jax.ShapeDtypeStruct((2,), jnp.uint32)}
    if uses_loss_scale(model):
        abstract["loss_scale"] = jax.eval_shape(loss_scale.init)
        specs["loss_scale"] = jax.tree.map(lambda _: P(), abstract["loss_scale"])
    shardings = sharding.named_shardings(mesh, specs)
    with_sharding = lambda tree, sh: jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh)
    if not (lora or reference):
        return StateLayout(with_sharding(abstract, shardings), shardings)
    base_shardings = sharding.named_shardings(mesh, base_specs)
    frozen_shardings = base_shardings
    if lora and lora.quantize_base:
        stored = jax.eval_shape(lambda p: lora_lib.quantize_int8(p, lora), base_params)
        frozen_shardings = sharding.named_shardings(
            mesh, fit(lora_lib.quantized_specs(base_specs, lora, base_params), stored))
    return StateLayout(with_sharding(abstract, shardings), shardings, lora,
                       with_sharding(base_params, base_shardings), frozen_shardings)


def init_frozen(model: Model, layout: StateLayout, seed: int):
    """Random frozen params when no ``init_from`` is given (tests, smoke runs), created sharded.

    They equal the random policy init of the same seed, so a DPO reference made this way is the policy at step 0.
    """
    shardings = jax.tree.map(lambda a: a.sharding, layout.frozen_abstract)
    return _run_once(lambda rng: model.init(jax.random.split(rng)[0]), shardings, jax.random.key(seed))


def init_state(model: Model, tx: optax.GradientTransformation, layout: StateLayout, seed: int,
               params=None) -> TrainState:
    """Creates the state directly with its shardings (no full copy on one device).

    ``params`` (already sharded, e.g. from ``init_from``) replaces the random init. Under LoRA the
    state's params are fresh adapters (the base is passed to the step separately).
    """
    def init(rng, params):
        param_rng, dropout_rng = jax.random.split(rng)
        if layout.lora:
            params = lora_lib.init_lora(param_rng, model.abstract_params(), layout.lora)
        elif params is None:
            params = model.init(param_rng)
        state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params),
                 "rng": jax.random.key_data(dropout_rng)}
        if uses_loss_scale(model):
            state["loss_scale"] = loss_scale.init()
        return state

    return _run_once(init, layout.shardings, jax.random.key(seed), params)


def _run_once(fn, out_shardings, *args):
    """``jax.jit(fn, out_shardings=...)(*args)`` for a program that runs once (initialisation). On CPU it is
    compiled at XLA's lowest backend optimisation level: the random init of a small model then compiles
    in ~0.9 s instead of ~3.5 s and runs in ~90 ms instead of ~20 ms."""
    jitted = jax.jit(fn, out_shardings=out_shardings)
    if jax.default_backend() != "cpu":
        return jitted(*args)
    return jitted.lower(*args).compile(compiler_options={"xla_backend_optimization_level": 0})(*args)


def uses_loss_scale(model: Model) -> bool:
    """float16 compute needs dynamic loss scaling; bfloat16 and float32 do not."""
    return model.cfg.compute_dtype == "float16"


def _split_micro_batches(batch, num: int):
    """[B, ...] -> [num, B/num, ...], taking rows i, i+num, ... so each micro-batch spans all shards."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // num, num, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(objective: Objective, tx: optax.GradientTransformation, layout: StateLayout,
                    mesh: Mesh, rules, *, grad_accum: int = 1, steps_per_call: int = 1):
    """``step(state, batch, frozen) -> (state, metrics)`` with explicit shardings; ``state`` is donated.

    ``frozen`` is the LoRA base or the DPO reference (not trained, not donated), or None. The loss
    and every ``<name>_sum`` metric are divided by ``loss_normalizer`` of the whole batch and
    reported as ``<name>``.

    ``steps_per_call > 1``: the step takes a stack of batches ``[n, batch, ...]`` (any n) and runs
    one train step per batch in a ``lax.scan``; every metric comes back as ``[n]``, one per step.
    """

    def local_sums(params, batch, frozen, rng, scale):
        """Summed loss gradients and ``*_sum`` metrics of ``batch`` (all of it, or one shard's rows)."""

        def scaled_objective(params, batch, rng):
            model_params = layout.model_params(params, frozen, jax.random.fold_in(rng, _LORA_DROPOUT_STREAM))
            loss, metrics = objective(model_params, batch, rng, layout.reference_params(frozen))
            return (loss if scale is None else loss_scale.scale_loss(loss, scale)), metrics

        grad_fn = jax.value_and_grad(scaled_objective, has_aux=True)
        if grad_accum == 1:
            (_, metrics), grads = grad_fn(params, batch, rng)
            return grads, metrics
        micro_batches = _split_micro_batches(batch, grad_accum)

        def accumulate(carry, index):
            micro = jax.tree.map(lambda x: x[index], micro_batches)
            out = grad_fn(params, micro, jax.random.fold_in(rng, index))
            return jax.tree.map(jnp.add, carry, out), None

        shapes = jax.eval_shape(lambda: grad_fn(params, jax.tree.map(lambda x: x[0], micro_batches), rng))
        zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
        ((_, metrics), grads), _ = jax.lax.scan(accumulate, zeros, jnp.arange(grad_accum))
        return grads, dict(metrics, last_layer_act_norm=metrics["last_layer_act_norm"] / grad_accum)

    batch_spec = sharding.batch_spec(rules)
    if flat_grad_all_reduce(layout, mesh):
        local_sums = _with_flat_all_reduce(local_sums, mesh, batch_spec)

    def train_step(state: TrainState, batch, frozen):
        params = state["params"]
        rng = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        normalizer = loss_normalizer(batch)
        scale = state.get("loss_scale")
        grads, metrics = local_sums(params, batch, frozen, rng, scale)
        grads = jax.tree.map(lambda g: g / normalizer, grads)
        if scale is not None:
            grads, finite = loss_scale.unscale_grads(grads, scale)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state, "rng": state["rng"]}
        if scale is not None:  # an overflowing step changes nothing but the (lowered) loss scale
            for key in ("params", "opt_state"):
                new_state[key] = jax.tree.map(lambda new, old: jnp.where(finite, new, old), new_state[key],
                                              state[key])
            new_state["loss_scale"] = loss_scale.update(scale, finite)
        out = {
            **_means(metrics, normalizer),
            "grad_norm": optax.tree.norm(grads),
            "lr": current_lr(opt_state),
            "num_tokens": metrics["num_tokens"],
            "last_layer_act_norm": metrics["last_layer_act_norm"],
        }
        if scale is not None:
            out["loss_scale"] = new_state["loss_scale"]["scale"]
        return new_state, out

    def train_steps(state: TrainState, batches, frozen):
        return jax.lax.scan(lambda s, batch: train_step(s, batch, frozen), state, batches)

    step_fn = train_step
    if steps_per_call > 1:
        step_fn, batch_spec = train_steps, P(None, *batch_spec)
    return jax.jit(step_fn, in_shardings=(layout.shardings, NamedSharding(mesh, batch_spec), layout.frozen_shardings),
                   out_shardings=(layout.shardings, NamedSharding(mesh, P())), donate_argnums=0)


def flat_grad_all_reduce(layout: StateLayout, mesh: Mesh) -> bool:
    """Whether the step sums gradients with one all-reduce of one flat buffer: pure data parallelism on CPU.

    XLA:CPU runs an all-reduce one operand at a time, each with its own rendezvous of the devices, so
    the ~70 gradient leaves of even a tiny model cost ~9 ms a step on two devices; one raveled buffer
    costs well under 1 ms (PyTorch DDP buckets its gradients for the same reason). On GPUs and TPUs
    XLA's own combined, asynchronous all-reduce is better, and with fsdp or tensor sharding the
    gradients are not replicated, so those keep the partitioner's collectives.
    """
    replicated = all(s.is_fully_replicated for s in jax.tree.leaves((layout.shardings, layout.frozen_shardings)))
    return mesh.size > 1 and replicated and mesh.devices.flat[0].platform == "cpu"


def _with_flat_all_reduce(local_sums, mesh: Mesh, batch_spec: P):
    """``local_sums`` run per device on its rows of the batch, then summed over devices in one flat all-reduce.

    Each device folds its index into the dropout key, so its rows get their own masks.
    """
    axes = tuple(mesh.axis_names)

    def per_device(params, batch, frozen, rng, scale):
        grads, metrics = local_sums(params, batch, frozen, jax.random.fold_in(rng, jax.lax.axis_index(axes)), scale)
        flat, unravel = ravel_pytree((grads, metrics))
        grads, metrics = unravel(jax.lax.psum(flat, axes))
        # the activation norm is a per-device mean over equal-size shards: the mean of means is the global mean
        return grads, dict(metrics, last_layer_act_norm=metrics["last_layer_act_norm"] / mesh.size)

    return jax.shard_map(per_device, mesh=mesh, in_specs=(P(), batch_spec, P(), P(), P()), out_specs=P(),
                         axis_names=set(axes), check_vma=False)


def _means(metrics: dict, normalizer: jax.Array) -> dict:
    """``<name>_sum`` metrics divided by the normalizer, as ``<name>``."""
    return {k.removesuffix("_sum"): v / normalizer for k, v in metrics.items() if k.endswith("_sum")}


def make_eval_step(objective: Objective, layout: StateLayout, mesh: Mesh, rules):
    """``eval_step(params, batch, frozen) -> {<name>_sum..., num_tokens}`` (no dropout): sums to add over batches."""

    def eval_step(params, batch, frozen):
        _, metrics = objective(layout.model_params(params, frozen), batch, None, layout.reference_params(frozen))
        return {k: v for k, v in metrics.items() if k.endswith("_sum") or k == "num_tokens"}

    batch_sharding = NamedSharding(mesh, sharding.batch_spec(rules))
    return jax.jit(eval_step, in_shardings=(layout.param_shardings, batch_sharding, layout.frozen_shardings),
                   out_shardings=NamedSharding(mesh, P()))
