"""Batched text generation with a KV cache (issue 9's core).

``generate(model, params, prompts, max_new_tokens=...)`` pads the prompts (left by default), runs a
jitted **prefill** over the whole prompt batch that fills a preallocated KV cache, then a jitted
**decode** loop (``lax.while_loop``, one token per row per step) that stops a row at ``eos_id`` and
the whole batch when every row stopped or ``max_new_tokens`` were made.

Cache slots are columns of one token buffer ``[batch, prompt_len + max_new_tokens]``: the prompt
occupies slots ``[0, prompt_len)`` (padding marked invalid), new token ``i`` goes to slot
``prompt_len + i`` in every row, and each slot keeps its own per-row position (0 at a row's first
real token), so padding never shifts positions and is never attended to.

Logits processors are pure functions ``processor(logits, ctx) -> logits`` over float32 logits
``[batch, vocab]`` with ``ctx`` a :class:`Context` (the token buffer, its valid mask, the step).
The built-in ones are small frozen dataclasses; pass your own in ``processors=`` (they run after
the built-in penalties and before temperature / top-k / top-p).

``beam_search`` (``generate(num_beams=k)``) keeps ``k`` beams per prompt in one cache of
``batch * k`` rows, reordered by beam parent every step; finished hypotheses are ranked by
log-prob / length ** ``length_penalty``. ``stream`` runs the same prefill and step as ``generate``
with the loop on the host, yielding each step's tokens as they are made (``launch/generate.py``).

``decode_without_cache`` runs the same loop recomputing the full prefix every step: the reference
for tests and the baseline of ``benchmarks/generate.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from maxlm.models import Model

NEG_INF = -jnp.inf


class Context(NamedTuple):
    """What a logits processor may look at (all ``[batch, slots]`` except ``step``)."""

    tokens: jax.Array  # prompt and generated tokens so far (later slots hold pad_id)
    valid: jax.Array  # True at real (non-padding, already written) tokens
    generated: jax.Array  # True at generated tokens
    step: jax.Array  # number of tokens generated so far (scalar int32)


Processor = Callable[[jax.Array, Context], jax.Array]


# ----------------------------------------------------------------------------- processors


def top_k_mask(logits, k: int):
    """Keeps the ``k`` largest logits per row (ties with the k-th are kept), the rest -> -inf."""
    if not k or k >= logits.shape[-1]:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, NEG_INF)


def top_p_mask(logits, p: float):
    """Nucleus: keeps the smallest set of most likely tokens whose probability reaches ``p``."""
    if p is None or p >= 1.0:
        return logits
    sorted_logits = jnp.flip(jnp.sort(logits, axis=-1), axis=-1)
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = (mass_before < p) | (jnp.arange(logits.shape[-1]) == 0)  # the top token is always kept
    threshold = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, NEG_INF)


def _presence(ctx: Context, vocab: int):
    """``[batch, vocab]`` bool: which tokens occur among the row's real tokens."""
    rows = jnp.arange(ctx.tokens.shape[0])[:, None]
    return jnp.zeros((ctx.tokens.shape[0], vocab), jnp.bool_).at[rows, ctx.tokens].max(ctx.valid)


@dataclasses.dataclass(frozen=True)
class RepetitionPenalty:
    """CTRL/HF repetition penalty over prompt and generated tokens: positive logits / p, negative * p."""

    penalty: float

    def __call__(self, logits, ctx: Context):
        seen = _presence(ctx, logits.shape[-1])
        penalised = jnp.where(logits > 0, logits / self.penalty, logits * self.penalty)
        return jnp.where(seen, penalised, logits)


@dataclasses.dataclass(frozen=True)
class NoRepeatNgram:
    """Bans any token that would complete an n-gram already present in the row (prompt included).

    n-grams are matched over consecutive slots, so they do not straddle padding (left padding,
    the default, keeps every row's tokens contiguous).
    """

    n: int

    def __call__(self, logits, ctx: Context):
        n, (b, s) = self.n, ctx.tokens.shape
        if n <= 1:
            return logits
        end = _last_slot(ctx) + 1  # [b] one past the last real token
        # the last n-1 tokens of each row
        offs = jnp.arange(n - 1)
        tail_idx = end[:, None] - (n - 1) + offs  # [b, n-1]
        tail = jnp.take_along_axis(ctx.tokens, jnp.clip(tail_idx, 0, s - 1), axis=1)
        tail_ok = jnp.all(jnp.take_along_axis(ctx.valid, jnp.clip(tail_idx, 0, s - 1), axis=1), -1) & (
            tail_idx[:, 0] >= 0)
        # every window of n slots starting at j: tokens[j:j+n-1] == tail and tokens[j+n-1] real
        starts = jnp.arange(s - n + 1)
        win = starts[:, None] + jnp.arange(n)  # [w, n]
        win_tok, win_ok = ctx.tokens[:, win], ctx.valid[:, win]  # [b, w, n]
        match = jnp.all(win_tok[:, :, :-1] == tail[:, None, :], -1) & jnp.all(win_ok, -1)
        match &= tail_ok[:, None] & (starts[None, :] + n <= end[:, None])
        rows = jnp.broadcast_to(jnp.arange(b)[:, None], match.shape)
        banned = jnp.zeros(logits.shape, jnp.bool_).at[rows, win_tok[:, :, -1]].max(match)
        return jnp.where(banned, NEG_INF, logits)


def _last_slot(ctx: Context):
    """Index of each row's last real slot (-1 if none)."""
    s = ctx.tokens.shape[1]
    return jnp.max(jnp.where(ctx.valid, jnp.arange(s), -1), axis=-1)


@dataclasses.dataclass(frozen=True)
class ForbidTokens:
    """These token ids are never generated."""

    ids: tuple[int, ...]

    def __call__(self, logits, ctx: Context):
        return logits.at[:, jnp.asarray(self.ids, jnp.int32)].set(NEG_INF)


@dataclasses.dataclass(frozen=True)
class MinNewTokens:
    """``eos_id`` cannot be generated before ``min_new_tokens`` new tokens."""

    min_new_tokens: int
    eos_id: int

    def __call__(self, logits, ctx: Context):
        blocked = logits.at[:, self.eos_id].set(NEG_INF)
        return jnp.where(ctx.step < self.min_new_tokens, blocked, logits)


@dataclasses.dataclass(frozen=True)
class Sampler:
    """Temperature, then top-k, then top-p; temperature 0 is greedy (argmax)."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def warp(self, logits):
        if self.temperature > 0:
            logits = logits / self.temperature
        return top_p_mask(top_k_mask(logits, self.top_k), self.top_p)

    def __call__(self, logits, rng):
        if self.temperature == 0:
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return jax.random.categorical(rng, self.warp(logits), axis=-1).astype(jnp.int32)


def build_processors(*, eos_id=None, repetition_penalty: float = 1.0, no_repeat_ngram: int = 0,
                     forbidden_ids: Sequence[int] = (), min_new_tokens: int = 0,
                     processors: Sequence[Processor] = ()) -> tuple[Processor, ...]:
    """The processor chain from ``generate``'s keyword arguments, user processors last."""
    chain = []
    if repetition_penalty != 1.0:
        chain.append(RepetitionPenalty(float(repetition_penalty)))
    if no_repeat_ngram:
        chain.append(NoRepeatNgram(int(no_repeat_ngram)))
    if forbidden_ids:
        chain.append(ForbidTokens(tuple(int(i) for i in forbidden_ids)))
    if min_new_tokens and eos_id is not None:
        chain.append(MinNewTokens(int(min_new_tokens), int(eos_id)))
    return tuple(chain) + tuple(processors)


# ----------------------------------------------------------------------------- padding


def pad_prompts(prompts: Sequence[Sequence[int]], *, pad_id: int = 0, padding: str = "left", length=None):
    """Numpy ``tokens, positions, valid [batch, length]`` and ``lengths [batch]`` of padded prompts.

    Positions count from 0 at each row's first real token; padded slots get position 0, valid False.
    """
    if padding not in ("left", "right"):
        raise ValueError(f"padding must be 'left' or 'right', got {padding!r}")
    if len(prompts) == 0:
        raise ValueError("no prompts: give at least one")
    lengths = np.array([len(p) for p in prompts], np.int32)
    if (lengths == 0).any():
        raise ValueError("every prompt needs at least one token")
    length = length or int(lengths.max())
    tokens = np.full((len(prompts), length), pad_id, np.int32)
    positions = np.zeros((len(prompts), length), np.int32)
    valid = np.zeros((len(prompts), length), bool)
    for i, p in enumerate(prompts):
        cols = slice(length - len(p), length) if padding == "left" else slice(0, len(p))
        tokens[i, cols], positions[i, cols], valid[i, cols] = p, np.arange(len(p)), True
    return tokens, positions, valid, lengths


def pad_request(model: Model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, pad_id: int,
                padding: str = "left"):
    """``pad_prompts`` after checking the request: ``max_new_tokens >= 0``, prompt and pad ids in the
    vocabulary, the length limit (``check_length``)."""
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    tokens, positions, valid, lengths = pad_prompts(prompts, pad_id=pad_id, padding=padding)
    vocab = model.cfg.vocab_size
    if not 0 <= pad_id < vocab:  # pad_id fills padding and finished rows, which still run through the model
        raise ValueError(f"pad_id {pad_id} is outside the vocabulary [0, {vocab})")
    bad = np.argwhere(valid & ((tokens < 0) | (tokens >= vocab)))
    if len(bad):
        row, col = bad[0]
        raise ValueError(f"prompt {row} has token id {tokens[row, col]} outside the vocabulary [0, {vocab})")
    check_length(model, tokens.shape[1], max_new_tokens)
    return tokens, positions, valid, lengths


# ----------------------------------------------------------------------------- prefill / decode


def check_length(model: Model, prompt_len: int, max_new_tokens: int) -> None:
    """Learned position tables stop at ``max_seq_len``: a longer request is an error, not a clip."""
    if model.cfg.position == "learned" and prompt_len + max_new_tokens > model.cfg.max_seq_len:
        raise ValueError(
            f"prompt length {prompt_len} + max_new_tokens {max_new_tokens} exceeds the model's learned "
            f"position table (max_seq_len={model.cfg.max_seq_len})")


def _last_logits(logits, valid):
    """Each row's logits at its last valid slot: ``[batch, vocab]``."""
    last = jnp.max(jnp.where(valid, jnp.arange(valid.shape[1]), 0), axis=-1)
    return jnp.take_along_axis(logits, last[:, None, None], axis=1)[:, 0]


def prefill(model: Model, params, tokens, positions, valid, cache):
    """Runs the padded prompt batch into ``cache`` (slots ``[0, prompt_len)``).

    Returns each row's next-token logits ``[batch, vocab]`` (at its last real token, so left or
    right padding both work) and the filled cache. Jit it with ``model`` bound (see ``generate``).
    """
    logits, cache = model.apply_cached(params, tokens, positions, valid, cache, 0)
    return _last_logits(logits, valid), cache


class _Loop(NamedTuple):
    step: jax.Array
    logits: jax.Array  # [b, vocab] next-token logits
    model_state: object  # the KV cache, or None when recomputing
    tokens: jax.Array  # [b, slots]
    positions: jax.Array
    valid: jax.Array
    done: jax.Array  # [b]
    out: jax.Array  # [b, max_new]
    out_logits: jax.Array  # [b, max_new, vocab] (or [b, 0, 0] when not kept)


def _advance(s: _Loop, next_logits, lengths, rng, *, prompt_len: int, eos_id, pad_id: int, processors,
             sampler: Sampler, keep_logits: bool) -> _Loop:
    """One decode step: processors, sampling, eos bookkeeping, buffer writes, then the model on the new token."""
    generated_slots = jnp.arange(s.tokens.shape[1]) >= prompt_len
    ctx = Context(s.tokens, s.valid, generated_slots[None, :] & s.valid, s.step)
    logits = s.logits
    for proc in processors:
        logits = proc(logits, ctx)
    token = sampler(logits, jax.random.fold_in(rng, s.step))
    token = jnp.where(s.done, pad_id, token)
    ok = ~s.done
    done = s.done | (token == eos_id) if eos_id is not None else s.done
    slot = prompt_len + s.step
    pos = lengths + s.step
    out = s.out.at[:, s.step].set(token)
    out_logits = s.out_logits.at[:, s.step].set(s.logits) if keep_logits else s.out_logits
    tokens = jax.lax.dynamic_update_slice(s.tokens, token[:, None], (0, slot))
    positions = jax.lax.dynamic_update_slice(s.positions, pos[:, None], (0, slot))
    valid = jax.lax.dynamic_update_slice(s.valid, ok[:, None], (0, slot))
    new = s._replace(tokens=tokens, positions=positions, valid=valid)
    logits, model_state = next_logits(s.model_state, new, slot, token, pos, ok)
    return _Loop(s.step + 1, logits, model_state, tokens, positions, valid, done, out, out_logits)


def _decode_loop(next_logits, first_logits, model_state, tokens, positions, valid, lengths, rng, *,
                 prompt_len: int, max_new_tokens: int, eos_id, pad_id: int, processors, sampler: Sampler,
                 keep_logits: bool):
    """The shared while_loop; ``next_logits(model_state, loop_state, slot, token, pos, ok)`` runs the model."""
    init = _initial_loop(first_logits, model_state, tokens, positions, valid, max_new_tokens=max_new_tokens,
                         pad_id=pad_id, keep_logits=keep_logits)
    if max_new_tokens == 0:  # the loop body cannot even be traced against empty outputs
        return init.out, init.out_logits, init.step
    step = functools.partial(_advance, next_logits=next_logits, lengths=lengths, rng=rng, prompt_len=prompt_len,
                             eos_id=eos_id, pad_id=pad_id, processors=processors, sampler=sampler,
                             keep_logits=keep_logits)
    final = jax.lax.while_loop(lambda s: (s.step < max_new_tokens) & ~jnp.all(s.done), step, init)
    return final.out, final.out_logits, final.step


def _initial_loop(first_logits, model_state, tokens, positions, valid, *, max_new_tokens: int, pad_id: int,
                  keep_logits: bool) -> _Loop:
    b, vocab = first_logits.shape
    out_logits = jnp.zeros((b, max_new_tokens, vocab) if keep_logits else (b, 0, 0), jnp.float32)
    return _Loop(jnp.int32(0), first_logits, model_state, tokens, positions, valid, jnp.zeros(b, jnp.bool_),
                 jnp.full((b, max_new_tokens), pad_id, jnp.int32), out_logits)


def _extend(tokens, positions, valid, max_new_tokens, pad_id):
    pad = ((0, 0), (0, max_new_tokens))
    return (jnp.pad(tokens, pad, constant_values=pad_id), jnp.pad(positions, pad),
            jnp.pad(valid, pad, constant_values=False))


def _cached_next(model: Model, params):
    """``next_logits`` of the decode loop: the new token through the model against the KV cache."""
    def next_logits(cache, state, slot, token, pos, ok):
        logits, cache = model.apply_cached(params, token[:, None], pos[:, None], ok[:, None], cache, slot)
        return logits[:, 0], cache
    return next_logits


def decode_cached(model: Model, params, tokens, positions, valid, lengths, rng, *, max_new_tokens: int,
                  eos_id=None, pad_id: int = 0, processors=(), sampler: Sampler = Sampler(0.0),
                  keep_logits: bool = False):
    """Prefill + cached decode loop over a padded prompt batch ``[batch, prompt_len]``.

    Returns new tokens ``[batch, max_new_tokens]`` (``pad_id`` after a row's eos), the model's raw
    logits at each step, before the processors and the sampler (``[batch, max_new_tokens, vocab]`` if
    ``keep_logits``), and the steps run.
    """
    b, prompt_len = tokens.shape
    cache = model.init_cache(b, prompt_len + max_new_tokens)
    first, cache = prefill(model, params, tokens, positions, valid, cache)
    return _decode_loop(_cached_next(model, params), first, cache,
                        *_extend(tokens, positions, valid, max_new_tokens, pad_id), lengths, rng,
                        prompt_len=prompt_len, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
                        processors=processors, sampler=sampler, keep_logits=keep_logits)


def decode_without_cache(model: Model, params, tokens, positions, valid, lengths, rng, *, max_new_tokens: int,
                         eos_id=None, pad_id: int = 0, processors=(), sampler: Sampler = Sampler(0.0),
                         keep_logits: bool = False):
    """Same as ``decode_cached`` but every step reruns the model on the whole buffer (no cache)."""
    prompt_len = tokens.shape[1]
    buf = _extend(tokens, positions, valid, max_new_tokens, pad_id)

    def full(tokens, positions, valid):
        return _last_logits(model.apply(params, tokens, positions, valid.astype(jnp.int32))[0], valid)

    def next_logits(_, state, slot, token, pos, ok):
        # the row's newest token is at ``slot`` if it is still running; finished rows are ignored
        return full(state.tokens, state.positions, state.valid), None

    return _decode_loop(next_logits, full(*buf), None, *buf, lengths, rng, prompt_len=prompt_len,
                        max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, processors=processors,
                        sampler=sampler, keep_logits=keep_logits)


# ----------------------------------------------------------------------------- streaming


def _stream_start(model: Model, params, tokens, positions, valid, *, max_new_tokens: int, pad_id: int) -> _Loop:
    """Prefill into a fresh cache: the decode loop's initial state."""
    b, prompt_len = tokens.shape
    first, cache = prefill(model, params, tokens, positions, valid, model.init_cache(b, prompt_len + max_new_tokens))
    return _initial_loop(first, cache, *_extend(tokens, positions, valid, max_new_tokens, pad_id),
                         max_new_tokens=max_new_tokens, pad_id=pad_id, keep_logits=False)


def _stream_step(model: Model, params, state: _Loop, lengths, rng, *, prompt_len: int, eos_id, pad_id: int,
                 processors, sampler: Sampler) -> _Loop:
    return _advance(state, _cached_next(model, params), lengths, rng, prompt_len=prompt_len, eos_id=eos_id,
                    pad_id=pad_id, processors=processors, sampler=sampler, keep_logits=False)


def stream(model: Model, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id=None,
           pad_id: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
           repetition_penalty: float = 1.0, no_repeat_ngram: int = 0, forbidden_ids: Sequence[int] = (),
           min_new_tokens: int = 0, processors: Sequence[Processor] = (), seed: int = 0) -> Iterator[np.ndarray]:
    """Yields each step's new tokens ``[batch]`` (``pad_id`` for finished rows) as soon as they exist.

    The same prefill, step and sampling as ``generate`` (same seed, same tokens), but the loop runs on
    the host, one jitted step per token, so a caller can print tokens as they arrive.
    """
    tokens, positions, valid, lengths = pad_request(model, prompts, max_new_tokens=max_new_tokens, pad_id=pad_id)
    chain = build_processors(eos_id=eos_id, repetition_penalty=repetition_penalty,
                             no_repeat_ngram=no_repeat_ngram, forbidden_ids=forbidden_ids,
                             min_new_tokens=min_new_tokens, processors=processors)
    state = jitted(_stream_start, model, max_new_tokens=max_new_tokens, pad_id=pad_id)(
        params, tokens, positions, valid)
    step = jitted(_stream_step, model, prompt_len=tokens.shape[1], eos_id=eos_id, pad_id=pad_id,
                  processors=chain, sampler=Sampler(temperature, top_k, top_p))
    rng = jax.random.key(seed)
    for i in range(max_new_tokens):
        state = step(params, state, lengths, rng)
        new = np.asarray(state.out[:, i])
        yield new
        if bool(state.done.all()):
            return


# ----------------------------------------------------------------------------- beam search

_CACHE_BATCH_AXIS = {"k": 1, "v": 1, "pos": 0, "valid": 0}  # see transformer.init_cache


def _take_rows(cache: dict, rows) -> dict:
    """The cache rows ``rows`` (beam parents), in that order."""
    return {name: jnp.take(x, rows, axis=_CACHE_BATCH_AXIS[name]) for name, x in cache.items()}


class _Beams(NamedTuple):
    step: jax.Array
    logits: jax.Array  # [b * k, vocab] next-token logits of the alive beams
    cache: dict  # b * k rows, row r = (prompt r // k, beam r % k)
    tokens: jax.Array  # [b * k, slots] prompt and beam tokens (for the processors)
    positions: jax.Array
    valid: jax.Array
    scores: jax.Array  # [b, k] alive beams' summed log-probs
    seqs: jax.Array  # [b, k, max_new] alive beams' new tokens
    fin_scores: jax.Array  # [b, k] finished hypotheses' length-normalised scores, -inf when empty
    fin_seqs: jax.Array  # [b, k, max_new]
    done: jax.Array  # [b]


def _normalise(scores, length, length_penalty: float):
    return scores / jnp.asarray(length, jnp.float32) ** length_penalty


def beam_search(model: Model, params, tokens, positions, valid, lengths, *, num_beams: int, max_new_tokens: int,
                eos_id=None, pad_id: int = 0, processors=(), length_penalty: float = 1.0,
                early_stopping: bool = False):
    """Beam search over a padded prompt batch with one shared KV cache of ``batch * num_beams`` rows.

    Each step expands every alive beam by every token (processed logits, then log-softmax), keeps the
    best ``2 * num_beams`` candidates per prompt, moves those ending in ``eos_id`` to the finished
    hypotheses (score = summed log-prob / new_length ** ``length_penalty``) and the best
    ``num_beams`` others on as the alive beams; the cache rows are reordered to follow each beam's
    parent. A prompt is done once it has ``num_beams`` finished hypotheses and, unless
    ``early_stopping``, no alive beam can still beat the worst of them (an exact bound: log-probs
    only fall). At the end unfinished prompts also rank their alive beams.

    Returns ``(sequences [batch, num_beams, max_new_tokens], scores [batch, num_beams])``, best first;
    sequences hold ``pad_id`` after eos.
    """
    if max_new_tokens < 1:
        raise ValueError(f"beam search needs max_new_tokens >= 1, got {max_new_tokens}")
    b, prompt_len = tokens.shape
    k, n = num_beams, max_new_tokens
    first, cache = prefill(model, params, tokens, positions, valid, model.init_cache(b, prompt_len + n))
    vocab = first.shape[-1]
    rep = lambda x: jnp.repeat(x, k, axis=0)
    buf = [rep(x) for x in _extend(tokens, positions, valid, n, pad_id)]
    lengths = rep(lengths)
    generated_slots = jnp.arange(prompt_len + n) >= prompt_len
    pick = lambda x, idx: jnp.take_along_axis(x, idx.reshape(idx.shape + (1,) * (x.ndim - 2)), axis=1)

    def body(s: _Beams) -> _Beams:
        ctx = Context(s.tokens, s.valid, generated_slots[None, :] & s.valid, s.step)
        logits = s.logits
        for proc in processors:
            logits = proc(logits, ctx)
        cand = (s.scores[:, :, None] + jax.nn.log_softmax(logits).reshape(b, k, vocab)).reshape(b, k * vocab)
        top_scores, top_idx = jax.lax.top_k(cand, 2 * k)
        parent, token = top_idx // vocab, (top_idx % vocab).astype(jnp.int32)
        cand_seqs = pick(s.seqs, parent).at[:, :, s.step].set(token)
        is_eos = token == eos_id if eos_id is not None else jnp.zeros_like(token, jnp.bool_)
        # finished: the best k of the old finished and the new eos candidates (none once a prompt is done)
        new_fin = jnp.where(is_eos & ~s.done[:, None], _normalise(top_scores, s.step + 1, length_penalty), NEG_INF)
        fin_scores, fin_idx = jax.lax.top_k(jnp.concatenate([s.fin_scores, new_fin], 1), k)
        fin_seqs = pick(jnp.concatenate([s.fin_seqs, cand_seqs], 1), fin_idx)
        # alive: the best k candidates that did not end (at most k of the 2k end in eos)
        scores, alive_idx = jax.lax.top_k(jnp.where(is_eos, NEG_INF, top_scores), k)
        seqs, chosen = pick(cand_seqs, alive_idx), pick(token, alive_idx).reshape(-1)
        rows = (jnp.arange(b)[:, None] * k + pick(parent, alive_idx)).reshape(-1)
        slot, pos = prompt_len + s.step, lengths + s.step
        ok = jnp.ones_like(chosen, jnp.bool_)
        tokens = jax.lax.dynamic_update_slice(s.tokens[rows], chosen[:, None], (0, slot))
        positions = jax.lax.dynamic_update_slice(s.positions[rows], pos[:, None], (0, slot))
        valid = jax.lax.dynamic_update_slice(s.valid[rows], ok[:, None], (0, slot))
        logits, cache = model.apply_cached(params, chosen[:, None], pos[:, None], ok[:, None],
                                           _take_rows(s.cache, rows), slot)
        best_alive = _normalise(scores[:, 0], n if length_penalty > 0 else s.step + 1, length_penalty)
        full = fin_scores[:, -1] > NEG_INF
        done = s.done | (full if early_stopping else full & (fin_scores[:, -1] >= best_alive))
        return _Beams(s.step + 1, logits[:, 0], cache, tokens, positions, valid, scores, seqs, fin_scores,
                      fin_seqs, done)

    init_scores = jnp.where(jnp.arange(k) == 0, 0.0, NEG_INF)[None].repeat(b, 0)
    empty = jnp.full((b, k, n), pad_id, jnp.int32)
    init = _Beams(jnp.int32(0), rep(first), _take_rows(cache, jnp.repeat(jnp.arange(b), k)), *buf, init_scores,
                  empty, jnp.full((b, k), NEG_INF), empty, jnp.zeros(b, jnp.bool_))
    s = jax.lax.while_loop(lambda s: (s.step < n) & ~jnp.all(s.done), body, init)
    alive = jnp.where(s.done[:, None], NEG_INF, _normalise(s.scores, s.step, length_penalty))
    scores, idx = jax.lax.top_k(jnp.concatenate([s.fin_scores, alive], 1), k)
    return pick(jnp.concatenate([s.fin_seqs, s.seqs], 1), idx), scores


_JITTED: dict = {}


def jitted(fn, model: Model, **static):
    """``fn(model, params, tokens, positions, valid, lengths, rng, **static)`` jitted, cached per settings."""
    key = (fn, id(model), tuple(sorted(static.items())))
    hit = _JITTED.get(key)
    if hit is None or hit[0] is not model:
        hit = (model, jax.jit(lambda *args: fn(model, *args, **static)))
        _JITTED[key] = hit
    return hit[1]


def generate(model: Model, params, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, eos_id=None,
             pad_id: int = 0, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
             repetition_penalty: float = 1.0, no_repeat_ngram: int = 0, forbidden_ids: Sequence[int] = (),
             min_new_tokens: int = 0, processors: Sequence[Processor] = (), seed: int = 0,
             padding: str = "left", use_cache: bool = True, num_beams: int = 1, length_penalty: float = 1.0,
             early_stopping: bool = False) -> list[list[int]]:
    """New tokens for each prompt (up to and including eos, at most ``max_new_tokens``).

    Greedy by default (``temperature=0``); sampling is seeded by ``seed`` and reproducible.
    ``num_beams > 1`` runs ``beam_search`` (deterministic: no temperature/top-k/top-p) and returns
    each prompt's best beam. ``processors`` must be hashable (e.g. frozen dataclasses) so repeated
    calls reuse the compiled loop.
    """
    if num_beams > 1 and (temperature or top_k or top_p < 1.0 or not use_cache):
        raise ValueError("num_beams > 1 is deterministic and cached: leave temperature=0, top_k=0, top_p=1, "
                         "use_cache=True")
    tokens, positions, valid, lengths = pad_request(model, prompts, max_new_tokens=max_new_tokens, pad_id=pad_id,
                                                    padding=padding)
    chain = build_processors(eos_id=eos_id, repetition_penalty=repetition_penalty,
                             no_repeat_ngram=no_repeat_ngram, forbidden_ids=forbidden_ids,
                             min_new_tokens=min_new_tokens, processors=processors)
    common = dict(max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id, processors=chain)
    if num_beams > 1:
        fn = jitted(beam_search, model, num_beams=num_beams, length_penalty=float(length_penalty),
                    early_stopping=bool(early_stopping), **common)
        out = fn(params, tokens, positions, valid, lengths)[0][:, 0]
    else:
        fn = jitted(decode_cached if use_cache else decode_without_cache, model,
                    sampler=Sampler(temperature, top_k, top_p), **common)
        out = fn(params, tokens, positions, valid, lengths, jax.random.key(seed))[0]
    return [trim_at_eos(row, eos_id) for row in np.asarray(out).tolist()]


def trim_at_eos(row: list[int], eos_id) -> list[int]:
    """The row up to and including its first ``eos_id`` (all of it when there is none)."""
    return row[: row.index(eos_id) + 1] if eos_id is not None and eos_id in row else row
