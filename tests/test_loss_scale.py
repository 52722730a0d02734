"""Tests for maxlm.train.loss_scale (dynamic loss scaling for float16)."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from maxlm.train import loss_scale


def test_init_and_scale_loss():
    state = loss_scale.init(1024.0)
    assert state["scale"].dtype == jnp.float32 and state["good_steps"].dtype == jnp.int32
    assert loss_scale.scale_loss(jnp.float16(0.5), state) == 512.0


def test_unscale_recovers_gradients_and_flags_overflow():
    state = loss_scale.init(2.0**10)
    grads = {"w": jnp.array([2.0**10, -(2.0**11)], jnp.float16), "b": jnp.array(3.0 * 2**10, jnp.float32)}
    unscaled, finite = jax.jit(loss_scale.unscale_grads)(grads, state)
    assert bool(finite)
    chex.assert_trees_all_equal(unscaled, {"w": jnp.array([1.0, -2.0], jnp.float16), "b": jnp.float32(3.0)})
    for bad in (jnp.inf, jnp.nan):
        _, finite = loss_scale.unscale_grads({"w": jnp.array([1.0, bad], jnp.float16)}, state)
        assert not bool(finite)


def test_update_shrinks_on_overflow_and_grows_after_interval():
    update = jax.jit(loss_scale.update, static_argnames=("growth_interval", "factor", "min_scale"))
    state = loss_scale.init(8.0)
    for _ in range(2):
        state = update(state, jnp.array(True), growth_interval=3)
    assert (float(state["scale"]), int(state["good_steps"])) == (8.0, 2)
    state = update(state, jnp.array(True), growth_interval=3)
    assert (float(state["scale"]), int(state["good_steps"])) == (16.0, 0)
    state = update(state, jnp.array(True), growth_interval=3)
    state = update(state, jnp.array(False), growth_interval=3)
    assert (float(state["scale"]), int(state["good_steps"])) == (8.0, 0)
    for _ in range(5):
        state = update(state, jnp.array(False), growth_interval=3, min_scale=2.0)
    assert float(state["scale"]) == 2.0  # the floor


def _fp16_step(params, opt_state, ls, x, tx):
    """A float16 train step with dynamic loss scaling and optax.apply_if_finite."""

    def loss_fn(p):
        return jnp.sum(p["w"].astype(jnp.float16) * x * x)  # gradients x*x = 1e-8 underflow in fp16

    grads = jax.grad(lambda p: loss_scale.scale_loss(loss_fn(p), ls))(params)
    grads, finite = loss_scale.unscale_grads(grads, ls)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss_scale.update(ls, finite), grads


def test_float16_step_recovers_tiny_gradients_and_skips_overflow():
    x = jnp.full((4,), 1e-4, jnp.float16)
    params = {"w": jnp.ones((4,), jnp.float32)}
    tx = optax.apply_if_finite(optax.sgd(1e6), max_consecutive_errors=5)
    step = jax.jit(_fp16_step, static_argnums=4)

    # Unscaled, the float16 gradient underflows to zero.
    assert float(jax.grad(lambda p: jnp.sum(p["w"].astype(jnp.float16) * x * x))(params)["w"][0]) == 0.0

    new_params, opt_state, ls, grads = step(params, tx.init(params), loss_scale.init(2.0**15), x, tx)
    np.testing.assert_allclose(grads["w"], 1e-8, rtol=1e-2)
    assert float(ls["scale"]) == 2.0**15 and not np.array_equal(new_params["w"], params["w"])

    # A scale so large that the float16 gradient overflows: the update is skipped, the scale halves.
    huge = {"scale": jnp.float32(2.0**60), "good_steps": jnp.int32(7)}
    same_params, _, ls, _ = step(new_params, opt_state, huge, x, tx)
    np.testing.assert_array_equal(same_params["w"], new_params["w"])
    assert float(ls["scale"]) == 2.0**59 and int(ls["good_steps"]) == 0
