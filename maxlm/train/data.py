"""Connects the ``data`` config section to the tokenizer and grain pipelines, per objective."""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import os
from collections.abc import Callable, Iterator

import grain
import numpy as np
from absl import logging

from maxlm.data import pipeline, preference, sft
from maxlm.data.hf_chat import HFChatTemplate
from maxlm.data.sources import BUILTIN_CORPORA, BadRecordError, asset_path, load_jsonl, make_source
from maxlm.data.tokenizer import Tokenizer, get_or_train_default_tokenizer, load_tokenizer, train_tokenizer
from maxlm.train.objectives import PREFERENCE_OBJECTIVES

DEFAULT_SOURCE = "builtin:tinyshakespeare"


@dataclasses.dataclass
class TrainData:
    tokenizer: Tokenizer
    train: grain.DatasetIterator  # checkpointable; yields per-process Batch dicts forever
    val_batches: Callable[[], Iterator[dict[str, np.ndarray]]]  # the same eval batches every call
    pairs: dict[str, np.ndarray] | None = None  # preference data: every pair [N, 2, seq_len], train then val
    num_train_pairs: int = 0


def cache_dir(config, workdir: str) -> str:
    return config.data.cache_dir or os.path.join(workdir, "cache")


def tokenizer_text(config) -> str:
    """The text a ``char`` tokenizer is trained on, as a source spec that also names its cache:
    ``data.tokenizer_text`` if given, else the dialogue field for HH SFT, ``chosen`` for preference pairs,
    ``#chat`` / ``#instruction`` for those SFT records (no field holds their text: ``message_texts``),
    or the whole ``data.source``."""
    d, objective = config.data, config.train.objective
    if d.tokenizer_text:
        return d.tokenizer_text
    source = d.source.partition("#")[0]
    if objective in PREFERENCE_OBJECTIVES:
        return f"{source}#chosen"
    if objective == "sft":
        return f"{source}#{d.sft_field if d.sft_format == 'hh' else d.sft_format}"
    return d.source


def _learns_messages(config) -> bool:
    """Whether a ``char`` tokenizer learns ``message_texts`` rather than reading ``tokenizer_text`` as a source:
    for chat and instruction SFT records, and ``pairs`` (whose completions may be message lists)."""
    d, objective = config.data, config.train.objective
    if d.tokenizer_text:
        return False
    if objective == "sft":
        return d.sft_format != "hh"
    return objective in PREFERENCE_OBJECTIVES and d.preference_format == "pairs"


def message_texts(config) -> list[str]:
    """The text of every dialogue of ``data.source``, one document each: the messages of an SFT record, the
    chosen completion of a preference pair (a bad pair raises as in ``records_to_pairs``, or is left out)."""
    d = config.data
    if config.train.objective == "sft":
        dialogues = [sft.to_messages(r, d.sft_format, d.sft_field) for r in read_sft_records(d.source, d)]
    else:
        dialogues = []
        for i, record in enumerate(read_preference_records(d.source, d.preference_format, d.on_bad_record)):
            try:
                dialogues.append(preference.to_pair(record, d.preference_format)[1])
            except ValueError as e:
                if d.on_bad_record == "error":
                    raise ValueError(f"{d.source} record {i}: {e}; set data.on_bad_record=skip to skip it") from None
    texts = ["\n".join(m["content"] for m in messages) for messages in dialogues]
    if not any(texts):
        raise ValueError(f"{d.source}: no dialogue text to train the char tokenizer on")
    return texts


def get_tokenizer(config, workdir: str) -> Tokenizer:
    """``data.tokenizer``: ``char`` (trained once on ``tokenizer_text`` or ``message_texts``, then cached), a
    ``.model`` path, or an HF model directory / ``tokenizer.json`` (needs the hf extra)."""
    spec = config.data.tokenizer
    text_spec = tokenizer_text(config)
    if os.path.isdir(spec) or spec.endswith(".json"):
        from maxlm.data.hf_tokenizer import load_hf_tokenizer
        return load_hf_tokenizer(spec)
    if spec != "char":
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"data.tokenizer={spec!r}: no such sentencepiece model file")
        return load_tokenizer(spec)
    directory = cache_dir(config, workdir)
    os.makedirs(directory, exist_ok=True)
    if text_spec == DEFAULT_SOURCE:
        return get_or_train_default_tokenizer(directory)
    name = hashlib.sha1(text_spec.encode()).hexdigest()[:12]
    prefix = os.path.join(directory, f"char_{name}")
    if os.path.isfile(prefix + ".model"):
        return load_tokenizer(prefix + ".model")
    documents = message_texts(config) if _learns_messages(config) else text_spec
    return train_tokenizer([documents], prefix, vocab_size=100_000, model_type="char",
                           on_bad_record=config.data.on_bad_record)


def make_data(config, workdir: str) -> TrainData:
    """The data of ``train.objective``: token windows for ``pretrain``, packed dialogues for ``sft``,
    preference pairs for ``dpo`` and ``reward``."""
    objective = config.train.objective
    if objective in PREFERENCE_OBJECTIVES:
        return preference_data(config, workdir)
    return sft_data(config, workdir) if objective == "sft" else pretrain_data(config, workdir)


def pretrain_data(config, workdir: str) -> TrainData:
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

    return TrainData(tokenizer, train, val_batches)


def read_records(spec: str, on_bad_record: str, fields: tuple[str, ...]) -> list[dict]:
    """Whole JSONL records of ``jsonl:PATTERN`` or ``builtin:NAME`` (SFT needs more than one text field)."""
    scheme, _, rest = spec.partition(":")
    path = rest.partition("#")[0]
    if scheme == "builtin" and path in BUILTIN_CORPORA and BUILTIN_CORPORA[path][1] == "jsonl":
        path = asset_path(BUILTIN_CORPORA[path][0])
    elif scheme != "jsonl":
        raise ValueError(f"data.source={spec!r}: SFT and preference data are JSONL records "
                         "(jsonl:PATH or builtin:hh_rlhf_harmless_test)")
    return load_jsonl(path, fields=fields, on_bad_record=on_bad_record)


def read_sft_records(spec: str, d) -> list[dict]:
    """The records of ``spec`` that are ``data.sft_format`` dialogues with an assistant turn (``d`` is the data
    section); a bad one raises BadRecordError naming it, or with ``data.on_bad_record=skip`` is left out."""
    required = {"hh": (d.sft_field,), "instruction": ("instruction", "output"), "chat": ()}[d.sft_format]
    records, good, bad = read_records(spec, d.on_bad_record, required), [], []
    for i, record in enumerate(records):
        try:
            sft.check_learnable(sft.to_messages(record, d.sft_format, d.sft_field))
        except ValueError as e:
            if d.on_bad_record == "error":
                raise BadRecordError(f"{spec} record {i}: {e}; set data.on_bad_record=skip to skip it") from None
            bad.append(f"record {i}: {e}")
            continue
        good.append(record)
    if bad:
        logging.warning("%s: skipped %d bad SFT records of %d, the first %s", spec, len(bad), len(records), bad[0])
    if not good:
        raise ValueError(f"{spec}: no usable SFT records")
    return good


def read_preference_records(spec: str, preference_format: str, on_bad_record: str) -> list[dict]:
    """The records of ``spec``: ``hh`` ones hold ``chosen`` and ``rejected`` strings, ``pairs`` may hold
    message lists (``preference.to_pair`` checks them)."""
    return read_records(spec, on_bad_record, ("chosen", "rejected") if preference_format == "hh" else ())


def sft_examples(records: list[dict], tokenizer: Tokenizer, template, d) -> list[dict[str, np.ndarray]]:
    """Each record as a tokenized dialogue with its loss mask (``sft.tokenize_dialogue``)."""
    return [sft.tokenize_dialogue(sft.to_messages(r, d.sft_format, d.sft_field), tokenizer, template,
                                  train_on_prompt=d.train_on_prompt) for r in records]


def sft_data(config, workdir: str) -> TrainData:
    """Dialogues rendered with ``data.chat_template``, loss on assistant tokens, packed into rows.

    The last ``data.val_fraction`` of the records are held out for evaluation.
    """
    d, t = config.data, config.train
    template = chat_template(d)
    records = read_sft_records(d.source, d)
    tokenizer = get_tokenizer(config, workdir)
    examples = sft_examples(records, tokenizer, template, d)
    cut = _split_point(len(examples), d.val_fraction)
    common = dict(seq_len=t.seq_len, batch_size=t.batch_size, seed=config.seed, truncate=d.truncate,
                  on_bad_record=d.on_bad_record)
    train = pipeline.packed_dataset(examples[:cut], **common)

    def val_batches() -> Iterator[dict[str, np.ndarray]]:
        return itertools.islice(pipeline.packed_dataset(examples[cut:], num_epochs=1, **common), t.eval_batches)

    return TrainData(tokenizer, train, val_batches)


def chat_template(d) -> sft.ChatTemplate | HFChatTemplate:
    """``data.chat_template``'s template (SFT and preference data; ``hf``: the tokenizer directory's own)."""
    if d.chat_template == "hf":
        return HFChatTemplate(d.tokenizer)
    if d.chat_template not in sft.TEMPLATES:
        raise ValueError(f"data.chat_template={d.chat_template!r} is not one of {sorted(sft.TEMPLATES)}")
    return sft.TEMPLATES[d.chat_template]


def _split_point(count: int, val_fraction: float) -> int:
    """How many of ``count`` records train; the rest are held out (none with ``val_fraction=0``)."""
    if val_fraction == 0:
        return count
    cut = round(count * (1.0 - val_fraction))
    if cut in (0, count):
        raise ValueError(f"data.val_fraction={val_fraction} leaves no train or no val records of {count}")
    return cut


def preference_data(config, workdir: str) -> TrainData:
    """Preference pairs (``data.preference_format``) rendered with ``data.chat_template``, one pair
    per ``[2, seq_len]`` row pair; the last ``data.val_fraction`` of the records are held out."""
    d, t = config.data, config.train
    template = chat_template(d)
    records = read_preference_records(d.source, d.preference_format, d.on_bad_record)
    tokenizer = get_tokenizer(config, workdir)
    pairs, skipped = preference.records_to_pairs(
        records, tokenizer, template, preference_format=d.preference_format, seq_len=t.seq_len,
        max_prompt_len=d.max_prompt_len or (t.seq_len + 1) // 2, skip_bad=d.on_bad_record == "skip", where=d.source)
    if skipped:
        logging.warning("preference data: skipped %d bad records of %d", skipped, len(records))
    data = TrainData(tokenizer, None, None, pairs, _split_point(len(pairs["tokens"]), d.val_fraction))
    return with_reference_logps(config, data)


def with_reference_logps(config, data: TrainData, ref_logps: np.ndarray | None = None) -> TrainData:
    """The train iterator and val batches of ``data.pairs``, carrying ``ref_logps`` ``[N, 2]`` if given."""
    t, cut = config.train, data.num_train_pairs
    train_pairs, val_pairs = ({k: v[part] for k, v in data.pairs.items()} for part in (slice(cut), slice(cut, None)))
    train_ref, val_ref = (None, None) if ref_logps is None else (ref_logps[:cut], ref_logps[cut:])
    train = preference.preference_dataset(train_pairs, batch_size=t.batch_size, seed=config.seed, train=True,
                                          ref_logps=train_ref)

    def val_batches() -> Iterator[dict[str, np.ndarray]]:
        return itertools.islice(preference.preference_dataset(
            val_pairs, batch_size=t.batch_size, seed=config.seed, train=False, ref_logps=val_ref), t.eval_batches)

    return dataclasses.replace(data, train=train, val_batches=val_batches)
