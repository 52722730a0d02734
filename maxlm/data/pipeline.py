"""Grain pipelines that turn documents or tokenized examples into Batches.

A Batch is a dict of numpy arrays, all ``[batch, seq_len]``:
  tokens (int32), targets (int32, the next token), loss_mask (float32, 1 where the target counts),
  segment_ids (int32, 0 = padding, 1..k = examples packed into the row),
  positions (int32, restarting at 0 in each segment).

Every pipeline returns a ``grain.DatasetIterator``: deterministic for a seed, and resumable
exactly with ``get_state()``/``set_state()`` (or ``grain.checkpoint.CheckpointSave``).

Multi-host: all processes build the same globally shuffled element order and process ``p`` of
``S`` takes elements ``p, p+S, p+2S, ...``; its batches have ``batch_size // S`` rows. So for
windows and mixtures the global batch at step ``t`` is the same set of rows for any number of
processes (packed rows are packed per process, after the split).
"""

from __future__ import annotations

import functools
import itertools
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

from absl import logging
import grain
import numpy as np
import tqdm

from maxlm.data.sources import DocumentSource, OnBadRecord
from maxlm.data.tokenizer import Tokenizer

Batch = dict[str, np.ndarray]
BATCH_KEYS = ("tokens", "targets", "loss_mask", "segment_ids", "positions")
# Light prefetching: the work per element is tiny and the machine may have 2 cores.
DEFAULT_READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)
# Token windows cost ~0.2 ms a batch to make in the calling thread; handing them over from a prefetch thread
# costs more than that (~0.45 ms of CPU a batch in all), and the host runs ahead of the devices anyway.
WINDOW_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


def _shard(shard_index: int | None, shard_count: int | None) -> tuple[int, int]:
    """Defaults to the JAX process index/count (read at call time, after jax.distributed init)."""
    if shard_index is None or shard_count is None:
        import jax

        shard_index = jax.process_index() if shard_index is None else shard_index
        shard_count = jax.process_count() if shard_count is None else shard_count
    if not 0 <= shard_index < shard_count:
        raise ValueError(f"shard_index={shard_index} must be in [0, shard_count={shard_count})")
    return shard_index, shard_count


def _check_positive(**values: int) -> None:
    for name, value in values.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")


# ---------------------------------------------------------------------------------------------
# Pretraining: one token stream cut into windows.


def tokenize_documents(
    source: DocumentSource, tokenizer: Tokenizer, *, add_eos: bool = True, docs_per_call: int = 512,
    num_threads: int = 2,
) -> np.ndarray:
    """Tokenizes every document into one int32 stream, each document followed by eos.

    Documents that tokenize to nothing are dropped (and counted in the log).
    """
    if add_eos and tokenizer.eos_id < 0:
        raise ValueError(f"add_eos=True but tokenizer {tokenizer.path!r} has no eos piece")
    start, n, empty = time.perf_counter(), len(source), 0
    pieces: list[np.ndarray] = []
    eos = np.asarray([tokenizer.eos_id], np.int32)
    with tqdm.tqdm(total=n, desc="tokenizing", unit="doc", disable=n < 10 * docs_per_call) as bar:
        for lo in range(0, n, docs_per_call):
            texts = [source[i] for i in range(lo, min(n, lo + docs_per_call))]
            for ids in tokenizer.encode_batch(texts, num_threads=num_threads):
                if not ids:
                    empty += 1
                    continue
                pieces.append(np.asarray(ids, np.int32))
                if add_eos:
                    pieces.append(eos)
            bar.update(len(texts))
    if not pieces:
        raise ValueError(f"empty corpus: none of the {n} documents has any token")
    tokens = np.concatenate(pieces)
    logging.info("tokenized %d documents (%d empty, dropped) into %d tokens in %.1fs",
                 n, empty, len(tokens), time.perf_counter() - start)
    return tokens


def split_tokens(tokens: np.ndarray, split: Literal["train", "val"], val_fraction: float) -> np.ndarray:
    """The first ``1 - val_fraction`` of the stream is train, the rest val (like nanoGPT)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    cut = int(round(len(tokens) * (1.0 - val_fraction)))
    if split == "train":
        return tokens[:cut]
    if split == "val":
        if cut == len(tokens):
            raise ValueError("split='val' needs val_fraction > 0")
        return tokens[cut:]
    raise ValueError(f"split must be 'train' or 'val', got {split!r}")


def _window_rows(tokens: np.ndarray, seq_len: int, index) -> Batch:
    """Window ``index`` (an int: one row) or windows ``index`` (an int array: rows ``[n, seq_len]``, one gather)."""
    windows = tokens[np.asarray(index)[..., None] * seq_len + np.arange(seq_len + 1)]
    shape = windows.shape[:-1] + (seq_len,)
    return {"tokens": windows[..., :-1], "targets": windows[..., 1:], "loss_mask": np.ones(shape, np.float32),
            "segment_ids": np.ones(shape, np.int32),
            "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), shape).copy()}


def _num_windows(tokens: np.ndarray, seq_len: int) -> int:
    _check_positive(seq_len=seq_len)
    num_windows = (len(tokens) - 1) // seq_len
    if num_windows < 1:
        raise ValueError(f"{len(tokens)} tokens are too few for one window of seq_len+1={seq_len + 1}")
    return num_windows


def pretrain_windows(tokens: np.ndarray, seq_len: int) -> grain.MapDataset:
    """Unbatched Batch rows: window ``i`` is ``tokens[i*seq_len : i*seq_len + seq_len + 1]``.

    Windows overlap by one token so every token but the first is a target exactly once.
    """
    tokens = np.asarray(tokens, np.int32)
    return grain.MapDataset.range(_num_windows(tokens, seq_len)).map(
        functools.partial(_window_rows, tokens, seq_len))


def batch_iterator(
    rows: grain.MapDataset,
    *,
    batch_size: int,
    seed: int,
    shuffle: bool = True,
    num_epochs: int | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
    gather: Callable[[np.ndarray], Batch] | None = None,
) -> grain.DatasetIterator:
    """Shuffles (per epoch), repeats (``num_epochs=None``: forever), shards and batches rows.

    ``batch_size`` is global; each process gets ``batch_size // shard_count`` rows per batch.
    Incomplete last batches are dropped so shapes never change. ``gather``: the rows are indices,
    and it makes a whole Batch from each batch of them at once (cheaper than a map per row).
    """
    _check_positive(batch_size=batch_size)
    shard_index, shard_count = _shard(shard_index, shard_count)
    if batch_size % shard_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by shard_count={shard_count}")
    ds = rows.shuffle(seed=seed) if shuffle else rows
    if len(ds) != sys.maxsize and num_epochs != 1:  # an infinite dataset (a mixture) is not repeated
        ds = ds.repeat(num_epochs)
    ds = ds[shard_index::shard_count].batch(batch_size // shard_count, drop_remainder=True)
    if gather is not None:
        ds = ds.map(gather)
    if len(ds) == 0:
        raise ValueError(
            f"{len(rows)} rows give no full batch of {batch_size // shard_count} rows per process "
            f"({shard_count} processes)"
        )
    return iter(ds.to_iter_dataset(read_options or DEFAULT_READ_OPTIONS))


def pretrain_dataset(
    docs_source: DocumentSource | np.ndarray,
    tokenizer: Tokenizer | None,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    split: Literal["train", "val"] = "train",
    val_fraction: float = 0.1,
    add_eos: bool = True,
    shard_index: int | None = None,
    shard_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """Batches of ``seq_len``-token windows from a document source.

    The corpus is tokenized once into a stream (documents separated by eos); pass the stream
    itself (from ``tokenize_documents``) as ``docs_source`` to tokenize once for train and val.
    ``split='train'``: the first ``1 - val_fraction`` of the stream, shuffled with ``seed``,
    reshuffled every epoch, repeating forever. ``split='val'``: the rest, in order, one pass
    (a finite iterator; build a new one for every evaluation).
    """
    if isinstance(docs_source, np.ndarray):
        tokens = docs_source
    else:
        if tokenizer is None:
            raise ValueError("a tokenizer is needed to tokenize a document source")
        tokens = tokenize_documents(docs_source, tokenizer, add_eos=add_eos)
    tokens = np.asarray(split_tokens(tokens, split, val_fraction), np.int32)
    num_windows = _num_windows(tokens, seq_len)
    logging.info("pretrain %s: %d windows of %d tokens (%d batches of %d per epoch)",
                 split, num_windows, seq_len, num_windows // batch_size, batch_size)
    train = split == "train"
    return batch_iterator(
        grain.MapDataset.range(num_windows), batch_size=batch_size, seed=seed, shuffle=train,
        num_epochs=None if train else 1, shard_index=shard_index, shard_count=shard_count,
        read_options=read_options or WINDOW_READ_OPTIONS, gather=functools.partial(_window_rows, tokens, seq_len),
    )


# ---------------------------------------------------------------------------------------------
# Fine-tuning: whole tokenized examples packed into rows.


class _PrepareExample:
    """Shifts one example into (tokens, targets, loss_mask) pairs and polices its length.

    An example of ``n`` tokens gives ``n - 1`` pairs: its last token is only a target, so
    targets never cross into the next example. ``loss_mask[j]`` of the example says whether
    token ``j`` counts as a target; the row's loss_mask is therefore ``example_mask[1:]``.
    """

    def __init__(self, seq_len: int, truncate: bool, on_bad_record: OnBadRecord):
        if on_bad_record not in ("error", "skip"):
            raise ValueError(f"on_bad_record must be 'error' or 'skip', got {on_bad_record!r}")
        self.seq_len, self.truncate, self.on_bad_record = seq_len, truncate, on_bad_record
        self._skipped = itertools.count(1)
        self._truncated = itertools.count(1)

    def _bad(self, message: str) -> None:
        if self.on_bad_record == "error":
            raise ValueError(f"{message}; pass truncate=True or on_bad_record='skip'")
        n = next(self._skipped)
        if n <= 10 or n % 1000 == 0:
            logging.warning("packing: skipped %s (%d skipped so far)", message, n)

    def __call__(self, index: int, example: Mapping[str, Any]) -> Batch | None:
        try:
            tokens = np.asarray(example["tokens"], np.int32)
        except KeyError:
            raise ValueError(f"example {index} has no 'tokens' (keys: {sorted(example)})") from None
        mask = np.asarray(example.get("loss_mask", np.ones_like(tokens)), np.float32)
        if tokens.ndim != 1 or mask.shape != tokens.shape:
            raise ValueError(f"example {index}: tokens {tokens.shape} and loss_mask {mask.shape} must be equal 1-D")
        if len(tokens) < 2:
            self._bad(f"example {index} has {len(tokens)} tokens, fewer than 2 (an input and its target)")
            return None
        if len(tokens) > self.seq_len + 1:
            message = f"example {index} has {len(tokens)} tokens, more than seq_len+1={self.seq_len + 1}"
            if not self.truncate:
                self._bad(message)
                return None
            n = next(self._truncated)
            if n <= 10 or n % 1000 == 0:
                logging.warning("packing: truncated %s (%d truncated so far)", message, n)
            tokens, mask = tokens[: self.seq_len + 1], mask[: self.seq_len + 1]
        return {"tokens": tokens[:-1], "targets": tokens[1:], "loss_mask": mask[1:]}


def padded_rows(sequences: Sequence[tuple[np.ndarray, np.ndarray]], seq_len: int) -> Batch:
    """One row ``[len(sequences), seq_len]`` per ``(tokens, loss_mask)`` of at most ``seq_len + 1`` tokens, shifted
    like a packed example (``loss_mask[j]``: token j counts as a target) and padded after its end (segment 0)."""
    rows = {k: np.zeros((len(sequences), seq_len), np.int32) for k in ("tokens", "targets", "segment_ids", "positions")}
    rows["loss_mask"] = np.zeros((len(sequences), seq_len), np.float32)
    for i, (tokens, mask) in enumerate(sequences):
        n = len(tokens) - 1
        rows["tokens"][i, :n], rows["targets"][i, :n], rows["loss_mask"][i, :n] = tokens[:-1], tokens[1:], mask[1:]
        rows["segment_ids"][i, :n], rows["positions"][i, :n] = 1, np.arange(n)
    return rows


def _packed_row(row: Mapping[str, np.ndarray]) -> Batch:
    return {
        "tokens": row["tokens"],
        "targets": row["targets"],
        "loss_mask": row["loss_mask"].astype(np.float32),
        "segment_ids": row["tokens_segment_ids"].astype(np.int32),
        "positions": row["tokens_positions"].astype(np.int32),
    }


def packed_dataset(
    examples: Sequence[Mapping[str, Any]] | grain.MapDataset,
    *,
    seq_len: int,
    batch_size: int,
    seed: int,
    num_epochs: int | None = None,
    truncate: bool = False,
    on_bad_record: OnBadRecord = "error",
    shard_index: int | None = None,
    shard_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
    """Batches of whole tokenized examples packed first-fit into ``seq_len`` rows.

    ``examples[i]`` is ``{'tokens': int[n], 'loss_mask': float[n]}`` (loss_mask optional, all 1),
    where ``loss_mask[j]`` says whether token ``j`` is to be predicted. Each example contributes
    ``n - 1`` positions (see ``_PrepareExample``); segment_ids number the examples in a row from
    1, positions restart at 0, padding has segment 0, token/target 0 and loss_mask 0.

    Examples with more than ``seq_len + 1`` tokens (or fewer than 2) raise ValueError naming the
    example; ``truncate=True`` cuts long ones, ``on_bad_record='skip'`` skips them (logged with a
    running count). Shuffled with ``seed`` each epoch; ``num_epochs=None`` repeats forever.
    """
    _check_positive(seq_len=seq_len, batch_size=batch_size)
    shard_index, shard_count = _shard(shard_index, shard_count)
    if batch_size % shard_count:
        raise ValueError(f"batch_size={batch_size} is not divisible by shard_count={shard_count}")
    rows_per_batch = batch_size // shard_count
    ds = examples if isinstance(examples, grain.MapDataset) else grain.MapDataset.source(examples)
    ds = ds.map_with_index(_PrepareExample(seq_len, truncate, on_bad_record))
    ds = ds.filter(lambda x: x is not None).shuffle(seed=seed)
    if num_epochs != 1:
        ds = ds.repeat(num_epochs)
    packed = grain.experimental.FirstFitPackIterDataset(
        ds[shard_index::shard_count].to_iter_dataset(read_options or DEFAULT_READ_OPTIONS),
        length_struct={"tokens": seq_len, "targets": seq_len, "loss_mask": seq_len},
        num_packing_bins=rows_per_batch,
        seed=seed,
        shuffle_bins=True,
    )
    return iter(packed.map(_packed_row).batch(rows_per_batch, drop_remainder=True))


# ---------------------------------------------------------------------------------------------
# Mixtures.


def mixture_dataset(
    components: Sequence[tuple[grain.MapDataset | Sequence[Any], float]], seed: int
) -> grain.MapDataset:
    """An infinite dataset drawing from each component in proportion to its weight.

    Each component (a MapDataset of rows, e.g. ``pretrain_windows(...)``, or any random-access
    source) is shuffled with its own seed, reshuffled every epoch and repeated forever, then
    ``grain.MapDataset.mix`` interleaves them deterministically in exact weight proportions.
    Feed the result to ``batch_iterator(..., shuffle=False)``.
    """
    if not components:
        raise ValueError("mixture_dataset needs at least one (dataset, weight) pair")
    datasets, weights = [], []
    for i, (ds, weight) in enumerate(components):
        if not weight > 0:
            raise ValueError(f"mixture component {i} has weight {weight}; weights must be > 0")
        ds = ds if isinstance(ds, grain.MapDataset) else grain.MapDataset.source(ds)
        if len(ds) == 0:
            raise ValueError(f"mixture component {i} is empty")
        if len(ds) != sys.maxsize:
            ds = ds.shuffle(seed=seed + i).repeat()
        datasets.append(ds)
        weights.append(float(weight))
    return grain.MapDataset.mix(datasets, weights)


def mixture_epochs(
    component_tokens: Sequence[int], weights: Sequence[float], total_tokens: int,
    names: Sequence[str] | None = None,
) -> dict[str, float]:
    """How many epochs of each component ``total_tokens`` of training realise; also logged.

    ``component_tokens`` are the components' sizes in tokens (rows x seq_len for windows).
    """
    if len(component_tokens) != len(weights):
        raise ValueError(f"{len(component_tokens)} component sizes but {len(weights)} weights")
    names = list(names) if names is not None else [f"component_{i}" for i in range(len(weights))]
    total_weight = float(sum(weights))
    epochs = {
        name: total_tokens * (w / total_weight) / size
        for name, size, w in zip(names, component_tokens, weights)
    }
    for name, size, w in zip(names, component_tokens, weights):
        logging.info("mixture %-20s weight %.3f  %12d tokens  -> %.2f epochs over %d training tokens",
                     name, w / total_weight, size, epochs[name], total_tokens)
    return epochs


def tokens_per_second(iterator: Iterator[Batch], n_batches: int, *, warmup: int = 5) -> float:
    """Pipeline throughput in tokens (rows x seq_len, padding included) per second."""
    for _ in range(warmup):
        next(iterator)
    start, count = time.perf_counter(), 0
    for _ in range(n_batches):
        count += next(iterator)["tokens"].size
    return count / (time.perf_counter() - start)
