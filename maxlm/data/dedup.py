"""Corpus cleaning: quality filters, exact-duplicate and MinHash-LSH near-duplicate removal.

Order: quality filters, then exact duplicates, then near duplicates among what is left. Of each
group of duplicates the document with the lowest index is kept.

Near duplicates: documents are normalised (lower-cased, whitespace runs collapsed) and cut into
shingles, character or word n-grams. Shingles are hashed with a polynomial rolling hash and a
splitmix64 finaliser, keeping the top 32 bits ``x``; ``num_perm`` permutations
``h_k(x) = a_k x + b_k mod 2^32`` (odd random ``a_k``; 32-bit numpy arithmetic, several times
faster than 64-bit, and measured unbiased with the textbook variance) give each document a
MinHash signature, whose agreement rate estimates the Jaccard similarity of the shingle sets. Signatures are cut into
``bands`` of ``rows`` values; documents sharing a band go to one bucket, each bucket member is
compared with the bucket's first document, and pairs whose estimated Jaccard reaches the
threshold are joined (union-find). Everything is vectorised with numpy over chunks of documents.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

import numpy as np
import tqdm

Shingle = Literal["char", "word"]

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
_POLY = np.uint64(0x100000001B3)  # the FNV prime, as the rolling-hash base
_MAX_CODEPOINT = 0x110000


@dataclasses.dataclass(frozen=True)
class DedupConfig:
    threshold: float = 0.8  # Jaccard similarity above which two documents are near duplicates
    shingle: Shingle = "char"
    ngram: int = 5
    num_perm: int = 128
    min_length: int = 0  # characters, after stripping surrounding whitespace
    max_non_alnum_fraction: float = 1.0  # of non-whitespace characters
    exact: bool = True
    seed: int = 0
    chunk_shingles: int = 1 << 14  # shingles per vectorised step (cache-sized: 4 * num_perm * this bytes)

    def __post_init__(self):
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"threshold must be in (0, 1], got {self.threshold}")
        if self.shingle not in ("char", "word"):
            raise ValueError(f"shingle must be 'char' or 'word', got {self.shingle!r}")
        if self.ngram < 1 or self.num_perm < 2:
            raise ValueError(f"need ngram >= 1 and num_perm >= 2, got {self.ngram}, {self.num_perm}")


def lsh_params(threshold: float, num_perm: int, false_positive_weight: float = 0.1) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising weighted false positives + negatives.

    A pair of Jaccard ``s`` shares a bucket with probability ``1 - (1 - s^rows)^bands``. False
    positives (mass of that curve below the threshold) only cost a signature comparison, since
    candidates are verified, while false negatives are lost duplicates: hence the low weight on
    false positives (0.5 would be the classic balanced choice, which finds only ~40% of pairs
    right at the threshold).
    """
    s = np.linspace(0.0, 1.0, 2001)
    best, best_cost = (1, num_perm), np.inf
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        p = 1.0 - (1.0 - s**rows) ** bands
        cost = np.where(s < threshold, false_positive_weight * p, (1.0 - false_positive_weight) * (1.0 - p)).mean()
        if cost < best_cost:
            best, best_cost = (bands, rows), cost
    return best


@functools.cache
def _char_classes() -> tuple[np.ndarray, np.ndarray]:
    """Lookup tables over all code points: is alphanumeric, is whitespace."""
    chars = [chr(c) for c in range(_MAX_CODEPOINT)]
    return (np.fromiter((c.isalnum() for c in chars), bool, _MAX_CODEPOINT),
            np.fromiter((c.isspace() for c in chars), bool, _MAX_CODEPOINT))


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le", "surrogatepass"), np.uint32)


def _segment_sums(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sums of the consecutive segments of ``values`` with the given lengths (0 for empty ones)."""
    out = np.zeros(len(lengths), np.int64)
    nonempty = lengths > 0
    if nonempty.any():
        out[nonempty] = np.add.reduceat(values, (np.cumsum(lengths) - lengths)[nonempty], dtype=np.int64)
    return out


def quality_flags(
    docs: Sequence[str], min_length: int, max_non_alnum_fraction: float, *, chunk_docs: int = 10_000
) -> tuple[np.ndarray, np.ndarray]:
    """Boolean arrays: too short; too many non-alphanumeric (non-whitespace) characters."""
    too_short = np.fromiter((len(d.strip()) < min_length for d in docs), bool, len(docs))
    non_alnum = np.zeros(len(docs), bool)
    if max_non_alnum_fraction >= 1.0:
        return too_short, non_alnum
    is_alnum, is_space = _char_classes()
    for lo in range(0, len(docs), chunk_docs):
        part = docs[lo : lo + chunk_docs]
        lengths = np.fromiter((len(d) for d in part), np.int64, len(part))
        cps = _codepoints("".join(part))
        visible = lengths - _segment_sums(is_space[cps], lengths)
        alnum = _segment_sums(is_alnum[cps], lengths)
        fraction = np.where(visible > 0, 1.0 - alnum / np.maximum(visible, 1), 1.0)
        non_alnum[lo : lo + len(part)] = fraction > max_non_alnum_fraction
    return too_short, non_alnum


def _normalise(text: str) -> str:
    return " ".join(text.lower().split())


def _symbols(docs: Sequence[str], shingle: Shingle, word_ids: dict[str, int]) -> list[np.ndarray]:
    """Each document as an array of uint64 symbols: its code points, or its word ids.

    Word ids are given in order of first appearance (``word_ids`` is shared by all chunks of
    one corpus), so equal words map to equal symbols.
    """
    if shingle == "char":
        return [_codepoints(_normalise(d)).astype(np.uint64) for d in docs]
    return [
        np.fromiter((word_ids.setdefault(w, len(word_ids)) for w in words), np.uint64, len(words))
        for words in (_normalise(d).split() for d in docs)
    ]


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads every input bit over the 64 output bits."""
    with np.errstate(over="ignore"):
        x = x ^ (x >> np.uint64(30))
        x = x * _MIX1
        x = x ^ (x >> np.uint64(27))
        x = x * _MIX2
        return x ^ (x >> np.uint64(31))


def shingle_hashes(symbols: Sequence[np.ndarray], ngram: int) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every n-gram of every document, concatenated, and their per-doc counts.

    Each document is padded with ``ngram - 1`` sentinel symbols, so a document of ``m >= 1``
    symbols has ``m`` shingles (its last ones run into the padding) and n-grams never span two
    documents; an empty document has none.
    """
    lengths = np.fromiter((len(s) for s in symbols), np.int64, len(symbols))
    pad = np.full(ngram - 1, np.uint64(2**64 - 1))
    stream = np.concatenate([part for s in symbols for part in (s, pad)]) if symbols else np.zeros(0, np.uint64)
    n_starts = len(stream) - ngram + 1
    if n_starts <= 0:
        return np.zeros(0, np.uint64), lengths
    with np.errstate(over="ignore"):
        h = stream[:n_starts].copy()
        for j in range(1, ngram):
            h = h * _POLY + stream[j : j + n_starts]
    # Valid starts: the first `length` positions of each document's slot (length + ngram - 1).
    slot_starts = np.concatenate([[0], np.cumsum(lengths + ngram - 1)[:-1]])
    offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    starts = np.repeat(slot_starts, lengths) + offsets
    return _mix(h[starts]), lengths


def minhash_signatures(docs: Sequence[str], config: DedupConfig = DedupConfig(), *, progress: bool = True) -> np.ndarray:
    """``uint32[len(docs), num_perm]`` MinHash signatures; rows of documents without shingles
    (empty after normalisation) are all ``2**32 - 1``."""
    rng = np.random.default_rng(config.seed)
    a = rng.integers(0, 2**32, size=config.num_perm, dtype=np.uint64).astype(np.uint32) | np.uint32(1)
    b = rng.integers(0, 2**32, size=config.num_perm, dtype=np.uint64).astype(np.uint32)
    signatures = np.full((len(docs), config.num_perm), np.uint32(2**32 - 1), np.uint32)
    # Chunks of documents of roughly `chunk_shingles` characters each.
    word_ids: dict[str, int] = {}
    bounds, total = [0], 0
    for i, d in enumerate(docs):
        total += len(d) + 1
        if total >= config.chunk_shingles:
            bounds.append(i + 1)
            total = 0
    if bounds[-1] != len(docs):
        bounds.append(len(docs))
    for lo, hi in tqdm.tqdm(list(zip(bounds[:-1], bounds[1:])), desc="minhash", unit="chunk", disable=not progress):
        hashes, counts = shingle_hashes(_symbols(docs[lo:hi], config.shingle, word_ids), config.ngram)
        has = counts > 0
        if not has.any():
            continue
        with np.errstate(over="ignore"):
            values = np.multiply.outer(a, (hashes >> np.uint64(32)).astype(np.uint32))
            values += b[:, None]
        seg_starts = (np.cumsum(counts) - counts)[has]
        signatures[np.arange(lo, hi)[has]] = np.minimum.reduceat(values, seg_starts, axis=1).T
    return signatures


def _find(parent: np.ndarray, i: int) -> int:
    root = i
    while parent[root] != root:
        root = parent[root]
    while parent[i] != root:
        parent[i], i = root, parent[i]
    return root


def near_duplicate_roots(signatures: np.ndarray, threshold: float) -> np.ndarray:
    """For each signature row, the lowest row index of its near-duplicate cluster (itself if none).

    Rows without shingles (all ``2**32 - 1``) are never joined to anything.
    """
    n, num_perm = signatures.shape
    bands, rows = lsh_params(threshold, num_perm)
    parent = np.arange(n)
    candidates = np.flatnonzero((signatures != np.uint32(2**32 - 1)).any(axis=1))
    sig = signatures[candidates]
    pairs = []
    for band in range(bands):
        block = sig[:, band * rows : (band + 1) * rows].astype(np.uint64)
        key = np.zeros(len(sig), np.uint64)
        with np.errstate(over="ignore"):
            for col in range(rows):
                key = _mix(key * _POLY + block[:, col])
        order = np.argsort(key, kind="stable")
        sorted_key = key[order]
        new_group = np.concatenate([[True], sorted_key[1:] != sorted_key[:-1]])
        group_first = order[np.maximum.accumulate(np.where(new_group, np.arange(len(order)), 0))]
        member = ~new_group
        pairs.append(np.stack([group_first[member], order[member]], axis=1))
    pairs = np.unique(np.concatenate(pairs), axis=0) if pairs else np.zeros((0, 2), np.int64)
    # Verify candidates by their estimated Jaccard, in blocks to bound memory.
    similar = np.concatenate([np.zeros(0, bool)] + [
        (sig[block[:, 0]] == sig[block[:, 1]]).mean(axis=1) >= threshold
        for block in np.array_split(pairs, max(1, len(pairs) // 65536))
    ])
    pairs = candidates[pairs[similar]]
    for i, j in pairs:
        ri, rj = _find(parent, int(i)), _find(parent, int(j))
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([_find(parent, i) for i in range(n)])


def deduplicate(docs: Sequence[str], config: DedupConfig = DedupConfig(), *, progress: bool = True) -> tuple[np.ndarray, dict]:
    """Indices of the documents to keep (ascending) and a report counting removals per filter."""
    n = len(docs)
    too_short, non_alnum = quality_flags(docs, config.min_length, config.max_non_alnum_fraction)
    alive = ~too_short & ~non_alnum
    report = {"input": n, "too_short": int(too_short.sum()), "non_alnum": int((non_alnum & ~too_short).sum())}

    exact = np.zeros(n, bool)
    if config.exact:
        first_seen: dict[str, int] = {}
        for i in np.flatnonzero(alive):
            if first_seen.setdefault(docs[i], i) != i:
                exact[i] = True
    alive &= ~exact
    report["exact_duplicates"] = int(exact.sum())

    candidates = np.flatnonzero(alive)  # ascending, so the lowest row of a cluster is its lowest index
    signatures = minhash_signatures([docs[i] for i in candidates], config, progress=progress)
    roots = near_duplicate_roots(signatures, config.threshold)
    near = np.zeros(n, bool)
    near[candidates[roots != np.arange(len(candidates))]] = True
    alive &= ~near
    bands, rows = lsh_params(config.threshold, config.num_perm)
    report.update(near_duplicates=int(near.sum()), kept=int(alive.sum()), lsh_bands=bands, lsh_rows=rows)
    return np.flatnonzero(alive), report
