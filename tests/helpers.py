"""Small shared builders for tests: tiny configs and random batches."""

from __future__ import annotations

import importlib.util
import os

import jax
import numpy as np

from maxlm.config import base_config


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def preset_config(name: str, *args):
    """``configs/NAME.py``'s ``get_config(*args)``."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "configs", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def tiny_config(**model_overrides):
    """A 2-layer, d_model 32 model on the vendored corpus, trained for a handful of steps."""
    c = base_config()
    c.model.update({**dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, max_seq_len=32,
                           attention="xla"), **model_overrides})
    c.train.update(steps=4, batch_size=8, seq_len=16, lr=1e-2, warmup_steps=1, log_every=1, eval_every=0,
                   eval_batches=2)
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.checkpoint.update(every_steps=0)
    c.sample.num_tokens = 0
    return c


def tree_nbytes(tree) -> int:
    """Bytes of every array (or ShapeDtypeStruct) leaf of ``tree``."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def random_batch(batch: int, seq: int, vocab: int, seed: int = 0, packed: bool = False) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    segment_ids = np.ones((batch, seq), np.int32)
    positions = np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy()
    if packed:  # two examples per row, then padding
        cut, end = seq // 3, seq - seq // 4
        segment_ids[:, cut:end], segment_ids[:, end:] = 2, 0
        positions[:, cut:end] = np.arange(end - cut)
        positions[:, end:] = 0
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:], "segment_ids": segment_ids,
            "positions": positions, "loss_mask": (segment_ids > 0).astype(np.float32)}
