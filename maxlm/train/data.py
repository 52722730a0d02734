"""Connects the ``data`` config section to the tokenizer and grain pipelines."""

from __future__ import annotations

import dataclasses
import hashlib
import os
from collections.abc import Callable, Iterator

import grain
import numpy as np

from maxlm.data import pipeline
from maxlm.data.sources import make_source
from maxlm.data.tokenizer import Tokenizer, get_or_train_default_tokenizer, load_tokenizer, train_tokenizer

DEFAULT_SOURCE = "builtin:tinyshakespeare"


@dataclasses.dataclass
class PretrainData:
    tokenizer: Tokenizer
    train: grain.DatasetIterator  # checkpointable; yields per-process Batch dicts forever
    val_batches: Callable[[], Iterator[dict[str, np.ndarray]]]  # the same eval batches every call


def cache_dir(config, workdir: str) -> str:
    return config.data.cache_dir or os.path.join(workdir, "cache")


def get_tokenizer(config, workdir: str) -> Tokenizer:
    """``data.tokenizer``: ``char`` (trained on the source once, cached) or a ``.model`` path."""
    spec = config.data.tokenizer
    if spec != "char":
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"data.tokenizer={spec!r}: no such sentencepiece model file")
        return load_tokenizer(spec)
    directory = cache_dir(config, workdir)
    os.makedirs(directory, exist_ok=True)
    if config.data.source == DEFAULT_SOURCE:
        return get_or_train_default_tokenizer(directory)
    name = hashlib.sha1(config.data.source.encode()).hexdigest()[:12]
    prefix = os.path.join(directory, f"char_{name}")
    if os.path.isfile(prefix + ".model"):
        return load_tokenizer(prefix + ".model")
    return train_tokenizer([config.data.source], prefix, vocab_size=100_000, model_type="char")


def pretrain_data(config, workdir: str) -> PretrainData:
    """Tokenizer, an endless shuffled train iterator, and a fixed set of val batches."""
    tokenizer = get_tokenizer(config, workdir)
    source = make_source(config.data.source, on_bad_record=config.data.on_bad_record)
    tokens = pipeline.tokenize_documents(source, tokenizer)
    t = config.train
    common = dict(seq_len=t.seq_len, batch_size=t.batch_size, val_fraction=config.data.val_fraction)
    train = pipeline.pretrain_dataset(tokens, None, seed=config.seed, split="train", **common)

    def val_batches() -> Iterator[dict[str, np.ndarray]]:
        it = pipeline.pretrain_dataset(tokens, None, seed=config.seed, split="val", **common)
        for i, batch in enumerate(it):
            if i == t.eval_batches:
                return
            yield batch

    return PretrainData(tokenizer, train, val_batches)
