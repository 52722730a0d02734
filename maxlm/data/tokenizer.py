"""SentencePiece tokenizers: train, load, extend with new pieces, and resize embeddings to match.

Every tokenizer trained here round-trips exactly (``decode(encode(x)) == x``) on any text: no
normalization, no whitespace collapsing, no dummy prefix, byte fallback for unseen characters,
and ``"\\n"`` as a piece of its own (sentencepiece trains on lines, so it never sees newlines).
Ids: ``<unk>`` 0, ``<s>`` (bos) 1, ``</s>`` (eos) 2, ``<pad>`` 3, then the special tokens.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator, Sequence
from typing import Literal

from absl import logging
import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from maxlm.data import sources

ModelType = Literal["bpe", "unigram", "char"]

DEFAULT_CHAR_MODEL = "tinyshakespeare_char_v2.model"
_NEWLINE = "\n"
_NORMAL = sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL
_USER_DEFINED = sentencepiece_model_pb2.ModelProto.SentencePiece.USER_DEFINED
_MODEL_TYPES = {"unigram": 1, "bpe": 2, "char": 4}


class Tokenizer:
    """A loaded SentencePiece model. Special ids are -1 when the model has no such piece."""

    def __init__(self, processor: spm.SentencePieceProcessor, path: str | None = None):
        self.processor = processor
        self.path = path

    @property
    def vocab_size(self) -> int:
        return self.processor.vocab_size()

    @property
    def bos_id(self) -> int:
        return self.processor.bos_id()

    @property
    def eos_id(self) -> int:
        return self.processor.eos_id()

    @property
    def pad_id(self) -> int:
        return self.processor.pad_id()

    @property
    def unk_id(self) -> int:
        return self.processor.unk_id()

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 2) -> list[list[int]]:
        """Encodes many texts at once, in C++ threads (much faster than a Python loop)."""
        return self.processor.encode(list(texts), num_threads=num_threads)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.processor.decode([int(i) for i in ids])

    def id_to_piece(self, i: int) -> str:
        return self.processor.id_to_piece(int(i))

    def piece_to_id(self, piece: str) -> int:
        return self.processor.piece_to_id(piece)

    def model_proto(self) -> sentencepiece_model_pb2.ModelProto:
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString(self.processor.serialized_model_proto())
        return proto

    def __repr__(self) -> str:
        return f"Tokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def load_tokenizer(path: str) -> Tokenizer:
    """Loads a ``.model`` file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer model {path!r} does not exist")
    return Tokenizer(spm.SentencePieceProcessor(model_file=path), path=path)


def _write_atomically(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def _training_lines(inputs: Sequence[str | sources.DocumentSource],
                    on_bad_record: sources.OnBadRecord) -> Iterator[str]:
    """Non-empty lines of every document of every input (paths, globs, source specs or documents)."""
    for item in inputs:
        source = (sources.make_source(sources.infer_spec(item), on_bad_record=on_bad_record)
                  if isinstance(item, str) else item)
        for i in range(len(source)):
            yield from (line for line in source[i].split(_NEWLINE) if line)


def _save(proto_bytes: bytes, model_prefix: str) -> Tokenizer:
    path = f"{model_prefix}.model"
    _write_atomically(path, proto_bytes)
    return load_tokenizer(path)


def train_tokenizer(
    input_files: str | Sequence[str | sources.DocumentSource],
    model_prefix: str,
    *,
    vocab_size: int,
    model_type: ModelType = "bpe",
    byte_fallback: bool = True,
    special_tokens: Sequence[str] = (),
    character_coverage: float = 1.0,
    hard_vocab_limit: bool | None = None,
    input_sentence_size: int = 5_000_000,
    num_threads: int = 2,
    on_bad_record: sources.OnBadRecord = "error",
) -> Tokenizer:
    """Trains a round-tripping SentencePiece model and writes ``{model_prefix}.model``.

    Args:
      input_files: paths, globs or source specs; ``*.jsonl[.gz][#field]`` is read as JSONL
        (field ``text`` by default), other paths as plain text; or documents (a sequence of strings).
      vocab_size: target size. For ``char`` models it is an upper bound (the vocab is every
        character seen, plus the byte pieces and specials).
      special_tokens: extra pieces that are never split (e.g. chat markers), ids 5, 6, ...
      hard_vocab_limit: defaults to False for ``char`` and True otherwise.
      input_sentence_size: at most this many lines are sampled for training.
      on_bad_record: a bad record of an input raises (``error``) or is skipped and logged (``skip``).
    """
    if model_type not in _MODEL_TYPES:
        raise ValueError(f"model_type must be one of {sorted(_MODEL_TYPES)}, got {model_type!r}")
    inputs = [input_files] if isinstance(input_files, str) else list(input_files)
    if not inputs:
        raise ValueError("train_tokenizer needs at least one input file")
    if _NEWLINE in special_tokens:
        special_tokens = [t for t in special_tokens if t != _NEWLINE]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=_training_lines(inputs, on_bad_record),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        hard_vocab_limit=(model_type != "char") if hard_vocab_limit is None else hard_vocab_limit,
        byte_fallback=byte_fallback,
        character_coverage=character_coverage,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        add_dummy_prefix=False,
        split_by_whitespace=True,
        allow_whitespace_only_pieces=True,
        user_defined_symbols=[_NEWLINE, *special_tokens],
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=num_threads,
        minloglevel=2,
    )
    tokenizer = _save(model.getvalue(), model_prefix)
    logging.info("trained %s tokenizer %s: vocab %d", model_type, tokenizer.path, tokenizer.vocab_size)
    return tokenizer


def extend_tokenizer(
    base: Tokenizer,
    new_corpus_files: str | Sequence[str],
    out_prefix: str,
    *,
    new_vocab_size: int,
    num_threads: int = 2,
) -> Tokenizer:
    """Adds pieces learned on a new corpus to ``base``, keeping every existing id unchanged.

    A tokenizer of the base's type is trained on the new corpus; its pieces that the base lacks
    are appended, in that tokenizer's order (most useful first), until the vocabulary has
    ``new_vocab_size`` pieces (fewer if the new corpus offers fewer new pieces; logged). Appended
    BPE pieces score below every base piece, so base merges keep their priority.
    """
    if new_vocab_size < base.vocab_size:
        raise ValueError(f"new_vocab_size={new_vocab_size} is smaller than the base vocab ({base.vocab_size})")
    proto = base.model_proto()
    model_type = {v: k for k, v in _MODEL_TYPES.items()}.get(proto.trainer_spec.model_type)
    if model_type is None:
        raise ValueError(f"cannot extend a tokenizer of model type {proto.trainer_spec.model_type}")
    aux = train_tokenizer(
        new_corpus_files,
        f"{out_prefix}.aux",
        vocab_size=new_vocab_size,
        model_type=model_type,
        byte_fallback=proto.trainer_spec.byte_fallback,
        hard_vocab_limit=False,
        num_threads=num_threads,
    )
    existing = {p.piece for p in proto.pieces}
    lowest_score = min((p.score for p in proto.pieces if p.type == _NORMAL), default=0.0)
    added = 0
    for piece in aux.model_proto().pieces:
        if len(proto.pieces) >= new_vocab_size:
            break
        if piece.type not in (_NORMAL, _USER_DEFINED) or piece.piece in existing:
            continue
        added += 1
        score = lowest_score - added if model_type == "bpe" else piece.score
        proto.pieces.add(piece=piece.piece, score=score, type=_NORMAL)
        existing.add(piece.piece)
    os.remove(aux.path)
    if len(proto.pieces) < new_vocab_size:
        logging.warning("extend_tokenizer: the new corpus gave only %d new pieces; vocab %d < %d",
                        added, len(proto.pieces), new_vocab_size)
    tokenizer = _save(proto.SerializeToString(), out_prefix)
    logging.info("extended %s by %d pieces -> %s (vocab %d)", base.path, added, tokenizer.path, tokenizer.vocab_size)
    return tokenizer


def resize_embeddings(
    matrix: np.ndarray,
    new_vocab: int,
    *,
    init: Literal["mean", "normal"] = "mean",
    seed: int = 0,
    axis: int = 0,
) -> np.ndarray:
    """Grows an embedding (or output) matrix along its vocab ``axis`` to ``new_vocab`` entries.

    Old entries are kept. New ones are the mean of the old ones (``'mean'``), or drawn from a
    normal with the old entries' per-dimension mean and overall std (``'normal'``).
    """
    m = np.moveaxis(np.asarray(matrix), axis, 0)
    old = m.shape[0]
    if new_vocab < old:
        raise ValueError(f"resize_embeddings only grows: new_vocab={new_vocab} < current {old}")
    mean = m.mean(axis=0, dtype=np.float64)
    if init == "mean":
        new = np.broadcast_to(mean, (new_vocab - old, *m.shape[1:]))
    elif init == "normal":
        std = (m - mean).std(dtype=np.float64)
        new = np.random.default_rng(seed).normal(mean, std, size=(new_vocab - old, *m.shape[1:]))
    else:
        raise ValueError(f"init must be 'mean' or 'normal', got {init!r}")
    return np.moveaxis(np.concatenate([m, new.astype(m.dtype)], axis=0), 0, axis)


def get_or_train_default_tokenizer(cache_dir: str) -> Tokenizer:
    """The character-level tokenizer of the vendored tinyshakespeare corpus, trained once and cached.

    The corpus's characters plus the specials, without byte fallback (vocab 69, like the classic
    65-character setup): a character Shakespeare never used encodes as ``<unk>``.
    """
    path = os.path.join(os.path.expanduser(cache_dir), DEFAULT_CHAR_MODEL)
    if os.path.isfile(path):
        return load_tokenizer(path)
    return train_tokenizer(
        ["builtin:tinyshakespeare"], path[: -len(".model")], vocab_size=1024, model_type="char",
        byte_fallback=False,
    )
