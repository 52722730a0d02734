"""The model as pure functions over a params pytree.

``Model.init(rng) -> params`` and ``Model.apply(params, tokens, positions,
segment_ids) -> (logits, aux)`` hide NNX's split/merge, so training, LoRA, the
DPO reference and per-example gradients all work on plain nested dicts.
``init_cache`` and ``apply_cached`` are the KV-cached decode path (``maxlm/generate.py``).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from flax import nnx
from jax.sharding import PartitionSpec as P

from maxlm import sharding
from maxlm.models.transformer import ModelConfig, Transformer, init_cache
from maxlm.sharding import Rules

Params = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Model:
    cfg: ModelConfig
    rules: Rules
    graphdef: Any
    abstract_state: nnx.State

    def init(self, rng: jax.Array) -> Params:
        """Fresh params as a nested dict. Run it under ``jax.jit(out_shardings=...)``."""
        with nnx.use_eager_sharding(False):
            module = Transformer(self.cfg, self.rules, rngs=nnx.Rngs(params=rng))
        return nnx.to_pure_dict(nnx.split(module)[1])

    def apply(self, params: Params, tokens, positions, segment_ids, dropout_rng=None):
        """Float32 logits ``[batch, len, vocab]`` and an aux dict of diagnostics."""
        state = jax.tree.map(lambda x: x, self.abstract_state)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state)(tokens, positions, segment_ids, dropout_rng)

    def init_cache(self, batch: int, max_len: int) -> dict:
        """An empty KV cache for ``apply_cached`` (see ``transformer.init_cache``)."""
        return init_cache(self.cfg, batch, max_len)

    def apply_cached(self, params: Params, tokens, positions, valid, cache: dict, index):
        """Float32 logits ``[batch, t, vocab]`` of a chunk run against ``cache``, and the new cache.

        The chunk's K/V go to cache slots ``[index, index + t)``; ``valid`` is False for padding.
        """
        state = jax.tree.map(lambda x: x, self.abstract_state)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self.graphdef, state).decode(tokens, positions, valid, cache, index)

    def abstract_params(self) -> Params:
        return nnx.to_pure_dict(self.abstract_state)

    def logical_specs(self) -> Params:
        """Logical axis names of every parameter, as PartitionSpecs."""
        return nnx.to_pure_dict(nnx.get_partition_spec(self.abstract_state))

    def param_specs(self) -> Params:
        """Mesh PartitionSpecs of every parameter under this model's rules."""
        return jax.tree.map(lambda s: sharding.logical_to_spec(tuple(s), self.rules), self.logical_specs(),
                            is_leaf=lambda x: isinstance(x, P))


def build_model(cfg: ModelConfig, rules: Rules = sharding.DEFAULT_RULES) -> Model:
    """Traces the module abstractly (no memory) to get its graph and param shapes."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: Transformer(cfg, rules, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    return Model(cfg, tuple(tuple(r) for r in rules), graphdef, state)
