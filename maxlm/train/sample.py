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


class TextSampler:
    """Samples ``sample_cfg.num_tokens`` tokens after ``sample_cfg.prompt`` (temperature, optional top-k).

    ``compile(abstract_params)`` builds the program ahead of time (the training loop does it while the
    state initialises); ``sampler(params)`` then only runs it.
    """

    def __init__(self, model: Model, tokenizer, sample_cfg, *, seed: int, window: int | None = None):
        window = window or model.cfg.max_seq_len
        sampler = Sampler(temperature=float(sample_cfg.temperature), top_k=int(sample_cfg.top_k))
        prompt = list(tokenizer.encode(sample_cfg.prompt))
        self._tokenizer = tokenizer
        self._has_prompt = bool(prompt)
        self._ids = prompt or [tokenizer.eos_id]
        self._num_tokens = num_tokens = int(sample_cfg.num_tokens)
        prompt_len = len(self._ids)
        self._buffer = np.zeros(max(prompt_len + num_tokens, window), np.int32)  # every window slice fits inside
        self._buffer[:prompt_len] = self._ids

        @jax.jit
        def generate(params, tokens):
            def add_token(i, tokens):
                end = prompt_len + i  # the new token's slot; it sees the (up to) ``window`` tokens before it
                start = jnp.maximum(end - window, 0)
                context = jax.lax.dynamic_slice(tokens, (start,), (window,))[None]
                length = end - start
                positions = jnp.arange(window)[None]
                logits, _ = model.apply(params, context, positions, (positions < length).astype(jnp.int32))
                token = sampler(logits[:, length - 1], jax.random.fold_in(jax.random.key(seed), i))[0]
                return tokens.at[end].set(token)

            return jax.lax.fori_loop(0, num_tokens, add_token, tokens)

        self._generate = generate

    def compile(self, abstract_params) -> None:
        """Compiles for params of these shapes and shardings (``jax.ShapeDtypeStruct`` leaves)."""
        self._generate.lower(abstract_params, self._buffer).compile()

    def __call__(self, params) -> str:
        tokens = np.asarray(self._generate(params, self._buffer))
        new = tokens[len(self._ids): len(self._ids) + self._num_tokens].tolist()
        return self._tokenizer.decode(new) if self._has_prompt else self._tokenizer.decode(self._ids + new)


def sample_text(model: Model, params, tokenizer, sample_cfg, *, seed: int, window: int | None = None) -> str:
    """``TextSampler(...)(params)``: one sample, compiled on the spot."""
    return TextSampler(model, tokenizer, sample_cfg, seed=seed, window=window)(params)
