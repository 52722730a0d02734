"""Precomputed DPO reference log-probabilities: one pass over every pair before training, cached on disk.

After it, the reference params are no longer needed: each batch carries its ``ref_logps`` ``[B, 2]``.
The cache file is keyed by the tokenized pairs themselves (so by dataset, tokenizer, template and
truncation) and by a fingerprint of the reference params (so by the reference checkpoint).
"""

from __future__ import annotations

import hashlib
import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from maxlm import sharding
from maxlm.models import Model
from maxlm.train.objectives import pair_logps


def params_fingerprint(params) -> bytes:
    """Per-leaf (sum, sum of squares, position-weighted sum) in float64 on the host: identifies a checkpoint."""
    def stats(x):
        x = x.astype(jnp.float32).ravel()
        weights = jnp.arange(1, x.size + 1, dtype=jnp.float32) / x.size
        return jnp.stack([jnp.sum(x), jnp.sum(jnp.square(x)), jnp.sum(x * weights)])
    leaves = jax.device_get(jax.jit(lambda p: [stats(x) for x in jax.tree.leaves(p)])(params))
    return np.round(np.asarray(leaves, np.float64), 4).tobytes()


def cache_key(pairs: dict[str, np.ndarray], params, model: Model) -> str:
    h = hashlib.sha1(repr(model.cfg).encode())
    for k in sorted(pairs):
        h.update(k.encode())
        h.update(np.ascontiguousarray(pairs[k]).tobytes())
    h.update(params_fingerprint(params))
    return h.hexdigest()[:16]


def reference_logps(model: Model, params, pairs: dict[str, np.ndarray], batch_size: int, mesh: Mesh,
                    rules) -> np.ndarray:
    """``[N, 2]`` summed completion log-probs of every pair under ``params`` (batches of ``batch_size`` pairs)."""
    batch_sharding = NamedSharding(mesh, sharding.batch_spec(rules))
    fn = jax.jit(lambda p, b: pair_logps(model, p, b)[0], in_shardings=(None, batch_sharding),
                 out_shardings=NamedSharding(mesh, P()))
    count = len(pairs["tokens"])
    per_process = batch_size // jax.process_count()
    lo = jax.process_index() * per_process
    out = np.zeros((count, 2), np.float32)
    for start in range(0, count, batch_size):
        index = np.arange(start, start + batch_size) % count  # the last batch wraps around; extra rows are dropped
        local = {k: v[index[lo:lo + per_process]] for k, v in pairs.items()}
        logps = np.asarray(jax.device_get(fn(params, sharding.to_global_batch(local, mesh, rules))))
        out[start:start + batch_size] = logps[: min(batch_size, count - start)]
    return out


def cached_reference_logps(model: Model, params, pairs: dict[str, np.ndarray], batch_size: int, mesh: Mesh,
                           rules, directory: str) -> np.ndarray:
    """``reference_logps``, read from ``directory/ref_logps_<key>.npy`` if an earlier run wrote it."""
    path = os.path.join(directory, f"ref_logps_{cache_key(pairs, params, model)}.npy")
    if os.path.isfile(path):
        logging.info("reference log-probs: read %s", path)
        return np.load(path)
    logps = reference_logps(model, params, pairs, batch_size, mesh, rules)
    if jax.process_index() == 0:
        os.makedirs(directory, exist_ok=True)
        np.save(path + ".tmp.npy", logps)
        os.replace(path + ".tmp.npy", path)
        logging.info("reference log-probs of %d pairs written to %s", len(logps), path)
    return logps
