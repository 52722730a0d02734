"""Data: tokenizers, document sources, grain pipelines that build Batches, and dedup.

  tokenizer.py  SentencePiece train / load / extend, embedding resize, the default char tokenizer
  sources.py    spec strings (text:, jsonl:, tfds:, arrayrecord:, builtin:) -> random-access docs
  pipeline.py   pretraining windows, SFT packing, mixtures -> resumable grain iterators of Batches
  dedup.py      quality filters, exact and MinHash-LSH near-duplicate removal
"""

from maxlm.data.pipeline import (
    BATCH_KEYS,
    Batch,
    batch_iterator,
    mixture_dataset,
    mixture_epochs,
    packed_dataset,
    pretrain_dataset,
    pretrain_windows,
    split_tokens,
    tokenize_documents,
    tokens_per_second,
)
from maxlm.data.sources import asset_path, load_jsonl, make_source
from maxlm.data.tokenizer import (
    Tokenizer,
    extend_tokenizer,
    get_or_train_default_tokenizer,
    load_tokenizer,
    resize_embeddings,
    train_tokenizer,
)

__all__ = [
    "BATCH_KEYS", "Batch", "Tokenizer", "asset_path", "batch_iterator", "extend_tokenizer",
    "get_or_train_default_tokenizer", "load_jsonl", "load_tokenizer", "make_source", "mixture_dataset",
    "mixture_epochs", "packed_dataset", "pretrain_dataset", "pretrain_windows", "resize_embeddings",
    "split_tokens", "tokenize_documents", "tokens_per_second", "train_tokenizer",
]
