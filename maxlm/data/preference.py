"""Preference pairs for DPO and reward models: one prompt, a chosen and a rejected completion.

Records come in two formats (``data.preference_format``):
  ``hh``     Anthropic HH-RLHF ``{"chosen", "rejected"}``: two whole dialogues sharing a prefix; the
             prompt is their common prefix up to its last ``"\\n\\nAssistant:"``, the completions the rest
  ``pairs``  ``{"prompt", "chosen", "rejected"}``: the prompt a string (one user turn) or a list of
             messages; each completion a string (one assistant turn) or messages starting with the assistant

Pairs are tokenized with the chat templates of ``maxlm/data/sft.py``. The loss mask covers the
completion's assistant tokens only (content, end-of-turn text, eos). A pair that does not fit a row of
``seq_len + 1`` tokens loses the beginning of its prompt (down to ``max_prompt_len`` tokens at most),
then the ends of its completions.

A preference Batch is the usual Batch with a pair axis: every array is ``[batch, 2, seq_len]``,
index 0 the chosen and 1 the rejected row (both rows of a pair sit on the same data shard). The
objective flattens it to ``[2 * batch, seq_len]`` for one forward pass. An optional ``ref_logps``
``[batch, 2]`` carries precomputed reference log-probabilities.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from maxlm.data import pipeline, sft
from maxlm.data.tokenizer import Tokenizer

Messages = list[dict[str, str]]
HH_ASSISTANT = "\n\nAssistant:"
FORMATS = ("hh", "pairs")


def split_hh(chosen: str, rejected: str) -> tuple[Messages, Messages, Messages]:
    """(prompt, chosen, rejected) messages of an HH pair; the completions start with the assistant."""
    common = os.path.commonprefix([chosen, rejected])
    cut = common.rfind(HH_ASSISTANT)
    if cut < 0:
        raise ValueError(f"chosen and rejected share no '\\n\\nAssistant:' prefix: {chosen[:80]!r}")
    return sft.parse_hh(chosen[:cut]), sft.parse_hh(chosen[cut:]), sft.parse_hh(rejected[cut:])


def _as_messages(value: str | Sequence[Mapping[str, str]], role: str) -> Messages:
    if isinstance(value, str):
        return [{"role": role, "content": value}]
    return sft.to_messages({"messages": list(value)}, "chat")


def to_pair(record: Mapping[str, Any], preference_format: str) -> tuple[Messages, Messages, Messages]:
    """One record as (prompt, chosen, rejected) message lists."""
    if preference_format == "hh":
        return split_hh(record["chosen"], record["rejected"])
    if preference_format == "pairs":
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
        if missing:
            raise ValueError(f"a preference record without {missing}")
        prompt = _as_messages(record["prompt"], "user")
        chosen, rejected = _as_messages(record["chosen"], "assistant"), _as_messages(record["rejected"], "assistant")
        if chosen[0]["role"] != "assistant" or rejected[0]["role"] != "assistant":
            raise ValueError("the chosen and rejected completions must start with an assistant turn")
        return prompt, chosen, rejected
    raise ValueError(f"data.preference_format={preference_format!r} is not one of {', '.join(FORMATS)}")


def tokenize_pair(prompt: Messages, chosen: Messages, rejected: Messages, tokenizer: Tokenizer,
                  template: sft.ChatTemplate) -> dict[str, np.ndarray]:
    """``{prompt, chosen, chosen_mask, rejected, rejected_mask}``: token ids and completion loss masks.

    The dialogue is rendered by ``sft.tokenize_dialogue`` piece by piece, so the completion's tokens
    are those of the completion rendered alone (no bos) and the prompt's are what comes before them.
    """
    tail = dataclasses.replace(template, add_bos=False)
    out: dict[str, np.ndarray] = {}
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        part = sft.tokenize_dialogue(completion, tokenizer, tail)
        out[name], out[f"{name}_mask"] = part["tokens"], part["loss_mask"]
    whole = sft.tokenize_dialogue(prompt + chosen, tokenizer, template)["tokens"]
    out["prompt"] = whole[: len(whole) - len(out["chosen"])]
    return out


def truncate_pair(pair: Mapping[str, np.ndarray], max_len: int, max_prompt_len: int) -> dict[str, np.ndarray]:
    """Fits prompt + each completion into ``max_len`` tokens.

    The prompt keeps its end and is cut only as far as needed, never below ``max_prompt_len``
    tokens; the completions are then capped at what is left.
    """
    prompt = pair["prompt"]
    longest = max(len(pair["chosen"]), len(pair["rejected"]))
    if len(prompt) + longest <= max_len:
        return dict(pair)
    keep = min(len(prompt), max(max_prompt_len, max_len - longest))
    cap = max_len - keep
    out = dict(pair, prompt=prompt[len(prompt) - keep:])
    for name in ("chosen", "rejected"):
        out[name], out[f"{name}_mask"] = pair[name][:cap], pair[f"{name}_mask"][:cap]
    return out


def pair_rows(pair: Mapping[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """A truncated pair as Batch arrays ``[2, seq_len]`` (chosen, rejected), padded after the end."""
    sequences = []
    for name in ("chosen", "rejected"):
        seq = np.concatenate([pair["prompt"], pair[name]])
        mask = np.concatenate([np.zeros(len(pair["prompt"]), np.float32), pair[f"{name}_mask"]])
        if not 2 <= len(seq) <= seq_len + 1:
            raise ValueError(f"a {name} sequence of {len(seq)} tokens does not fit seq_len+1={seq_len + 1}")
        sequences.append((seq, mask))
    return pipeline.padded_rows(sequences, seq_len)


def records_to_pairs(records: Sequence[Mapping[str, Any]], tokenizer: Tokenizer, template: sft.ChatTemplate, *,
                     preference_format: str, seq_len: int, max_prompt_len: int, skip_bad: bool,
                     where: str) -> tuple[dict[str, np.ndarray], int]:
    """Every record as pair rows stacked ``[N, 2, seq_len]``, and how many bad records were skipped
    (``skip_bad``; else the first bad one raises, naming ``where`` and its index)."""
    rows, skipped = [], 0
    for i, record in enumerate(records):
        try:
            pair = tokenize_pair(*to_pair(record, preference_format), tokenizer, template)
        except ValueError as e:
            if not skip_bad:
                raise ValueError(f"{where} record {i}: {e}; set data.on_bad_record=skip to skip it") from None
            skipped += 1
            continue
        rows.append(pair_rows(truncate_pair(pair, seq_len + 1, max_prompt_len), seq_len))
    if not rows:
        raise ValueError(f"{where}: no usable preference records")
    return stack_pairs(rows), skipped


def stack_pairs(rows: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Pair rows stacked into arrays ``[num_pairs, 2, seq_len]``."""
    return {k: np.stack([r[k] for r in rows]) for k in pipeline.BATCH_KEYS}


def preference_dataset(pairs: Mapping[str, np.ndarray], *, batch_size: int, seed: int, train: bool,
                       ref_logps: np.ndarray | None = None) -> grain.DatasetIterator:
    """Batches of pairs from stacked arrays (plus ``ref_logps`` ``[num_pairs, 2]`` if given).

    ``train``: shuffled every epoch, forever; otherwise in order, one pass.
    """
    arrays = dict(pairs, **({"ref_logps": ref_logps} if ref_logps is not None else {}))
    count = len(arrays["tokens"])
    rows = grain.MapDataset.range(count).map(lambda i: {k: v[i] for k, v in arrays.items()})
    return pipeline.batch_iterator(rows, batch_size=batch_size, seed=seed, shuffle=train,
                                   num_epochs=None if train else 1)
