"""Dedup: planted near duplicates found, distinct documents kept, exact dups and filters counted."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from maxlm.data import dedup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_docs(n, seed=0, words=(30, 50)):
    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    vocab = ["".join(rng.choice(letters, size=rng.integers(3, 9))) for _ in range(3000)]
    return [" ".join(vocab[w] for w in rng.integers(0, len(vocab), size=rng.integers(*words))) for _ in range(n)]


def near_copy(doc: str, rng) -> str:
    """One word replaced and the case/whitespace changed: Jaccard well above 0.8."""
    words = doc.split()
    words[int(rng.integers(len(words)))] = "xyzzy"
    return "  ".join(words).upper()


@pytest.fixture(scope="module")
def corpus():
    rng = np.random.default_rng(1)
    docs = random_docs(300)
    near = {300 + k: int(i) for k, i in enumerate(rng.choice(300, size=30, replace=False))}
    docs += [near_copy(docs[i], rng) for i in near.values()]
    exact = {len(docs) + k: i for k, i in enumerate([3, 4, 4])}
    docs += [docs[i] for i in exact.values()]
    short = len(docs)
    docs += ["tiny"]
    symbols = len(docs)
    docs += ["$$$ %%% ^^^ &&& *** ((( ))) ### @@@ !!! ~~~ ||| " * 3 + "ok"]
    return docs, near, exact, short, symbols


@pytest.mark.parametrize("shingle, ngram", [("char", 5), ("word", 2)])
def test_planted_duplicates_and_filters(corpus, shingle, ngram):
    docs, near, exact, short, symbols = corpus
    config = dedup.DedupConfig(shingle=shingle, ngram=ngram, min_length=10, max_non_alnum_fraction=0.5)
    kept, report = dedup.deduplicate(docs, config, progress=False)
    kept = set(kept.tolist())
    assert kept == set(range(300)), "exactly the 300 distinct originals survive"
    assert report == {
        "input": len(docs), "too_short": 1, "non_alnum": 1, "exact_duplicates": 3, "near_duplicates": 30,
        "kept": 300, "lsh_bands": report["lsh_bands"], "lsh_rows": report["lsh_rows"],
    }


def test_minhash_estimates_jaccard():
    docs = random_docs(2, seed=5, words=(200, 201))
    a = docs[0]
    b = " ".join(a.split()[:150] + docs[1].split()[:50])
    sig = dedup.minhash_signatures([a, b], dedup.DedupConfig(num_perm=256), progress=False)
    def shingles(t):
        return {t[i : i + 5] for i in range(len(t))}  # the short tail slices are the padded shingles
    true = len(shingles(a) & shingles(b)) / len(shingles(a) | shingles(b))
    assert abs((sig[0] == sig[1]).mean() - true) < 0.1


def test_lsh_params_find_pairs_at_the_threshold():
    for threshold in (0.5, 0.8, 0.95):
        bands, rows = dedup.lsh_params(threshold, 128)
        assert bands * rows <= 128
        assert 1 - (1 - threshold**rows) ** bands > 0.7  # a pair right at the threshold is usually a candidate
        assert 1 - (1 - (threshold - 0.3) ** rows) ** bands < 0.2


def test_edge_cases_and_determinism():
    docs = ["", " ", "a", "abc", "abc", "ABC", "different text entirely", "x" * 3]
    kept, report = dedup.deduplicate(docs, dedup.DedupConfig(), progress=False)
    assert report["kept"] + report["exact_duplicates"] + report["near_duplicates"] == len(docs)
    assert 4 not in kept  # "abc" again: exact duplicate
    assert 5 not in kept  # "ABC" normalises to "abc": near duplicate (Jaccard 1)
    again, _ = dedup.deduplicate(docs, dedup.DedupConfig(), progress=False)
    np.testing.assert_array_equal(kept, again)
    with pytest.raises(ValueError, match="threshold must be"):
        dedup.DedupConfig(threshold=0.0)
    with pytest.raises(ValueError, match="shingle must be"):
        dedup.DedupConfig(shingle="line")


def test_launch_dedup(tmp_path, corpus):
    docs = corpus[0]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    out = tmp_path / "out.jsonl"
    result = subprocess.run(
        [sys.executable, os.path.join(REPO, "launch", "dedup.py"), f"--input={src}", f"--output={out}",
         "--threshold=0.8", "--min_length=10", "--max_non_alnum_fraction=0.5", f"--report={tmp_path}/r.json"],
        check=True, capture_output=True, text=True,
    )
    kept = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    assert kept == docs[:300]
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["near_duplicates"] == 30 and report["exact_duplicates"] == 3
    assert json.loads(result.stdout.strip().splitlines()[-1]) == report
