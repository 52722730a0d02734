"""Tokenizers: exact round trips, the cached default char model, extension with stable ids, resize."""

import json
import os
import subprocess
import sys
import time

import numpy as np
import pytest

from maxlm.data import make_source
from maxlm.data import tokenizer as tok

MULTILINGUAL = [
    "Hello, world!",
    "  leading and trailing  ",
    "runs    of\t\tspaces\n\n\nand newlines\r\n",
    "中文分词测试：机器学习很有趣。",
    "emoji 🙂👍🏽 and ZWJ 👩‍👩‍👧",
    "Ελληνικά, русский, العربية, हिन्दी",
    "\n",
    "",
]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """100 kB of Shakespeare plus a few multilingual lines, as text and JSONL."""
    d = tmp_path_factory.mktemp("corpus")
    text = make_source("builtin:tinyshakespeare")[0][:100_000]
    (d / "shakespeare.txt").write_text(text)
    with open(d / "extra.jsonl", "w") as f:
        for line in ["机器学习很有趣", "Ελληνικά κείμενα", "emoji 🙂"] * 20:
            f.write(json.dumps({"body": line}, ensure_ascii=False) + "\n")
    return d


@pytest.fixture(scope="module")
def bpe(corpus):
    return tok.train_tokenizer(
        [str(corpus / "shakespeare.txt"), f"{corpus}/extra.jsonl#body"], str(corpus / "bpe"),
        vocab_size=600, model_type="bpe", special_tokens=["<|user|>", "<|end|>"],
    )


@pytest.mark.parametrize("model_type, vocab_size", [("bpe", 600), ("unigram", 600), ("char", 1000)])
def test_round_trip_multilingual(corpus, model_type, vocab_size):
    t = tok.train_tokenizer(str(corpus / "shakespeare.txt"), str(corpus / model_type),
                            vocab_size=vocab_size, model_type=model_type)
    for text in MULTILINGUAL:
        assert t.decode(t.encode(text)) == text
    assert t.decode(t.encode_batch(MULTILINGUAL)[3]) == MULTILINGUAL[3]
    assert (t.unk_id, t.bos_id, t.eos_id, t.pad_id) == (0, 1, 2, 3)
    assert t.id_to_piece(4) == "\n" and t.piece_to_id("\n") == 4


def test_special_tokens_and_jsonl_input(bpe):
    assert bpe.vocab_size == 600 and bpe.path.endswith("bpe.model")
    assert [bpe.id_to_piece(i) for i in (5, 6)] == ["<|user|>", "<|end|>"]
    ids = bpe.encode("<|user|>机器学习<|end|>")
    assert ids[0] == 5 and ids[-1] == 6
    assert bpe.piece_to_id("机") != bpe.unk_id  # seen in the JSONL input, so not byte fallback
    assert bpe.decode(ids) == "<|user|>机器学习<|end|>"


def test_default_char_tokenizer_is_cached_and_fast(tmp_path):
    t = tok.get_or_train_default_tokenizer(str(tmp_path))
    assert os.path.basename(t.path) == tok.DEFAULT_CHAR_MODEL
    assert t.vocab_size == 65 + 4  # the corpus's characters + unk/bos/eos/pad; no byte pieces
    mtime = os.path.getmtime(t.path)
    again = tok.get_or_train_default_tokenizer(str(tmp_path))
    assert again.path == t.path and os.path.getmtime(t.path) == mtime
    assert [p for p in os.listdir(tmp_path) if ".tmp" in p] == []
    text = make_source("builtin:tinyshakespeare")[0]
    start = time.perf_counter()
    ids = t.encode(text)
    assert time.perf_counter() - start < 5.0
    assert len(ids) == len(text)  # one token per character
    assert t.decode(ids) == text
    assert t.encode("中") == [t.unk_id]  # no byte fallback: an unseen character is unknown


def test_extend_keeps_old_ids_and_adds_new_pieces(bpe, corpus, tmp_path):
    new_corpus = tmp_path / "new.txt"
    new_corpus.write_text("\n".join(["深度学习是机器学习的一个分支。", "zorblax quimbly zorblax"] * 30))
    ext = tok.extend_tokenizer(bpe, [str(new_corpus)], str(tmp_path / "ext"), new_vocab_size=660)
    assert ext.vocab_size == 660 and os.path.isfile(str(tmp_path / "ext.model"))
    assert not os.path.exists(str(tmp_path / "ext.aux.model"))
    assert all(ext.id_to_piece(i) == bpe.id_to_piece(i) for i in range(bpe.vocab_size))
    new_pieces = {ext.id_to_piece(i) for i in range(bpe.vocab_size, ext.vocab_size)}
    assert "zorblax" in new_pieces or "▁zorblax" in new_pieces
    sample = "深度学习 zorblax quimbly"
    assert len(ext.encode(sample)) < len(bpe.encode(sample))
    assert max(ext.encode(sample)) >= bpe.vocab_size
    assert ext.decode(ext.encode(sample)) == sample
    old_text = "To be, or not to be"
    assert ext.encode(old_text) == bpe.encode(old_text)
    with pytest.raises(ValueError, match="smaller than the base vocab"):
        tok.extend_tokenizer(bpe, [str(new_corpus)], str(tmp_path / "x"), new_vocab_size=10)


def test_resize_embeddings():
    rng = np.random.default_rng(0)
    emb = rng.normal(0.5, 2.0, size=(100, 16)).astype(np.float32)
    mean = tok.resize_embeddings(emb, 120)
    assert mean.shape == (120, 16) and mean.dtype == np.float32
    np.testing.assert_array_equal(mean[:100], emb)
    np.testing.assert_allclose(mean[100:], np.broadcast_to(emb.mean(0), (20, 16)), rtol=1e-5)
    normal = tok.resize_embeddings(emb, 4100, init="normal", seed=1)
    np.testing.assert_array_equal(normal[:100], emb)
    assert abs(normal[100:].std() - emb.std()) < 0.1 and abs(normal[100:].mean() - emb.mean()) < 0.1
    head = tok.resize_embeddings(emb.T, 130, axis=1)  # an output projection [d, vocab]
    assert head.shape == (16, 130)
    np.testing.assert_array_equal(tok.resize_embeddings(emb, 100), emb)
    with pytest.raises(ValueError, match="only grows"):
        tok.resize_embeddings(emb, 50)
    with pytest.raises(ValueError, match="init must be"):
        tok.resize_embeddings(emb, 120, init="zeros")


def test_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tok.load_tokenizer(str(tmp_path / "none.model"))
    with pytest.raises(ValueError, match="model_type must be"):
        tok.train_tokenizer("builtin:tinyshakespeare", str(tmp_path / "x"), vocab_size=100, model_type="word")
    with pytest.raises(FileNotFoundError, match="no file matches"):
        tok.train_tokenizer(str(tmp_path / "missing.txt"), str(tmp_path / "x"), vocab_size=100)


def test_launch_tokenizer_train_and_extend(corpus, tmp_path):
    script = os.path.join(REPO, "launch", "tokenizer.py")
    run = lambda *args: subprocess.run([sys.executable, script, *args], check=True, capture_output=True, text=True)
    out = run(f"--input={corpus}/shakespeare.txt", f"--model_prefix={tmp_path}/t", "--vocab_size=400",
              "--special_tokens=<|a|>,<|b|>")
    assert "vocab 400" in out.stdout
    out = run(f"--extend={tmp_path}/t.model", f"--input={corpus}/extra.jsonl#body", f"--model_prefix={tmp_path}/e",
              "--vocab_size=420")
    assert "vocab 420" in out.stdout
    assert tok.load_tokenizer(f"{tmp_path}/e.model").id_to_piece(5) == "<|a|>"


def test_the_run_tokenizer_skips_bad_records_when_the_data_section_says_so(tmp_path):
    from maxlm.data.sources import BadRecordError
    from maxlm.train.data import get_tokenizer
    from tests.helpers import tiny_config

    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"text": "hello world"}\nnot json\n{"text": "zigzag"}\n')
    config = tiny_config()
    config.data.update(source=f"jsonl:{corpus}")
    with pytest.raises(BadRecordError, match="docs.jsonl:2: not valid JSON"):
        get_tokenizer(config, str(tmp_path / "error"))
    config.data.on_bad_record = "skip"
    t = get_tokenizer(config, str(tmp_path / "skip"))
    assert t.piece_to_id("z") != t.unk_id and t.decode(t.encode("hello zigzag")) == "hello zigzag"
