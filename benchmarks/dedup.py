"""Dedup throughput and accuracy on synthetic short documents with planted near duplicates.

  python benchmarks/dedup.py [--num_docs=100000] [--dup_fraction=0.05] [--threshold=0.8]

Documents are 20-60 random words from a 20k-word vocabulary. A planted near duplicate copies an
earlier document and substitutes one or two of its words (char 5-gram Jaccard mostly 0.75-0.95);
a planted exact duplicate copies it unchanged. Precision and recall are over the planted near
duplicates: recall = planted copies whose true Jaccard with their original reaches the threshold
that are removed as near duplicates; precision = planted copies among all documents removed as
near duplicates. Wall time depends on what else runs on the machine, so CPU time is printed too.
"""

from __future__ import annotations

import time

from absl import app, flags
import numpy as np

from maxlm.data import dedup

_NUM_DOCS = flags.DEFINE_integer("num_docs", 100_000, "Documents in the synthetic corpus.")
_DUP_FRACTION = flags.DEFINE_float("dup_fraction", 0.05, "Fraction of documents that are planted near duplicates.")
_EXACT_FRACTION = flags.DEFINE_float("exact_fraction", 0.01, "Fraction that are planted exact duplicates.")
_THRESHOLD = flags.DEFINE_float("threshold", 0.8, "Jaccard threshold.")
_SHINGLE = flags.DEFINE_enum("shingle", "char", ["char", "word"], "Shingle type.")
_NGRAM = flags.DEFINE_integer("ngram", 5, "Shingle length in units.")
_NUM_PERM = flags.DEFINE_integer("num_perm", 128, "MinHash permutations.")


def synthetic_corpus(num_docs: int, dup_fraction: float, exact_fraction: float, seed: int = 0):
    """Documents, planted near duplicates as (copy, original) index pairs, and exact copies."""
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(3, 9))) for _ in range(20_000)]
    kinds = rng.choice(3, size=num_docs, p=[1 - dup_fraction - exact_fraction, dup_fraction, exact_fraction])
    kinds[:10] = 0
    docs: list[str] = []
    near, exact = [], []
    for i, kind in enumerate(kinds):
        if kind == 0:
            docs.append(" ".join(vocab[w] for w in rng.integers(0, len(vocab), size=rng.integers(20, 61))))
            continue
        original = int(rng.integers(0, i))
        words = docs[original].split()
        if kind == 1:
            for pos in rng.integers(0, len(words), size=rng.integers(1, 3)):
                words[pos] = vocab[int(rng.integers(0, len(vocab)))]
            near.append((i, original))
        else:
            exact.append(i)
        docs.append(" ".join(words))
    return docs, np.array(near).reshape(-1, 2), np.array(exact, dtype=np.int64)


def jaccard(a: str, b: str, shingle: str, ngram: int) -> float:
    """Exact Jaccard similarity of two documents' shingle sets, as dedup defines them."""
    def shingles(text: str) -> set:
        units = " ".join(text.lower().split())
        units = list(units) if shingle == "char" else units.split()
        return {tuple(units[i : i + ngram]) for i in range(len(units))}  # short tails = padded n-grams
    sa, sb = shingles(a), shingles(b)
    return len(sa & sb) / len(sa | sb)


def main(argv):
    del argv
    docs, near, exact = synthetic_corpus(_NUM_DOCS.value, _DUP_FRACTION.value, _EXACT_FRACTION.value)
    config = dedup.DedupConfig(threshold=_THRESHOLD.value, shingle=_SHINGLE.value, ngram=_NGRAM.value,
                               num_perm=_NUM_PERM.value)
    wall, cpu = time.perf_counter(), time.process_time()
    kept, report = dedup.deduplicate(docs, config, progress=False)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu

    removed = np.setdiff1d(np.arange(len(docs)), kept)
    removed_near = np.setdiff1d(removed, exact)  # exact copies go in the exact pass
    similarity = np.array([jaccard(docs[c], docs[o], config.shingle, config.ngram) for c, o in near])
    similar = similarity >= config.threshold
    found = np.isin(near[:, 0], removed_near)
    recall_clear = found[similarity >= config.threshold + 0.05].mean()  # away from the threshold
    # Recall counts planted copies truly above the threshold (those below it should be kept);
    # precision counts removed documents that are planted copies of any similarity.
    recall = found[similar].mean()
    precision = np.isin(removed_near, near[:, 0]).mean()
    print("| docs | shingle | ngram | num_perm | threshold | bands x rows | wall s | cpu s | docs/s (wall) | precision | recall | recall, J >= t+0.05 |")
    print("|---:|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|")
    print(f"| {len(docs)} | {config.shingle} | {config.ngram} | {config.num_perm} | {config.threshold} | "
          f"{report['lsh_bands']} x {report['lsh_rows']} | {wall:.1f} | {cpu:.1f} | {len(docs) / wall:,.0f} | "
          f"{precision:.4f} | {recall:.4f} | {recall_clear:.4f} |")
    print(f"report: {report}")
    print(f"planted: {len(near)} near duplicates ({similar.sum()} with Jaccard >= {config.threshold}; "
          f"{found[~similar].sum()} of the others removed too), {len(exact)} exact duplicates")


if __name__ == "__main__":
    app.run(main)
