"""Pipelines: pretraining windows, SFT packing, mixtures, determinism, resume, sharding."""

import collections
import json

import grain
import numpy as np
import pytest

from maxlm.data import pipeline as P
from maxlm.data import tokenizer as tok
from maxlm.data.sources import make_source

SHARD = {"shard_index": 0, "shard_count": 1}


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


def assert_batch_contract(batch, rows, seq_len):
    assert set(batch) == set(P.BATCH_KEYS)
    dtypes = {"tokens": np.int32, "targets": np.int32, "loss_mask": np.float32, "segment_ids": np.int32, "positions": np.int32}
    for k, dtype in dtypes.items():
        assert batch[k].shape == (rows, seq_len) and batch[k].dtype == dtype, k


# --- pretraining --------------------------------------------------------------------------


def test_pretrain_windows_are_shifted_by_one():
    stream = np.arange(1000, dtype=np.int32)
    batch = next(P.pretrain_dataset(stream, None, seq_len=16, batch_size=4, seed=0, val_fraction=0.0, **SHARD))
    assert_batch_contract(batch, 4, 16)
    np.testing.assert_array_equal(batch["targets"], batch["tokens"] + 1)  # stream[i+1] follows stream[i]
    assert (batch["tokens"][:, 0] % 16 == 0).all()  # windows start at multiples of seq_len
    assert (batch["segment_ids"] == 1).all() and (batch["loss_mask"] == 1).all()
    np.testing.assert_array_equal(batch["positions"], np.tile(np.arange(16), (4, 1)))


def test_pretrain_batches_gathered_at_once_equal_rows_batched_one_by_one():
    """pretrain_dataset makes each batch with one gather; mixtures batch pretrain_windows' rows one at a time."""
    stream = np.arange(5000, dtype=np.int32)
    for shard in ({"shard_index": 0, "shard_count": 1}, {"shard_index": 1, "shard_count": 2}):
        gathered = P.pretrain_dataset(stream, None, seq_len=16, batch_size=4, seed=3, val_fraction=0.0, **shard)
        by_row = P.batch_iterator(P.pretrain_windows(stream, 16), batch_size=4, seed=3, **shard)
        assert_batches_equal(take(gathered, 200), take(by_row, 200))  # 200 batches: past the first epoch's end


def test_pretrain_from_documents_with_eos(tmp_path):
    (tmp_path / "a.txt").write_text("abc")
    (tmp_path / "b.txt").write_text("de")
    t = tok.get_or_train_default_tokenizer(str(tmp_path / "cache"))
    stream = P.tokenize_documents(make_source(f"text:{tmp_path}/*.txt"), t)
    np.testing.assert_array_equal(stream, t.encode("abc") + [t.eos_id] + t.encode("de") + [t.eos_id])
    batch = next(P.pretrain_dataset(make_source(f"text:{tmp_path}/*.txt"), t, seq_len=3, batch_size=2, seed=0,
                                    val_fraction=0.0, **SHARD))
    rows = sorted(batch["tokens"].tolist())
    assert sorted([t.encode("abc"), [t.eos_id] + t.encode("de")]) == rows


def test_train_val_split_is_a_deterministic_cut_of_the_stream():
    stream = np.arange(10_001, dtype=np.int32)
    train = P.pretrain_dataset(stream, None, seq_len=10, batch_size=10, seed=0, val_fraction=0.1, **SHARD)
    val = P.pretrain_dataset(stream, None, seq_len=10, batch_size=10, seed=0, split="val", val_fraction=0.1, **SHARD)
    assert max(b["targets"].max() for b in take(train, 200)) < 9001
    val_batches = list(val)  # finite: one pass, in order
    assert len(val_batches) == 9  # 1000 val tokens -> 99 windows -> 9 full batches
    assert val_batches[0]["tokens"][0, 0] == 9001
    np.testing.assert_array_equal(np.concatenate([b["tokens"][:, 0] for b in val_batches]), 9001 + 10 * np.arange(90))
    with pytest.raises(ValueError, match="val_fraction > 0"):
        P.pretrain_dataset(stream, None, seq_len=10, batch_size=10, seed=0, split="val", val_fraction=0.0, **SHARD)


def test_epochs_cover_every_window_once_and_reshuffle():
    stream = np.arange(64 * 8 + 1, dtype=np.int32)  # 64 windows of 8
    it = P.pretrain_dataset(stream, None, seq_len=8, batch_size=16, seed=3, val_fraction=0.0, **SHARD)
    epoch1 = np.concatenate([b["tokens"][:, 0] for b in take(it, 4)]) // 8
    epoch2 = np.concatenate([b["tokens"][:, 0] for b in take(it, 4)]) // 8
    assert sorted(epoch1) == sorted(epoch2) == list(range(64))
    assert not np.array_equal(epoch1, epoch2)


def test_determinism_and_resume_pretrain():
    stream = np.random.default_rng(0).integers(0, 300, size=20_000).astype(np.int32)
    make = lambda seed: P.pretrain_dataset(stream, None, seq_len=32, batch_size=8, seed=seed, **SHARD)
    assert_batches_equal(take(make(1), 5), take(make(1), 5))
    assert not np.array_equal(next(make(1))["tokens"], next(make(2))["tokens"])

    it = make(1)
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # JSON-able
    expected = take(it, 5)
    resumed = make(1)
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 5), expected)
    assert isinstance(it, grain.DatasetIterator)


def test_sharding_splits_the_global_batch():
    stream = np.arange(8 * 200 + 1, dtype=np.int32)
    kwargs = dict(seq_len=8, batch_size=8, seed=5, val_fraction=0.0)
    full = take(P.pretrain_dataset(stream, None, shard_index=0, shard_count=1, **kwargs), 3)
    shards = [take(P.pretrain_dataset(stream, None, shard_index=i, shard_count=2, **kwargs), 3) for i in range(2)]
    for step in range(3):
        assert all(s[step]["tokens"].shape == (4, 8) for s in shards)
        union = sorted(np.concatenate([s[step]["tokens"][:, 0] for s in shards]))
        assert union == sorted(full[step]["tokens"][:, 0])
    with pytest.raises(ValueError, match="not divisible"):
        P.pretrain_dataset(stream, None, shard_index=0, shard_count=3, **kwargs)
    with pytest.raises(ValueError, match="shard_index=2"):
        P.pretrain_dataset(stream, None, shard_index=2, shard_count=2, **kwargs)


def test_pretrain_bad_inputs():
    with pytest.raises(ValueError, match="too few for one window"):
        P.pretrain_dataset(np.arange(10, dtype=np.int32), None, seq_len=16, batch_size=1, seed=0, **SHARD)
    with pytest.raises(ValueError, match="no full batch"):
        P.pretrain_dataset(np.arange(101, dtype=np.int32), None, seq_len=10, batch_size=20, seed=0,
                           split="val", val_fraction=0.5, **SHARD)
    with pytest.raises(ValueError, match="seq_len must be >= 1, got 0"):
        P.pretrain_dataset(np.arange(100, dtype=np.int32), None, seq_len=0, batch_size=1, seed=0, **SHARD)
    with pytest.raises(ValueError, match="needed to tokenize"):
        P.pretrain_dataset(make_source("builtin:tinyshakespeare"), None, seq_len=8, batch_size=1, seed=0, **SHARD)


def test_tokens_per_second():
    it = P.pretrain_dataset(np.arange(100_000, dtype=np.int32), None, seq_len=64, batch_size=12, seed=0, **SHARD)
    assert P.tokens_per_second(it, 20) > 0


# --- packing ------------------------------------------------------------------------------


def make_examples(lengths):
    """Example i has tokens 1000*(i+1) + [0..n) and loss_mask 0 on its first half (a prompt)."""
    return [
        {"tokens": 1000 * (i + 1) + np.arange(n, dtype=np.int32), "loss_mask": (np.arange(n) >= n // 2).astype(np.float32)}
        for i, n in enumerate(lengths)
    ]


def segments(batch):
    """Yields (row, segment id, slice) for every packed example."""
    for r, seg in enumerate(batch["segment_ids"]):
        for s in np.unique(seg[seg > 0]):
            idx = np.flatnonzero(seg == s)
            assert np.array_equal(idx, np.arange(idx[0], idx[-1] + 1)), "segments are contiguous"
            yield r, s, idx


def test_packing_segments_positions_targets_and_padding():
    lengths = [3, 5, 2, 7, 4, 9, 6, 3, 5, 8, 2, 4]
    examples = make_examples(lengths)
    batches = list(P.packed_dataset(examples, seq_len=8, batch_size=2, seed=0, num_epochs=1, **SHARD))
    seen = []
    for batch in batches:
        assert_batch_contract(batch, 2, 8)
        for r, s, idx in segments(batch):
            i = batch["tokens"][r, idx[0]] // 1000 - 1
            ex = examples[i]
            n = len(ex["tokens"])
            np.testing.assert_array_equal(batch["positions"][r, idx], np.arange(n - 1))
            np.testing.assert_array_equal(batch["tokens"][r, idx], ex["tokens"][:-1])
            np.testing.assert_array_equal(batch["targets"][r, idx], ex["tokens"][1:])  # never the next example
            np.testing.assert_array_equal(batch["loss_mask"][r, idx], ex["loss_mask"][1:])
            seen.append(i)
        pad = batch["segment_ids"] == 0
        assert (batch["tokens"][pad] == 0).all() and (batch["targets"][pad] == 0).all()
        assert (batch["loss_mask"][pad] == 0).all() and (batch["positions"][pad] == 0).all()
    assert len(seen) == len(set(seen)) and len(seen) >= len(lengths) - 3  # the last partial batch is dropped
    assert any(len(set(b["segment_ids"][r]) - {0}) > 1 for b in batches for r in range(2))  # packing happened


def test_packing_long_and_short_examples():
    examples = make_examples([4, 5, 20, 3])
    with pytest.raises(ValueError, match=r"example 2 has 20 tokens, more than seq_len\+1=9; pass truncate=True"):
        list(P.packed_dataset(examples, seq_len=8, batch_size=1, seed=0, num_epochs=1, **SHARD))
    with pytest.raises(ValueError, match="example 1 has 1 tokens, fewer than 2"):
        list(P.packed_dataset(make_examples([4, 1]), seq_len=8, batch_size=1, seed=0, num_epochs=1, **SHARD))

    def packed_examples(**kwargs):
        batches = list(P.packed_dataset(examples, seq_len=8, batch_size=1, seed=0, num_epochs=1, **SHARD, **kwargs))
        return {int(b["tokens"][r, idx[0]] // 1000 - 1): idx.size for b in batches for r, _, idx in segments(b)}

    assert packed_examples(on_bad_record="skip") == {0: 3, 1: 4, 3: 2}
    assert packed_examples(truncate=True) == {0: 3, 1: 4, 2: 8, 3: 2}


def test_packing_resume_and_determinism():
    examples = make_examples(np.random.default_rng(0).integers(2, 30, size=200))
    make = lambda: P.packed_dataset(examples, seq_len=32, batch_size=4, seed=7, **SHARD)
    assert_batches_equal(take(make(), 6), take(make(), 6))
    it = make()
    take(it, 9)
    state = it.get_state()
    expected = take(it, 4)
    resumed = make()
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 4), expected)


# --- mixtures -----------------------------------------------------------------------------


def test_mixture_proportions_within_two_percent():
    components = [(grain.MapDataset.range(n).map(lambda x, k=k: (k, x)), w)
                  for k, (n, w) in enumerate([(3000, 0.5), (1000, 0.3), (500, 0.2)])]
    mixed = P.mixture_dataset(components, seed=0)
    counts = collections.Counter(mixed[i][0] for i in range(10_000))
    for k, w in enumerate([0.5, 0.3, 0.2]):
        assert abs(counts[k] / 10_000 - w) < 0.02


def test_mixture_of_windows_batches_and_resumes():
    a = P.pretrain_windows(np.arange(0, 2_000, dtype=np.int32), 16)
    b = P.pretrain_windows(np.arange(100_000, 100_500, dtype=np.int32), 16)
    make = lambda: P.batch_iterator(P.mixture_dataset([(a, 3.0), (b, 1.0)], seed=1), batch_size=8, seed=1,
                                    shuffle=False, **SHARD)
    it = make()
    batches = take(it, 50)
    from_b = np.mean([(x["tokens"][:, 0] >= 100_000).mean() for x in batches])
    assert abs(from_b - 0.25) < 0.02
    state = it.get_state()
    expected = take(it, 3)
    resumed = make()
    resumed.set_state(state)
    assert_batches_equal(take(resumed, 3), expected)
    with pytest.raises(ValueError, match="weights must be > 0"):
        P.mixture_dataset([(a, 1.0), (b, 0.0)], seed=0)


def test_mixture_epochs():
    epochs = P.mixture_epochs([1_000, 4_000], [0.5, 0.5], 10_000, names=["small", "big"])
    assert epochs == {"small": 5.0, "big": 1.25}
    with pytest.raises(ValueError, match="2 component sizes but 1 weights"):
        P.mixture_epochs([1, 2], [1.0], 10)
