"""A short text sample at the end of training (full-window recompute, no KV cache).

This is the end-of-run sanity check of the main job; the generation module
with a KV cache, beam search and logits processors is issue 9's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from maxlm.models import Model


def sample_text(model: Model, params, tokenizer, sample_cfg, *, seed: int, window: int | None = None) -> str:
    """Samples ``sample_cfg.num_tokens`` tokens after ``sample_cfg.prompt`` (temperature, optional top-k)."""
    window = window or model.cfg.max_seq_len
    temperature, top_k = float(sample_cfg.temperature), int(sample_cfg.top_k)

    @jax.jit
    def next_token(params, tokens, length, rng):
        positions = jnp.arange(window)[None]
        segments = (positions < length).astype(jnp.int32)
        logits, _ = model.apply(params, tokens, positions, segments)
        logits = logits[0, length - 1]
        if temperature == 0.0:
            return jnp.argmax(logits)
        logits = logits / temperature
        if top_k:
            kth = jax.lax.top_k(logits, top_k)[0][-1]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(rng, logits)

    ids = list(tokenizer.encode(sample_cfg.prompt)) or [tokenizer.eos_id]
    rng = jax.random.key(seed)
    prompt_len = len(ids)
    for i in range(int(sample_cfg.num_tokens)):
        context = ids[-window:]
        buffer = np.zeros((1, window), np.int32)
        buffer[0, : len(context)] = context
        token = next_token(params, buffer, len(context), jax.random.fold_in(rng, i))
        ids.append(int(token))
    return tokenizer.decode(ids[prompt_len:]) if prompt_len else tokenizer.decode(ids)
