"""One decoder-only transformer whose variants (Llama, OPT, GPT-2 ...) come from config.

Parameters carry logical axis names (see ``maxlm/sharding.py``). The layers are
stored stacked along a leading ``layers`` axis, so scanning over them or
unrolling them uses the same parameters, and checkpoints do not depend on it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from maxlm import sharding
from maxlm.models.attention import attention, attention_mask, xla_attention
from maxlm.models.lora import project
from maxlm.models.norm import normalize
from maxlm.sharding import Rules

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The resolved model shape and variant (no 0 = 'default' sentinels left)."""

    vocab_size: int
    d_model: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    d_ff: int
    max_seq_len: int = 1024
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"
    position: str = "rope"
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none | linear | llama3 (Llama-3.1's frequency-dependent scaling)
    rope_factor: float = 1.0
    rope_low_freq_factor: float = 1.0  # llama3 only
    rope_high_freq_factor: float = 4.0  # llama3 only
    rope_original_max_len: int = 8192  # llama3 only: the pretraining context
    position_offset: int = 0
    mlp: str = "swiglu"
    use_bias: bool = False
    qkv_bias: bool = False  # biases on q/k/v only (Qwen2); use_bias puts them everywhere
    embed_dim: int = 0  # token embedding width when not d_model, with in/out projections (OPT-350m)
    tie_embeddings: bool = False
    dropout: float = 0.0
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    init_std: float = 0.02
    scale_residual_init: bool = True
    attention: str = "auto"
    sliding_window: int = 0
    remat: str = "none"
    scan_layers: bool = True
    value_head: bool = False

    @classmethod
    def from_config(cls, model_cfg, vocab_size: int | None = None) -> "ModelConfig":
        c = dict(model_cfg)
        c["vocab_size"] = c["vocab_size"] or vocab_size or 0
        if not c["vocab_size"]:
            raise ValueError("model.vocab_size is 0 and no tokenizer gave one")
        c["num_kv_heads"] = c["num_kv_heads"] or c["num_heads"]
        c["head_dim"] = c["head_dim"] or c["d_model"] // c["num_heads"]
        c["d_ff"] = c["d_ff"] or 4 * c["d_model"]
        c["embed_dim"] = c.get("embed_dim") or c["d_model"]
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in c.items() if k in names})

    @property
    def dtype(self):
        return DTYPES[self.compute_dtype]

    @property
    def embed_width(self) -> int:
        return self.embed_dim or self.d_model

    @property
    def projects_embeddings(self) -> bool:
        return self.embed_width != self.d_model

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count (used for MFU's 6N)."""
        d, h, k, hd, f = self.d_model, self.num_heads, self.num_kv_heads, self.head_dim, self.d_ff
        attn = d * hd * (h + 2 * k) + h * hd * d + (hd * (h + 2 * k) if self.use_bias or self.qkv_bias else 0)
        attn += d if self.use_bias else 0
        mlp = (3 if self.mlp == "swiglu" else 2) * d * f + ((f + d) if self.use_bias else 0)
        norm = (2 if self.norm == "layernorm" else 1) * d
        total = self.num_layers * (attn + mlp + 2 * norm) + (norm if self.norm_position == "pre" else 0)
        total += 2 * d * self.embed_width if self.projects_embeddings else 0
        total += d if self.value_head else 0
        if include_embeddings:
            total += self.vocab_size * self.embed_width * (1 if self.tie_embeddings else 2)
            total += (self.max_seq_len + self.position_offset) * d if self.position == "learned" else 0
        return total


def _param(rngs: nnx.Rngs, shape, names, std: float, dtype) -> nnx.Param:
    init = jax.nn.initializers.normal(std) if std else jax.nn.initializers.zeros
    return nnx.Param(init(rngs.params(), shape, DTYPES[dtype]), out_sharding=names)


def _ones(shape, names, dtype) -> nnx.Param:
    return nnx.Param(jnp.ones(shape, DTYPES[dtype]), out_sharding=names)


class Norm(nnx.Module):
    """RMSNorm or LayerNorm over the last axis, computed in float32."""

    def __init__(self, cfg: ModelConfig):
        self.kind, self.eps = cfg.norm, cfg.norm_eps
        self.scale = _ones((cfg.d_model,), ("norm",), cfg.param_dtype)
        if cfg.norm == "layernorm":
            self.bias = nnx.Param(jnp.zeros((cfg.d_model,), DTYPES[cfg.param_dtype]), out_sharding=("norm",))

    def __call__(self, x):
        bias = self.bias[...] if self.kind == "layernorm" else None
        return normalize(x, self.scale[...], bias, self.eps, self.kind == "layernorm")


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    """The ``head_dim // 2`` rotary inverse frequencies, with ``cfg.rope_scaling`` applied (float32)."""
    half = cfg.head_dim // 2
    freqs = 1.0 / cfg.rope_theta ** (np.arange(half, dtype=np.float32) / np.float32(half))
    if cfg.rope_scaling == "linear":
        return (freqs / cfg.rope_factor).astype(np.float32)
    if cfg.rope_scaling == "llama3":  # long wavelengths divided by the factor, medium ones interpolated
        low, high, context = cfg.rope_low_freq_factor, cfg.rope_high_freq_factor, cfg.rope_original_max_len
        wavelen = 2 * math.pi / freqs
        scaled = np.where(wavelen > context / low, freqs / cfg.rope_factor, freqs)
        smooth = (context / wavelen - low) / (high - low)
        medium = (wavelen >= context / high) & (wavelen <= context / low)
        return np.where(medium, (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled, scaled).astype(np.float32)
    return freqs.astype(np.float32)


def rope(x, positions, freqs):
    """Rotary embedding, rotate-half convention (as in HF Llama); positions in float32."""
    half = x.shape[-1] // 2
    angles = positions.astype(jnp.float32)[..., None] * freqs  # [b, t, half]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
    x1, x2 = x[..., :half].astype(jnp.float32), x[..., half:].astype(jnp.float32)
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], -1).astype(x.dtype)


def _dropout(x, rate: float, rng):
    if not rate or rng is None:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rules: Rules, rngs: nnx.Rngs):
        self.cfg, self.rules = cfg, rules
        d, h, k, hd, p = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.param_dtype
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if cfg.scale_residual_init else cfg.init_std
        self.wq = _param(rngs, (d, h, hd), ("embed", "heads", "head_dim"), cfg.init_std, p)
        self.wk = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), cfg.init_std, p)
        self.wv = _param(rngs, (d, k, hd), ("embed", "kv_heads", "head_dim"), cfg.init_std, p)
        self.wo = _param(rngs, (h, hd, d), ("heads", "head_dim", "embed"), out_std, p)
        if cfg.use_bias or cfg.qkv_bias:
            self.bq = _param(rngs, (h, hd), ("heads", "head_dim"), 0.0, p)
            self.bk = _param(rngs, (k, hd), ("kv_heads", "head_dim"), 0.0, p)
            self.bv = _param(rngs, (k, hd), ("kv_heads", "head_dim"), 0.0, p)
        if cfg.use_bias:
            self.bo = _param(rngs, (d,), ("embed",), 0.0, p)

    def _qkv(self, x, positions):
        cfg, dt = self.cfg, self.cfg.dtype
        q = project("btd,dhk->bthk", x, self.wq[...].astype(dt))
        k = project("btd,dhk->bthk", x, self.wk[...].astype(dt))
        v = project("btd,dhk->bthk", x, self.wv[...].astype(dt))
        if cfg.use_bias or cfg.qkv_bias:
            q, k, v = q + self.bq[...].astype(dt), k + self.bk[...].astype(dt), v + self.bv[...].astype(dt)
        if cfg.position == "rope":
            freqs = rope_frequencies(cfg)
            q, k = rope(q, positions, freqs), rope(k, positions, freqs)
        return q, k, v

    def _out(self, out):
        dt = self.cfg.dtype
        out = project("bthk,hkd->btd", out, self.wo[...].astype(dt))
        return out + self.bo[...].astype(dt) if self.cfg.use_bias else out

    def __call__(self, x, positions, segment_ids):
        cfg = self.cfg
        q, k, v = self._qkv(x, positions)
        heads = ("activation_batch", "activation_length", "activation_heads", None)
        q = sharding.constrain(q, heads, self.rules)
        out = attention(q, k, v, segment_ids=segment_ids, positions=positions, impl=cfg.attention,
                        sliding_window=cfg.sliding_window, rules=self.rules)
        return self._out(out)

    def decode(self, x, positions, cache_k, cache_v, layer, index, kv_positions, kv_valid):
        """Writes this chunk's K/V into layer ``layer`` of the cache at slot ``index``, attends over it.

        ``cache_k``/``cache_v`` are the whole stacked cache ``[layers, batch, max_len, kv_heads,
        head_dim]`` (updated in place, only the chunk is written); ``kv_positions`` and ``kv_valid``
        ``[batch, max_len]`` describe every slot (already including this chunk). A key is seen when
        it is valid, not after the query's position, and inside the sliding window.
        """
        q, k, v = self._qkv(x, positions)
        start = (layer, 0, index, 0, 0)
        cache_k = jax.lax.dynamic_update_slice(cache_k, k[None].astype(cache_k.dtype), start)
        cache_v = jax.lax.dynamic_update_slice(cache_v, v[None].astype(cache_v.dtype), start)
        keys = jax.lax.dynamic_index_in_dim(cache_k, layer, keepdims=False).astype(q.dtype)
        values = jax.lax.dynamic_index_in_dim(cache_v, layer, keepdims=False).astype(q.dtype)
        mask = attention_mask(jnp.ones_like(positions), kv_valid.astype(positions.dtype), positions,
                              kv_positions, causal=True, sliding_window=self.cfg.sliding_window)
        out = xla_attention(q, keys, values, mask, scale=q.shape[-1] ** -0.5)
        return self._out(out), cache_k, cache_v


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rules: Rules, rngs: nnx.Rngs):
        self.cfg, self.rules = cfg, rules
        d, f, p = cfg.d_model, cfg.d_ff, cfg.param_dtype
        out_std = cfg.init_std / math.sqrt(2 * cfg.num_layers) if cfg.scale_residual_init else cfg.init_std
        if cfg.mlp == "swiglu":
            self.w_gate = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, p)
        self.w_up = _param(rngs, (d, f), ("embed", "mlp"), cfg.init_std, p)
        self.w_down = _param(rngs, (f, d), ("mlp", "embed"), out_std, p)
        if cfg.use_bias:
            self.b_up = _param(rngs, (f,), ("mlp",), 0.0, p)
            self.b_down = _param(rngs, (d,), ("embed",), 0.0, p)

    def __call__(self, x):
        cfg, dt = self.cfg, self.cfg.dtype
        h = project("btd,df->btf", x, self.w_up[...].astype(dt))
        if cfg.use_bias:
            h = h + self.b_up[...].astype(dt)
        if cfg.mlp == "swiglu":
            h = jax.nn.silu(project("btd,df->btf", x, self.w_gate[...].astype(dt))) * h
        elif cfg.mlp == "gelu":
            h = jax.nn.gelu(h, approximate=True)
        else:
            h = jax.nn.relu(h)
        h = sharding.constrain(h, ("activation_batch", "activation_length", "activation_mlp"), self.rules)
        out = project("btf,fd->btd", h, self.w_down[...].astype(dt))
        return out + self.b_down[...].astype(dt) if cfg.use_bias else out


class Block(nnx.Module):
    """One residual block; pre-norm (Llama, GPT-2, most OPT) or post-norm (OPT-350m)."""

    def __init__(self, cfg: ModelConfig, rules: Rules, rngs: nnx.Rngs):
        self.cfg = cfg
        self.attn_norm, self.mlp_norm = Norm(cfg), Norm(cfg)
        self.attn, self.mlp = Attention(cfg, rules, rngs), MLP(cfg, rules, rngs)

    def __call__(self, x, positions, segment_ids, dropout_rng=None):
        rate = self.cfg.dropout
        rngs = jax.random.split(dropout_rng, 2) if dropout_rng is not None else (None, None)
        if self.cfg.norm_position == "pre":
            x = x + _dropout(self.attn(self.attn_norm(x), positions, segment_ids), rate, rngs[0])
            return x + _dropout(self.mlp(self.mlp_norm(x)), rate, rngs[1])
        x = self.attn_norm(x + _dropout(self.attn(x, positions, segment_ids), rate, rngs[0]))
        return self.mlp_norm(x + _dropout(self.mlp(x), rate, rngs[1]))

    def decode(self, x, positions, cache_k, cache_v, layer, index, kv_positions, kv_valid):
        """The block over a cached chunk (no dropout); returns ``(y, cache_k, cache_v)``."""
        cached = (layer, index, kv_positions, kv_valid)
        if self.cfg.norm_position == "pre":
            a, cache_k, cache_v = self.attn.decode(self.attn_norm(x), positions, cache_k, cache_v, *cached)
            x = x + a
            return x + self.mlp(self.mlp_norm(x)), cache_k, cache_v
        a, cache_k, cache_v = self.attn.decode(x, positions, cache_k, cache_v, *cached)
        x = self.attn_norm(x + a)
        return self.mlp_norm(x + self.mlp(x)), cache_k, cache_v


class Transformer(nnx.Module):
    """Token (+ position) embedding, ``num_layers`` blocks, final norm, LM head."""

    def __init__(self, cfg: ModelConfig, rules: Rules = sharding.DEFAULT_RULES, *, rngs: nnx.Rngs):
        self.cfg, self.rules = cfg, rules
        p = cfg.param_dtype
        self.embed = _param(rngs, (cfg.vocab_size, cfg.embed_width), ("vocab", "embed"), cfg.init_std, p)
        if cfg.projects_embeddings:  # embed_dim <-> d_model, around the blocks
            self.w_proj_in = _param(rngs, (cfg.embed_width, cfg.d_model), (None, "embed"), cfg.init_std, p)
            self.w_proj_out = _param(rngs, (cfg.d_model, cfg.embed_width), ("embed", None), cfg.init_std, p)
        if cfg.position == "learned":
            self.pos_embed = _param(rngs, (cfg.max_seq_len + cfg.position_offset, cfg.d_model),
                                    (None, "embed"), cfg.init_std, p)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, axis_size=cfg.num_layers,
                  transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> Block:
            return Block(cfg, rules, rngs)

        self.blocks = make_blocks(rngs)
        if cfg.norm_position == "pre":
            self.final_norm = Norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = _param(rngs, (cfg.embed_width, cfg.vocab_size), ("embed", "vocab"), cfg.init_std, p)
        if cfg.value_head:  # a scalar per position (reward models): aux["values"]
            self.value_head = _param(rngs, (cfg.d_model,), ("embed",), cfg.init_std, p)

    def __call__(self, tokens, positions, segment_ids, dropout_rng=None):
        """Returns float32 logits ``[batch, len, vocab]`` and the last block's output norm."""
        cfg = self.cfg
        act = ("activation_batch", "activation_length", "activation_embed")
        x = self._embed(tokens, positions)
        x = _dropout(x, cfg.dropout, dropout_rng)
        x = sharding.constrain(x, act, self.rules)
        x = self._run_blocks(x, positions, segment_ids, dropout_rng)
        aux = {"last_layer_act_norm": jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), -1)).mean()}
        if cfg.norm_position == "pre":
            x = self.final_norm(x)
        if cfg.value_head:
            aux["values"] = jnp.einsum("btd,d->bt", x, self.value_head[...].astype(x.dtype),
                                       preferred_element_type=jnp.float32)
        logits = sharding.constrain(self._head(x), ("activation_batch", "activation_length", "activation_vocab"),
                                    self.rules)
        return logits, aux

    def _embed(self, tokens, positions):
        cfg, dt = self.cfg, self.cfg.dtype
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
        if cfg.projects_embeddings:
            x = x @ self.w_proj_in[...].astype(dt)
        if cfg.position == "learned":
            x = x + jnp.take(self.pos_embed[...], positions + cfg.position_offset, axis=0).astype(dt)
        return x

    def _head(self, x):
        """LM head over the final (already normalised) hidden states."""
        cfg, dt = self.cfg, self.cfg.dtype
        if cfg.projects_embeddings:
            x = x @ self.w_proj_out[...].astype(dt)
        head = self.embed[...].T if cfg.tie_embeddings else self.lm_head[...]
        return project("btd,dv->btv", x, head.astype(dt), preferred_element_type=jnp.float32)

    def decode(self, tokens, positions, valid, cache, index):
        """Runs a chunk ``tokens [batch, t]`` against a KV cache (see ``init_cache``).

        The chunk is written at cache slots ``[index, index + t)`` (the same slots for every row), with
        its ``positions`` and ``valid`` mask (False for padding). Returns float32 logits
        ``[batch, t, vocab]`` and the updated cache. Prefill is a chunk of the whole prompt at index 0,
        a decode step a chunk of one token.
        """
        x = self._embed(tokens, positions)
        kv_positions = jax.lax.dynamic_update_slice(cache["pos"], positions.astype(jnp.int32), (0, index))
        kv_valid = jax.lax.dynamic_update_slice(cache["valid"], valid.astype(jnp.bool_), (0, index))

        def step(carry, block, i):
            x, k, v = carry
            return block.decode(x, positions, k, v, i, index, kv_positions, kv_valid)

        # the whole cache is carried and written in place
        x, k, v = self._over_layers(step, (x, cache["k"], cache["v"]))
        if self.cfg.norm_position == "pre":
            x = self.final_norm(x)
        return self._head(x), {"k": k, "v": v, "pos": kv_positions, "valid": kv_valid}

    def _run_blocks(self, x, positions, segment_ids, dropout_rng):
        act = ("activation_batch", "activation_length", "activation_embed")

        def step(x, block, index):
            rng = jax.random.fold_in(dropout_rng, index) if dropout_rng is not None else None
            return sharding.constrain(block(x, positions, segment_ids, rng), act, self.rules)

        return self._over_layers(step, x, remat=self.cfg.remat)

    def _over_layers(self, step, carry, remat: str = "none"):
        """``carry = step(carry, block, layer_index)`` over the stacked layers, scanned or unrolled."""
        graphdef, stacked = nnx.split(self.blocks)

        def body(carry, layer):
            params, index = layer
            return step(carry, nnx.merge(graphdef, params), index), None

        if remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[remat], prevent_cse=not self.cfg.scan_layers)
        indices = jnp.arange(self.cfg.num_layers)
        if self.cfg.scan_layers:
            return jax.lax.scan(body, carry, (stacked, indices))[0]
        for i, layer in enumerate(unstack_layers(stacked, self.cfg.num_layers)):
            carry, _ = body(carry, (layer, indices[i]))
        return carry


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def unstack_layers(stacked, num_layers: int) -> tuple:
    """The ``num_layers`` per-layer slices of stacked ``[layers, ...]`` weights (the unrolled loop).

    Its backward pass stacks the per-layer gradients in one copy. Autodiff of ``a[i]`` would pad each
    layer's gradient to the whole stack and add the pads up: ~7% of a small model's CPU train step.
    """
    return tuple(jax.tree.map(lambda a: a[i], stacked) for i in range(num_layers))


def _unstack_forward(stacked, num_layers):
    return unstack_layers(stacked, num_layers), None


def _unstack_backward(_num_layers, _, layer_grads):
    return (jax.tree.map(lambda *g: jnp.stack(g), *layer_grads),)


unstack_layers.defvjp(_unstack_forward, _unstack_backward)


def init_cache(cfg: ModelConfig, batch: int, max_len: int) -> dict:
    """An empty KV cache: ``k``/``v`` ``[layers, batch, max_len, kv_heads, head_dim]`` (compute dtype,
    only the kv heads under GQA/MQA), each slot's ``pos`` ``[batch, max_len]`` and ``valid`` mask."""
    shape = (cfg.num_layers, batch, max_len, cfg.num_kv_heads, cfg.head_dim)
    return {"k": jnp.zeros(shape, cfg.dtype), "v": jnp.zeros(shape, cfg.dtype),
            "pos": jnp.zeros((batch, max_len), jnp.int32), "valid": jnp.zeros((batch, max_len), jnp.bool_)}
