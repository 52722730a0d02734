"""Evaluation: perplexity and bits-per-byte on text, multiple-choice scoring by log-likelihood.

- ``perplexity``: every document is ``[start] + encode(text)`` (``start`` is eos, the document
  separator the pretraining stream puts before each document; bos when there is no eos). Documents
  longer than ``window`` tokens are scored with a sliding window: windows start every ``stride``
  tokens and each scores only the targets the previous window did not, so every token is scored
  once, with at least ``window - stride`` tokens of context. Perplexity is ``exp(nll / tokens)``;
  bits-per-byte is ``nll / (ln 2 · bytes)`` with ``bytes`` the UTF-8 length of the decoded
  documents, so it compares models with different tokenizers.
- ``score_choices``: full-continuation scoring. Each choice is the continuation ``" " + choice``
  of ``"Question: {question}\\nAnswer:"``; the prediction is the choice with the largest summed
  log-prob (``accuracy``) or summed log-prob per byte of the continuation (``accuracy_norm``).
- ``score_letters``: C-Eval-style single-letter scoring. A k-shot prompt of solved examples
  (``question``, ``A. choice`` lines, ``Answer: X``), then the question with ``Answer:``; the
  prediction is the letter whose token has the largest logit at the next position.

Multiple-choice data is JSONL, one ``{"question": str, "choices": [str, ...], "answer": int | "B"}``
per line (``answer``: 0-based index or letter); ``read_choices`` names the file and line of a bad
record. ``eval_hook`` bundles the tokenized tasks into ``params -> metrics`` for a training loop.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from maxlm.data.sources import BadRecordError
from maxlm.generate import jitted
from maxlm.models import Model
from maxlm.train.objectives import pair_logps, sequence_logps

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
Params = Any


class Tokenizer(Protocol):
    eos_id: int
    bos_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


@dataclasses.dataclass(frozen=True)
class Question:
    question: str
    choices: tuple[str, ...]
    answer: int  # index into choices


# ----------------------------------------------------------------------------- input


def read_choices(path: str) -> list[Question]:
    """Multiple-choice records of a JSONL file; a bad record raises ``BadRecordError`` naming file:line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"multiple-choice file {path!r} does not exist")
    questions = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                questions.append(_question(line, f"{path}:{lineno}"))
    if not questions:
        raise BadRecordError(f"{path}: no records")
    return questions


def _question(line: str, where: str) -> Question:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecordError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise BadRecordError(f"{where}: expected a JSON object, got {type(record).__name__}")
    missing = [k for k in ("question", "choices", "answer") if k not in record]
    if missing:
        raise BadRecordError(f"{where}: missing field {missing[0]!r} (keys: {sorted(record)})")
    question, choices, answer = record["question"], record["choices"], record["answer"]
    if not isinstance(question, str) or not question.strip():
        raise BadRecordError(f"{where}: 'question' must be a non-empty string")
    if (not isinstance(choices, list) or not 2 <= len(choices) <= len(LETTERS)
            or not all(isinstance(c, str) and c.strip() for c in choices)):
        raise BadRecordError(f"{where}: 'choices' must be a list of 2 to {len(LETTERS)} non-empty strings")
    letters = LETTERS[: len(choices)]
    if isinstance(answer, str) and len(answer) == 1 and answer.upper() in letters:
        answer = letters.index(answer.upper())
    if isinstance(answer, bool) or not isinstance(answer, int) or not 0 <= answer < len(choices):
        raise BadRecordError(f"{where}: 'answer' must be a choice index 0-{len(choices) - 1} or a letter "
                             f"{letters[0]}-{letters[-1]}, got {json.dumps(answer)}")
    return Question(question, tuple(choices), answer)


def start_id(tokenizer: Tokenizer) -> int:
    """The token every scored document or prompt starts from: eos (the document separator), else bos."""
    for i in (tokenizer.eos_id, tokenizer.bos_id):
        if i is not None and i >= 0:
            return int(i)
    raise ValueError("the tokenizer has neither an eos nor a bos piece to start documents with")


# ----------------------------------------------------------------------------- scoring core


def _target_logprobs(model: Model, params, tokens, targets, mask):
    """Per row: summed log-prob of the masked targets and their count. Rows are right-padded, so under
    causal attention no real token sees the padding (one segment per row is enough)."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    rows = {"tokens": tokens, "targets": targets, "positions": positions, "segment_ids": jnp.ones_like(tokens),
            "loss_mask": mask}
    return sequence_logps(model, params, rows)[0], jnp.sum(mask, axis=1)


def _last_logprobs(model: Model, params, tokens, lengths):
    """Log-probs of the next token after each row's last real token: ``[batch, vocab]``."""
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
    segments = (positions < lengths[:, None]).astype(jnp.int32)
    logits, _ = model.apply(params, tokens, positions, segments)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    return jax.nn.log_softmax(last)


def _padded_length(n: int, limit: int) -> int:
    """A power of two >= n (at least 16, at most ``limit``): few shapes, few compilations."""
    return min(limit, max(16, 1 << (n - 1).bit_length()))


def _chunks(items: Sequence, size: int) -> Iterator[Sequence]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def score_rows(model: Model, params, rows: Sequence[tuple[list[int], list[float]]], *, window: int,
               batch_size: int = 8, desc: str = "", progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Summed target log-probs and target counts of ``rows``: ``(ids, mask)`` where ``mask[i]`` says
    whether ``ids[i + 1]`` is scored (``len(mask) == len(ids) - 1 <= window``)."""
    fn = jitted(_target_logprobs, model)
    sums, counts = [], []
    for chunk in tqdm(list(_chunks(rows, batch_size)), desc=desc, unit="batch", disable=not progress, leave=False):
        length = _padded_length(max(len(mask) for _, mask in chunk), window)
        tokens = np.zeros((batch_size, length + 1), np.int32)
        mask = np.zeros((batch_size, length), np.float32)
        for r, (ids, m) in enumerate(chunk):
            tokens[r, : len(ids)], mask[r, : len(m)] = ids, m
        s, c = fn(params, tokens[:, :-1], tokens[:, 1:], mask)
        sums.append(np.asarray(s)[: len(chunk)])
        counts.append(np.asarray(c)[: len(chunk)])
    return np.concatenate(sums), np.concatenate(counts)


def window_rows(ids: Sequence[int], window: int, stride: int) -> list[tuple[list[int], list[float]]]:
    """Sliding windows over one token sequence; together they score every ``ids[1:]`` exactly once."""
    if not 0 < stride <= window:
        raise ValueError(f"stride={stride} must be in [1, window={window}]")
    rows, begin, scored = [], 0, 0  # scored: the last target index already scored
    while scored < len(ids) - 1:
        end = min(begin + window, len(ids) - 1)  # the window's last target index
        rows.append((list(ids[begin:end + 1]), [float(j > scored) for j in range(begin + 1, end + 1)]))
        scored, begin = end, begin + stride
    return rows


# ----------------------------------------------------------------------------- text


def _window(model: Model, window: int | None) -> int:
    window = window or model.cfg.max_seq_len
    if window > model.cfg.max_seq_len:
        raise ValueError(f"window={window} exceeds the model's max_seq_len={model.cfg.max_seq_len}")
    return window


def tokenize_texts(tokenizer: Tokenizer, texts: Iterable[str]) -> list[tuple[list[int], int]]:
    """``([start] + ids, UTF-8 bytes of decode(ids))`` per non-empty document."""
    start = start_id(tokenizer)
    docs = []
    for text in texts:
        ids = list(tokenizer.encode(text))
        if ids:
            docs.append(([start] + ids, len(tokenizer.decode(ids).encode("utf-8"))))
    if not docs:
        raise ValueError("no document has any token to score")
    return docs


def perplexity(model: Model, params, docs: Sequence[tuple[list[int], int]], *, window: int | None = None,
               stride: int | None = None, batch_size: int = 8, progress: bool = False) -> dict[str, float]:
    """Perplexity and bits-per-byte of tokenized documents (``tokenize_texts``).

    ``window`` defaults to the model's ``max_seq_len``, ``stride`` to half the window.
    """
    window = _window(model, window)
    rows = [row for ids, _ in docs for row in window_rows(ids, window, stride or max(1, window // 2))]
    sums, counts = score_rows(model, params, rows, window=window, batch_size=batch_size, desc="perplexity",
                              progress=progress)
    nll, tokens, nbytes = -float(sums.sum(dtype=np.float64)), int(counts.sum()), sum(b for _, b in docs)
    return {"documents": len(docs), "tokens": tokens, "bytes": nbytes, "nll": nll,
            "loss": nll / tokens, "perplexity": math.exp(nll / tokens),
            "bits_per_byte": nll / (math.log(2) * nbytes) if nbytes else float("nan")}


# ----------------------------------------------------------------------------- multiple choice


def choice_prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def score_choices(model: Model, params, tokenizer: Tokenizer, questions: Sequence[Question], *,
                  window: int | None = None, batch_size: int = 8, progress: bool = False) -> dict[str, Any]:
    """Full-continuation scoring: accuracy by summed log-prob and by log-prob per continuation byte."""
    window, start = _window(model, window), start_id(tokenizer)
    rows, nbytes = [], []
    for q in questions:
        context = [start] + list(tokenizer.encode(choice_prompt(q.question)))
        for choice in q.choices:
            continuation = list(tokenizer.encode(" " + choice))
            if len(continuation) >= window:
                raise ValueError(f"choice {choice[:40]!r} is {len(continuation)} tokens: no room in window={window}")
            ids = (context + continuation)[-(window + 1):]
            rows.append((ids, [0.0] * (len(ids) - 1 - len(continuation)) + [1.0] * len(continuation)))
            nbytes.append(len((" " + choice).encode("utf-8")))
    sums, _ = score_rows(model, params, rows, window=window, batch_size=batch_size, desc="choices",
                         progress=progress)
    per_byte = sums / np.asarray(nbytes)
    pred, pred_norm, i = [], [], 0
    for q in questions:
        n = len(q.choices)
        pred.append(int(np.argmax(sums[i:i + n])))
        pred_norm.append(int(np.argmax(per_byte[i:i + n])))
        i += n
    answers = np.asarray([q.answer for q in questions])
    return {"questions": len(questions), "accuracy": float(np.mean(np.asarray(pred) == answers)),
            "accuracy_norm": float(np.mean(np.asarray(pred_norm) == answers)),
            "chance": float(np.mean([1 / len(q.choices) for q in questions])),
            "predictions": pred, "predictions_norm": pred_norm}


def letter_block(q: Question, answer_sep: str, with_answer: bool) -> str:
    """``question / A. choice ... / Answer:`` (+ ``answer_sep`` and, for a solved shot, the letter)."""
    lines = [q.question] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(q.choices)]
    text = "\n".join(lines) + "\nAnswer:" + answer_sep
    return text + f"{LETTERS[q.answer]}\n\n" if with_answer else text


def letter_ids(tokenizer: Tokenizer, n: int) -> tuple[str, list[int]]:
    """How ``Answer:`` is followed by a letter as one token: ``("", ids of " A"...)`` when the
    tokenizer has space-prefixed letter pieces, else ``(" ", ids of "A"...)`` (character vocabularies)."""
    for sep, prefix in (("", " "), (" ", "")):
        ids = [list(tokenizer.encode(prefix + letter)) for letter in LETTERS[:n]]
        if all(len(i) == 1 for i in ids) and len({i[0] for i in ids}) == n:
            return sep, [i[0] for i in ids]
    raise ValueError(f"the tokenizer has no single-token pieces for the letters {LETTERS[:n]}")


def score_letters(model: Model, params, tokenizer: Tokenizer, questions: Sequence[Question], *,
                  shots: Sequence[Question] = (), window: int | None = None, batch_size: int = 8,
                  progress: bool = False) -> dict[str, Any]:
    """C-Eval-style scoring: after a k-shot prompt, the letter with the largest next-token logit."""
    window, start = _window(model, window), start_id(tokenizer)
    sep, ids = letter_ids(tokenizer, max(len(q.choices) for q in list(questions) + list(shots)))
    prefix = "".join(letter_block(s, sep, True) for s in shots)
    prompts = [([start] + list(tokenizer.encode(prefix + letter_block(q, sep, False))))[-window:]
               for q in questions]
    fn = jitted(_last_logprobs, model)
    pred, order = [], list(range(len(prompts)))
    for chunk in tqdm(list(_chunks(order, batch_size)), desc="letters", unit="batch", disable=not progress,
                      leave=False):
        length = _padded_length(max(len(prompts[i]) for i in chunk), window)
        tokens = np.zeros((batch_size, length), np.int32)
        lengths = np.ones(batch_size, np.int32)
        for r, i in enumerate(chunk):
            tokens[r, : len(prompts[i])], lengths[r] = prompts[i], len(prompts[i])
        logp = np.asarray(fn(params, tokens, lengths))
        for r, i in enumerate(chunk):
            pred.append(int(np.argmax(logp[r, ids[: len(questions[i].choices)]])))
    answers = np.asarray([q.answer for q in questions])
    return {"questions": len(questions), "shots": len(shots), "accuracy": float(np.mean(np.asarray(pred) == answers)),
            "chance": float(np.mean([1 / len(q.choices) for q in questions])), "predictions": pred}


# ----------------------------------------------------------------------------- reporting and hook


def preference_accuracy(model: Model, params, pairs: dict[str, np.ndarray], *, batch_size: int = 8,
                        progress: bool = False) -> dict[str, float]:
    """How often a pair's chosen completion gets the higher summed log-prob (the model's own preference,
    no reference): ``accuracy``, the mean log-prob ``margin`` (chosen - rejected) and the number of ``pairs``.

    ``pairs``: ``[N, 2, seq_len]`` Batch arrays (chosen, rejected) from ``data.preference.records_to_pairs``.
    """
    fn = jax.jit(lambda p, b: pair_logps(model, p, b)[0])
    count = len(pairs["tokens"])
    logps = []
    for start in tqdm(range(0, count, batch_size), desc="preference", unit="batch", disable=not progress,
                      leave=False):
        index = np.arange(start, start + batch_size) % count  # one shape: the last batch wraps around
        logps.append(np.asarray(fn(params, {k: v[index] for k, v in pairs.items()}))[: count - start])
    margin = np.concatenate(logps)[:, 0] - np.concatenate(logps)[:, 1]
    return {"accuracy": float(np.mean(margin > 0)), "margin": float(np.mean(margin)), "pairs": count}


def format_table(results: dict[str, dict[str, Any]]) -> str:
    """A plain-text table of every scalar metric of every task."""
    rows = [(task, key, value) for task, metrics in results.items() for key, value in metrics.items()
            if isinstance(value, (int, float))]
    width = max([len(t) for t, _, _ in rows] + [4])
    key_width = max([len(k) for _, k, _ in rows] + [6])
    fmt = lambda v: f"{v:d}" if isinstance(v, int) else f"{v:.4f}"
    lines = [f"{'task':<{width}}  {'metric':<{key_width}}  value", f"{'-' * width}  {'-' * key_width}  -----"]
    lines += [f"{t:<{width}}  {k:<{key_width}}  {fmt(v)}" for t, k, v in rows]
    return "\n".join(lines)


def eval_hook(model: Model, tokenizer: Tokenizer, *, texts: Sequence[str] = (), questions: Sequence[Question] = (),
              letter_questions: Sequence[Question] = (), shots: Sequence[Question] = (), window: int | None = None,
              stride: int | None = None, batch_size: int = 8) -> Callable[[Params], dict[str, float]]:
    """``hook(params) -> {"eval/perplexity", "eval/bits_per_byte", "eval/mc_accuracy", ...}`` for a
    training loop's eval steps; the texts are tokenized once, here."""
    docs = tokenize_texts(tokenizer, texts) if texts else []

    def hook(params) -> dict[str, float]:
        metrics = {}
        if docs:
            ppl = perplexity(model, params, docs, window=window, stride=stride, batch_size=batch_size)
            metrics.update({"eval/perplexity": ppl["perplexity"], "eval/bits_per_byte": ppl["bits_per_byte"]})
        if questions:
            mc = score_choices(model, params, tokenizer, questions, window=window, batch_size=batch_size)
            metrics.update({"eval/mc_accuracy": mc["accuracy"], "eval/mc_accuracy_norm": mc["accuracy_norm"]})
        if letter_questions:
            metrics["eval/letter_accuracy"] = score_letters(model, params, tokenizer, letter_questions, shots=shots,
                                                            window=window, batch_size=batch_size)["accuracy"]
        return metrics

    return hook
