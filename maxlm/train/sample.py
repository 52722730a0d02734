"""A short text sample at the end of training: a window sliding over the text, recomputed each token.

Unlike ``maxlm.generate`` (KV cache, bounded by ``max_seq_len``), the sliding window lets a
64-token learned-position model write 200 characters; both share the ``Sampler``.
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

    @jax.jit
    def next_token(params, tokens, length, rng):
        positions = jnp.arange(window)[None]
        segments = (positions < length).astype(jnp.int32)
        logits, _ = model.apply(params, tokens, positions, segments)
        return sampler(logits[:, length - 1], rng)[0]

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
