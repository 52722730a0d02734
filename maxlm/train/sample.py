"""A short text sample at the end of training: a window sliding over the text, recomputed each token.

Unlike ``maxlm.generate`` (KV cache, bounded by ``max_seq_len``), the sliding window lets a
64-token learned-position model write 200 characters; both share the ``Sampler``. The whole loop
is one jitted ``fori_loop``: one dispatch, not one per token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from maxlm.generate import Sampler
from maxlm.models import Model


def sample_text(model: Model, params, tokenizer, sample_cfg, *, seed: int, window: int | None = None) -> str:
    """Samples ``sample_cfg.num_tokens`` tokens after ``sample_cfg.prompt`` (temperature, optional top-k)."""
    window = window or model.cfg.max_seq_len
    sampler = Sampler(temperature=float(sample_cfg.temperature), top_k=int(sample_cfg.top_k))
    prompt = list(tokenizer.encode(sample_cfg.prompt))
    ids = prompt or [tokenizer.eos_id]
    num_tokens = int(sample_cfg.num_tokens)
    buffer = np.zeros(max(len(ids) + num_tokens, window), np.int32)  # every window slice fits inside
    buffer[: len(ids)] = ids

    @jax.jit
    def generate(params, tokens):
        def add_token(i, tokens):
            end = len(ids) + i  # the new token's slot; it sees the (up to) ``window`` tokens before it
            start = jnp.maximum(end - window, 0)
            context = jax.lax.dynamic_slice(tokens, (start,), (window,))[None]
            length = end - start
            positions = jnp.arange(window)[None]
            logits, _ = model.apply(params, context, positions, (positions < length).astype(jnp.int32))
            token = sampler(logits[:, length - 1], jax.random.fold_in(jax.random.key(seed), i))[0]
            return tokens.at[end].set(token)

        return jax.lax.fori_loop(0, num_tokens, add_token, tokens)

    tokens = generate(params, buffer)
    new = np.asarray(tokens)[len(ids): len(ids) + num_tokens].tolist()
    return tokenizer.decode(new) if prompt else tokenizer.decode(ids + new)
