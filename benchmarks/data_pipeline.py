"""Data pipeline throughput: tokens per second delivered by the grain pipelines, per config.

  python benchmarks/data_pipeline.py [--batches=200] [--cache_dir=/tmp/maxlm_bench]

Configs: the Shakespeare char main job (batch 12 x 64), GPT-2-124M-shaped pretraining batches
(8 and 32 x 1024) with a 2048-piece BPE tokenizer trained on Shakespeare, and packed SFT rows
(8 x 1024) of the vendored hh-rlhf dialogues. ``measure_pipeline(name)`` is importable so a
column for the training step's consumption can be added next to it. Corpus tokenization happens
once, at setup, and is reported separately. Timings depend on what else runs on the machine.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Literal

from absl import app, flags
import numpy as np

from maxlm import data
from maxlm.data import pipeline

_BATCHES = flags.DEFINE_integer("batches", 200, "Batches timed per config (after 5 warm-up batches).")
_TRAIN = flags.DEFINE_list(
    "train_configs", ["shakespeare_char"],
    "Configs whose training step consumption is measured here too (the 124m ones take minutes on a CPU).")
_CACHE_DIR = flags.DEFINE_string("cache_dir", os.path.join(tempfile.gettempdir(), "maxlm_bench"), "Tokenizer cache.")


@dataclasses.dataclass(frozen=True)
class PipelineConfig:
    batch_size: int
    seq_len: int
    tokenizer: Literal["char", "bpe"]
    kind: Literal["pretrain", "packed"] = "pretrain"


CONFIGS = {
    "shakespeare_char": PipelineConfig(12, 64, "char"),
    "124m_shape_b8": PipelineConfig(8, 1024, "bpe"),
    "124m_shape_b32": PipelineConfig(32, 1024, "bpe"),
    "sft_packed_b8": PipelineConfig(8, 1024, "bpe", kind="packed"),
}


def load_tokenizer(kind: str, cache_dir: str) -> data.Tokenizer:
    if kind == "char":
        return data.get_or_train_default_tokenizer(cache_dir)
    path = os.path.join(cache_dir, "shakespeare_bpe2048")
    if os.path.isfile(f"{path}.model"):
        return data.load_tokenizer(f"{path}.model")
    return data.train_tokenizer(["builtin:tinyshakespeare"], path, vocab_size=2048, model_type="bpe")


def build_iterator(config: PipelineConfig, cache_dir: str, seed: int = 0):
    """The config's iterator, and the seconds spent tokenizing the corpus."""
    tokenizer = load_tokenizer(config.tokenizer, cache_dir)
    start = time.perf_counter()
    shard = {"shard_index": 0, "shard_count": 1}
    if config.kind == "pretrain":
        tokens = pipeline.tokenize_documents(data.make_source("builtin:tinyshakespeare"), tokenizer)
        seconds = time.perf_counter() - start
        it = pipeline.pretrain_dataset(tokens, None, seq_len=config.seq_len, batch_size=config.batch_size, seed=seed, **shard)
        return it, seconds
    source = data.make_source("builtin:hh_rlhf_harmless_test#chosen")
    encoded = tokenizer.encode_batch([source[i] for i in range(len(source))])
    examples = [{"tokens": np.asarray(ids[: config.seq_len + 1], np.int32)} for ids in encoded if len(ids) > 1]
    seconds = time.perf_counter() - start
    it = pipeline.packed_dataset(examples, seq_len=config.seq_len, batch_size=config.batch_size, seed=seed, **shard)
    return it, seconds


def measure_pipeline(name: str, *, n_batches: int = 200, cache_dir: str | None = None) -> float:
    """Tokens per second (rows x seq_len, padding included) the named config's pipeline delivers."""
    cache_dir = cache_dir or os.path.join(tempfile.gettempdir(), "maxlm_bench")
    it, _ = build_iterator(CONFIGS[name], cache_dir)
    return pipeline.tokens_per_second(it, n_batches)


def train_consumption(name: str, config: PipelineConfig, vocab: int) -> float:
    """Tokens/s the training step of the matching model consumes on this machine (random tokens)."""
    import train_step  # benchmarks/train_step.py

    preset = train_step.load_preset("shakespeare_char" if name == "shakespeare_char" else "gpt2_small")
    preset.model.vocab_size = vocab
    preset.model.compute_dtype = "float32"
    preset.train.update(batch_size=config.batch_size, seq_len=config.seq_len)
    return train_step.measure(preset, "xla", steps=3 if name == "shakespeare_char" else 1)["tokens_per_sec"]


def main(argv):
    del argv
    print("| config | batch x seq | tokenizer (vocab) | tokenize corpus s | pipeline tokens/s | batches/s | "
          "train step tokens/s | pipeline / train |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for name, config in CONFIGS.items():
        it, setup = build_iterator(config, _CACHE_DIR.value)
        vocab = load_tokenizer(config.tokenizer, _CACHE_DIR.value).vocab_size
        tps = pipeline.tokens_per_second(it, _BATCHES.value)
        train = train_consumption(name, config, vocab) if name in _TRAIN.value else None
        train_cols = f"{train:,.0f} | {tps / train:,.0f}x" if train else "not measured | -"
        print(f"| {name} | {config.batch_size} x {config.seq_len} | {config.tokenizer} ({vocab}) | {setup:.2f} | "
              f"{tps:,.0f} | {tps / (config.batch_size * config.seq_len):,.0f} | {train_cols} |")


if __name__ == "__main__":
    app.run(main)
