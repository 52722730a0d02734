"""LESS gradient features: per-example LoRA gradients, Adam preconditioning, a blockwise Rademacher projection.

A feature is ``normalize(P · direction(g))`` where ``g`` is the gradient of one example's mean token loss
with respect to the LoRA adapters only (the base is an argument, never differentiated) and ``P`` is a
``[dim, D]`` random ±1/sqrt(dim) matrix that is never built whole: the gradient's D coordinates are cut
into blocks of rows, and block ``k`` of ``P`` is drawn from ``fold_in(key(seed), k)`` inside the jitted
function, used and dropped (``lax.scan`` over blocks; 32 signs per random 32-bit word). A coordinate's column of ``P`` depends only on the
seed, its index and the block size, so padding a gradient with zeros does not change its projection.

``direction`` is the plain gradient for validation examples and, for pool examples, the Adam update
direction from a warmup checkpoint's moments, as in the reference LESS code
(``less/data_selection/collect_grad_reps.py: obtain_gradients_with_adam``)::

    m' = b1·m + (1 - b1)·g,   v' = b2·v + (1 - b2)·g²,   direction = m' / sqrt(v' + eps)

(no bias correction, eps inside the square root; b1, b2, eps are the warmup optimizer's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

from maxlm import sharding
from maxlm.data import pipeline
from maxlm.models import Model
from maxlm.models import lora as lora_lib
from maxlm.train.objectives import next_token_objective

Params = dict
Examples = dict[str, np.ndarray]  # [N, seq_len] each: tokens, targets, loss_mask, segment_ids, positions
PROJECTION_BLOCK_ELEMENTS = 1 << 20  # entries of P drawn at once (4 MiB of float32)


@dataclasses.dataclass(frozen=True)
class Projection:
    """A seeded Rademacher projection to ``dim`` dimensions, drawn ``block_rows`` gradient coordinates at a time."""

    dim: int
    seed: int
    block_rows: int = 0  # 0: PROJECTION_BLOCK_ELEMENTS // dim (at least 128)

    @property
    def rows_per_block(self) -> int:
        return self.block_rows or max(128, PROJECTION_BLOCK_ELEMENTS // self.dim)


@dataclasses.dataclass(frozen=True)
class AdamMoments:
    """The warmup optimizer's hyperparameters; the moments themselves are arguments of the feature function."""

    b1: float
    b2: float
    eps: float


def pad_examples(tokenized: list[dict[str, np.ndarray]], seq_len: int) -> Examples:
    """One example per row: ``{'tokens', 'loss_mask'}`` of n tokens -> n-1 (input, target) pairs, cut to
    ``seq_len`` and zero-padded (segment 0, no loss)."""
    return pipeline.padded_rows([(np.asarray(e["tokens"], np.int32)[: seq_len + 1],
                                  np.asarray(e["loss_mask"], np.float32)[: seq_len + 1]) for e in tokenized], seq_len)


def example_loss_fn(model: Model, lora: lora_lib.LoraConfig) -> Callable:
    """``loss(adapters, example, base)``: the mean next-token loss of one unbatched example under base + adapters."""
    objective = next_token_objective(model)

    def loss(adapters: Params, example: Examples, base: Params) -> jax.Array:
        batch = jax.tree.map(lambda x: x[None], example)
        loss_sum, metrics = objective(lora_lib.merge(base, adapters, lora), batch)
        return loss_sum / jnp.maximum(metrics["num_tokens"], 1.0)

    return loss


def per_example_grads(model: Model, lora: lora_lib.LoraConfig) -> Callable:
    """``grads(adapters, examples, base)``: the adapters' gradient of every example's loss, leading axis = example."""
    return jax.vmap(jax.grad(example_loss_fn(model, lora)), in_axes=(None, 0, None))


def rademacher_block(key: jax.Array, rows: int, dim: int, dtype) -> jax.Array:
    """``[rows, dim]`` independent fair ±1 entries: 32 signs from each random 32-bit word (``jax.random.rademacher``
    draws a word per sign, which makes the projection's random numbers, not its matmul, the cost on CPU)."""
    words = jax.random.bits(key, (rows, -(-dim // 32)), jnp.uint32)
    bits = (words[..., None] >> jnp.arange(32, dtype=jnp.uint32)) & 1
    return (1 - 2 * bits.reshape(rows, -1)[:, :dim].astype(jnp.int32)).astype(dtype)


def project(vectors: jax.Array, projection: Projection) -> jax.Array:
    """``[n, D] -> [n, dim]``: ``vectors @ P.T`` with ``P`` drawn block by block (see the module docstring)."""
    n, size = vectors.shape
    rows = projection.rows_per_block
    blocks = -(-size // rows)
    padded = jnp.pad(vectors, ((0, 0), (0, blocks * rows - size))).reshape(n, blocks, rows).swapaxes(0, 1)
    key = jax.random.key(projection.seed)

    def add_block(total, block):
        index, part = block
        signs = rademacher_block(jax.random.fold_in(key, index), rows, projection.dim, vectors.dtype)
        return total + part @ signs, None

    total, _ = jax.lax.scan(add_block, jnp.zeros((n, projection.dim), vectors.dtype), (jnp.arange(blocks), padded))
    return total / math.sqrt(projection.dim)


def adam_direction(grads: jax.Array, mu: jax.Array, nu: jax.Array, adam: AdamMoments) -> jax.Array:
    """The reference LESS formula ``m' / sqrt(v' + eps)`` for ``[n, D]`` gradients and ``[D]`` moments."""
    m = optax.tree.update_moment(grads, mu, adam.b1, 1)
    v = optax.tree.update_moment_per_elem_norm(grads, nu, adam.b2, 2)
    return m / jnp.sqrt(v + adam.eps)


def normalize(features: jax.Array) -> jax.Array:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    norms = jnp.linalg.norm(features, axis=-1, keepdims=True)
    return features / jnp.maximum(norms, 1e-12)


def make_feature_fn(model: Model, lora: lora_lib.LoraConfig, projection: Projection, adam: AdamMoments | None,
                    mesh: Mesh | None = None, rules=sharding.DEFAULT_RULES,
                    param_shardings=None, base_shardings=None) -> Callable:
    """``features(adapters, base, examples, moments) -> [n, dim]`` unit vectors, jitted.

    ``moments`` is ``(mu, nu)`` (pytrees like the adapters) when ``adam`` is given, else None. With a mesh,
    the examples are sharded over the batch axes (n must divide by them) and the params take the given
    shardings (default: replicated).
    """
    grads_fn = per_example_grads(model, lora)

    def features(adapters, base, examples, moments):
        grads = grads_fn(adapters, examples, base)
        flat = jax.vmap(lambda g: ravel_pytree(g)[0])(grads)
        if adam is not None:
            mu, nu = (ravel_pytree(m)[0] for m in moments)
            flat = adam_direction(flat, mu, nu, adam)
        return normalize(project(flat, projection))

    if mesh is None:
        return jax.jit(features)
    replicated = NamedSharding(mesh, P())
    rows = NamedSharding(mesh, sharding.batch_spec(rules))
    params = param_shardings or replicated
    moments = (params, params) if adam is not None else None
    return jax.jit(features, in_shardings=(params, base_shardings or replicated, rows, moments),
                   out_shardings=NamedSharding(mesh, P(sharding.batch_spec(rules)[0], None)))


def fingerprint(examples: Examples, projection: Projection, extra: str = "") -> str:
    """A hash of what a feature directory was computed from: the example rows, the projection, ``extra``."""
    h = hashlib.sha1(json.dumps([dataclasses.asdict(projection), extra]).encode())
    for key in sorted(examples):
        h.update(np.ascontiguousarray(examples[key]).tobytes())
    return h.hexdigest()


class FeatureDirMismatch(ValueError):
    """A feature directory holds shards of other examples, projection or checkpoint."""


def _save_atomically(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.save(f, array)
    os.replace(tmp, path)


def extract_features(feature_fn: Callable, args: tuple, examples: Examples, out_dir: str, *, batch_size: int,
                     shard_size: int, key: str, desc: str = "features") -> np.ndarray:
    """``[N, dim]`` features of ``examples``, computed ``batch_size`` rows per call and stored as
    ``out_dir/shard_XXXXX.npy`` of ``shard_size`` rows each (written atomically).

    Shards already on disk are read, not recomputed, so an interrupted extraction resumes. ``key``
    (a :func:`fingerprint`) is kept in ``out_dir/key``; a directory made for anything else is an error.
    ``args`` is the feature function's ``(adapters, base, moments)``.
    """
    os.makedirs(out_dir, exist_ok=True)
    key = f"{key}/shard_size={shard_size}"
    key_path = os.path.join(out_dir, "key")
    if os.path.exists(key_path):
        with open(key_path) as f:
            if f.read() != key:
                raise FeatureDirMismatch(f"{out_dir} holds features of other examples, checkpoint or projection; "
                                         "use a new workdir (or delete that directory)")
    else:
        with open(key_path + ".tmp", "w") as f:
            f.write(key)
        os.replace(key_path + ".tmp", key_path)
    count = len(examples["tokens"])
    adapters, base, moments = args
    shards = []
    for start in tqdm(range(0, count, shard_size), desc=desc, unit="shard", leave=False):
        path = os.path.join(out_dir, f"shard_{start // shard_size:05d}.npy")
        if not os.path.exists(path):
            stop = min(start + shard_size, count)
            parts = []
            for lo in range(start, stop, batch_size):
                hi = min(lo + batch_size, stop)
                rows = np.r_[lo:hi, np.full(batch_size - (hi - lo), lo)]  # a short last batch repeats a row
                batch = {k: v[rows] for k, v in examples.items()}
                parts.append(np.asarray(feature_fn(adapters, base, batch, moments))[: hi - lo])
            _save_atomically(path, np.concatenate(parts))
        shards.append(np.load(path))
    return np.concatenate(shards)
