"""LoRA as a pure function over the params pytree: ``W + (alpha / rank) · A @ B`` for selected weights.

The base params stay frozen (an argument of the jitted step, never in the optimizer); only the
adapters ``{path: {'a', 'b'}}`` are trained and checkpointed. ``B`` starts at zero, so step 0 is the
base model exactly. Adapters carry the logical axes of the weight they adapt, so they shard like it.

Without dropout the adapters are folded into the weights (``merge``). With ``dropout`` > 0, training
runs each targeted weight as a ``LowRankUpdate``, ``x·W + scale · dropout(x)·A·B``, as in the LoRA
paper: the dropout masks the adapter branch's input only.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

Params = dict[str, Any]

# Number of leading "input" axes of each weight (after the stacked ``layers`` axis of block weights).
_INPUT_AXES = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1, "lm_head": 1}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int
    alpha: float
    targets: str  # regex over "/"-joined parameter paths, e.g. "attn/w[qkvo]|mlp/w_(gate|up|down)"
    quantize_base: bool = False  # QLoRA-style: the frozen targeted weights stored as int8 (see quantize_int8)
    dropout: float = 0.0  # on the adapter branch's input, in training

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @classmethod
    def from_config(cls, section) -> "LoraConfig":
        """From a config's ``lora`` section (keys that older saved configs lack take their defaults)."""
        return cls(section.rank, section.alpha, section.targets, section.get("quantize_base", False),
                   section.get("dropout", 0.0))


def _path(path) -> str:
    return "/".join(str(getattr(k, "key", k)) for k in path)


def _split(path: str) -> tuple[int, int]:
    """(index where the input axes start, index where the output axes start)."""
    name = path.rsplit("/", 1)[-1]
    if name not in _INPUT_AXES:
        raise ValueError(f"lora.targets matched {path!r}, which is not a weight matrix LoRA can adapt")
    start = 1 if path.startswith("blocks/") else 0
    return start, start + _INPUT_AXES[name]


def target_paths(params: Params, cfg: LoraConfig) -> list[str]:
    paths = [_path(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    chosen = [p for p in paths if re.search(cfg.targets, p)]
    if not chosen:
        raise ValueError(f"lora.targets={cfg.targets!r} matches no parameter; paths look like {paths[:4]}")
    return chosen


def _leaves_by_path(tree) -> dict[str, Any]:
    return {_path(p): x for p, x in jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, P))[0]}


def init_lora(rng: jax.Array, abstract_params: Params, cfg: LoraConfig) -> Params:
    """Adapters for every targeted weight: A ~ N(0, 1/fan_in), B = 0."""
    shapes = _leaves_by_path(abstract_params)
    adapters = {}
    for i, path in enumerate(target_paths(abstract_params, cfg)):
        shape = shapes[path].shape
        start, out = _split(path)
        fan_in = math.prod(shape[start:out])
        a = jax.random.normal(jax.random.fold_in(rng, i), (*shape[:out], cfg.rank), jnp.float32) / math.sqrt(fan_in)
        adapters[path] = {"a": a, "b": jnp.zeros((*shape[:start], cfg.rank, *shape[out:]), jnp.float32)}
    return adapters


def lora_specs(param_specs: Params, cfg: LoraConfig, abstract_params: Params) -> Params:
    """PartitionSpecs of the adapters: A shards like the weight's input axes, B like its output axes."""
    specs, shapes = _leaves_by_path(param_specs), _leaves_by_path(abstract_params)
    out = {}
    for path in target_paths(abstract_params, cfg):
        spec = tuple(specs[path]) + (None,) * (len(shapes[path].shape) - len(specs[path]))
        start, split = _split(path)
        out[path] = {"a": P(*spec[:split], None), "b": P(*spec[:start], None, *spec[split:])}
    return out


def delta(path: str, adapter: Params, shape, scale: float) -> jax.Array:
    """``scale · A @ B`` reshaped to the weight's shape."""
    start, split = _split(path)
    lead = math.prod(shape[:start])
    a = adapter["a"].reshape(lead, math.prod(shape[start:split]), -1)
    b = adapter["b"].reshape(lead, a.shape[-1], math.prod(shape[split:]))
    return (scale * (a @ b)).reshape(shape)


def merge(params: Params, adapters: Params, cfg: LoraConfig) -> Params:
    """Base params with the adapters folded in (also how the model runs under LoRA, and how it is exported)."""
    def fold(path, w):
        key = _path(path)
        return w + delta(key, adapters[key], w.shape, cfg.scale).astype(w.dtype) if key in adapters else w
    return jax.tree_util.tree_map_with_path(fold, params)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LowRankUpdate:
    """A frozen weight and its adapter kept apart, so the adapter branch can have dropout.

    The model reads it like a weight (``param[...]``, ``.astype``) and contracts it with
    ``project``. ``rng`` is raw key data with the weight's leading ``layers`` axis, so slicing a
    layer out of the stacked blocks gives each layer its own mask.
    """

    base: jax.Array
    a: jax.Array  # [*input axes, rank]
    b: jax.Array  # [rank, *output axes]
    rng: jax.Array
    scale: float = dataclasses.field(metadata=dict(static=True))
    rate: float = dataclasses.field(metadata=dict(static=True))

    def __getitem__(self, index):
        if index is not Ellipsis:
            raise TypeError("a LowRankUpdate is read whole, as param[...]")
        return self

    def astype(self, dtype) -> "LowRankUpdate":
        return dataclasses.replace(self, base=self.base.astype(dtype), a=self.a.astype(dtype), b=self.b.astype(dtype))

    def project(self, equation: str, x: jax.Array, **einsum_kwargs) -> jax.Array:
        """``einsum(equation, x, W) + scale · einsum(equation, dropout(x), A·B)``, without forming A·B."""
        inputs, out = equation.split("->")
        x_axes, w_axes = inputs.split(",")
        contracted = "".join(c for c in w_axes if c in x_axes)
        kept = "".join(c for c in w_axes if c not in x_axes)
        rows = "".join(c for c in x_axes if c not in w_axes)
        keep = jax.random.bernoulli(jax.random.wrap_key_data(self.rng), 1.0 - self.rate, x.shape)
        dropped = jnp.where(keep, x / (1.0 - self.rate), 0).astype(x.dtype)
        hidden = jnp.einsum(f"{x_axes},{contracted}z->{rows}z", dropped, self.a)
        low_rank = jnp.einsum(f"{rows}z,z{kept}->{out}", hidden, self.b, **einsum_kwargs)
        return jnp.einsum(equation, x, self.base, **einsum_kwargs) + self.scale * low_rank


def project(equation: str, x: jax.Array, w, **einsum_kwargs) -> jax.Array:
    """``einsum(equation, x, w)`` for a weight (an array or a ``LowRankUpdate``), ``x`` first."""
    if isinstance(w, LowRankUpdate):
        return w.project(equation, x, **einsum_kwargs)
    return jnp.einsum(equation, x, w, **einsum_kwargs)


def with_dropout(params: Params, adapters: Params, cfg: LoraConfig, rng: jax.Array) -> Params:
    """The base params with every adapted weight as a ``LowRankUpdate`` (each with its own dropout keys)."""
    order = {path: i for i, path in enumerate(sorted(adapters))}

    def attach(path, w):
        key = _path(path)
        if key not in adapters:
            return w
        start, _ = _split(key)
        lead = w.shape[:start]
        keys = jax.random.split(jax.random.fold_in(rng, order[key]), math.prod(lead))
        return LowRankUpdate(w, adapters[key]["a"], adapters[key]["b"],
                             jax.random.key_data(keys).reshape(*lead, -1), cfg.scale, cfg.dropout)

    return jax.tree_util.tree_map_with_path(attach, params)


def _is_quantized(x) -> bool:
    return isinstance(x, dict) and set(x) == {"int8", "scale"}


def quantize_int8(params: Params, cfg: LoraConfig) -> Params:
    """The targeted weights as ``{"int8", "scale"}``: symmetric int8 with one float32 scale per output
    channel (the max |w| over the input axes / 127); every other param stays as it is."""
    targets = set(target_paths(params, cfg))

    def quantize(path, w):
        key = _path(path)
        if key not in targets:
            return w
        start, split = _split(key)
        w = w.astype(jnp.float32)
        scale = jnp.max(jnp.abs(w), axis=tuple(range(start, split)), keepdims=True) / 127.0
        scale = jnp.where(scale > 0, scale, 1.0)
        return {"int8": jnp.round(w / scale).astype(jnp.int8), "scale": scale}

    return jax.tree_util.tree_map_with_path(quantize, params)


def dequantize(params: Params, dtype=jnp.float32) -> Params:
    """``quantize_int8``'s params back in ``dtype`` (params that are not quantized pass through)."""
    return jax.tree.map(lambda x: (x["int8"].astype(jnp.float32) * x["scale"]).astype(dtype) if _is_quantized(x) else x,
                        params, is_leaf=_is_quantized)


def quantized_specs(param_specs: Params, cfg: LoraConfig, abstract_params: Params) -> Params:
    """PartitionSpecs of ``quantize_int8(params)``: the int8 weights and their scales shard like the weight
    (a scale's size-1 input axes are left unsharded by ``sharding.fit_spec``)."""
    targets = set(target_paths(abstract_params, cfg))
    return jax.tree_util.tree_map_with_path(
        lambda path, spec: {"int8": spec, "scale": spec} if _path(path) in targets else spec,
        param_specs, is_leaf=lambda x: isinstance(x, P))
