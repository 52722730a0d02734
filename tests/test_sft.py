"""SFT data: HH parsing, chat templates, loss exactly on assistant tokens, packing equivalence, an end-to-end run."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from maxlm.config import validate
from maxlm.data import sft
from maxlm.data.pipeline import packed_dataset
from maxlm.data.sources import BadRecordError
from maxlm.data.tokenizer import get_or_train_default_tokenizer
from maxlm.models import build_model
from maxlm.models.transformer import ModelConfig
from maxlm.train.data import get_tokenizer, make_data, read_sft_records
from maxlm.train.loop import train
from maxlm.train.objectives import next_token_objective
from tests.helpers import preset_config, tiny_config


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return get_or_train_default_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_parse_hh_splits_turns_and_rejects_other_text():
    text = "\n\nHuman: hi there\n\nAssistant: hello\n\nHuman: and?\n\nAssistant: bye"
    assert sft.parse_hh(text) == [
        {"role": "user", "content": "hi there"}, {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "and?"}, {"role": "assistant", "content": "bye"}]
    with pytest.raises(ValueError, match="not an HH dialogue"):
        sft.parse_hh("just some text")


@pytest.mark.parametrize("template", sorted(sft.TEMPLATES))
def test_loss_mask_covers_exactly_the_assistant_tokens(tok, template):
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"},
                {"role": "assistant", "content": "Farewell"}]
    t = sft.TEMPLATES[template]
    ex = sft.tokenize_dialogue(messages, tok, t)
    counted = [i for i, w in enumerate(ex["loss_mask"]) if w]
    # Rebuild the expectation by hand from the pieces: assistant content + its suffix + eos, in both turns.
    expected, pos = [], 1 if t.add_bos else 0
    for m in messages:
        pos += len(tok.encode(t.prefix[m["role"]])) if t.prefix[m["role"]] else 0
        n = len(tok.encode(m["content"] + t.suffix[m["role"]]))
        if m["role"] == "assistant":
            expected += list(range(pos, pos + n + 1))  # + eos
            pos += 1
        pos += n
    assert counted == expected and pos == len(ex["tokens"])
    assert ex["tokens"][expected[-1]] == tok.eos_id
    everything = sft.tokenize_dialogue(messages, tok, t, train_on_prompt=True)
    assert everything["loss_mask"].sum() == len(everything["tokens"]) - (1 if t.add_bos else 0)


def test_instruction_and_chat_records_become_messages():
    assert sft.to_messages({"instruction": "Add", "input": "1+1", "output": "2"}, "instruction") == [
        {"role": "user", "content": "Add\n\n1+1"}, {"role": "assistant", "content": "2"}]
    with pytest.raises(ValueError, match="unknown chat roles"):
        sft.to_messages({"messages": [{"role": "bot", "content": "x"}]}, "chat")


def test_packed_batch_loss_equals_the_unpacked_loss(tok):
    messages = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
                for q, a in [("Who art thou?", "A friend."), ("Whither?", "To Rome."), ("Why?", "For love.")]]
    examples = [sft.tokenize_dialogue(m, tok, sft.TEMPLATES["hh"]) for m in messages]
    cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=32, num_layers=2, num_heads=4, num_kv_heads=2,
                      head_dim=8, d_ff=64, max_seq_len=128, attention="xla")
    model = build_model(cfg)
    params = jax.jit(model.init)(jax.random.key(0))
    objective = next_token_objective(model)
    packed = next(packed_dataset(examples, seq_len=128, batch_size=1, seed=0, shard_index=0, shard_count=1))
    assert packed["segment_ids"].max() == 3  # all three in one row
    packed_sum, packed_m = objective(params, jax.tree.map(jnp.asarray, packed))
    alone = [next(packed_dataset([e], seq_len=64, batch_size=1, seed=0, shard_index=0, shard_count=1))
             for e in examples]
    sums = [objective(params, jax.tree.map(jnp.asarray, b)) for b in alone]
    np.testing.assert_allclose(packed_sum, sum(s for s, _ in sums), rtol=1e-5)
    assert float(packed_m["num_tokens"]) == sum(float(m["num_tokens"]) for _, m in sums)


def test_sft_run_on_hh_dialogues_lowers_the_val_loss(tmp_path):
    config = tiny_config()
    config.train.update(objective="sft", steps=30, seq_len=128, batch_size=8, lr=1e-2, eval_every=15,
                        eval_batches=4, log_every=5)
    config.model.max_seq_len = 128
    config.data.update(source="builtin:hh_rlhf_harmless_test", truncate=True, val_fraction=0.05)
    train(config, str(tmp_path))
    val = [json.loads(l)["val_loss"] for l in open(tmp_path / "metrics.jsonl") if "val_loss" in l]
    assert len(val) == 2 and val[1] < val[0]


@pytest.mark.parametrize("stage", ["pretrain", "sft", "sft_lora"])
def test_the_chat_demo_config_validates_at_every_stage(stage):
    config = preset_config("chat_hh", stage)
    validate(config, num_devices=2)
    assert config.data.tokenizer_text == "builtin:tinyshakespeare"


def test_pretrain_then_sft_from_init_from_share_the_tokenizer_text(tmp_path):
    """The demo chain in miniature: SFT on HH from a Shakespeare model, one char vocabulary for both."""
    pre = tiny_config()
    pre.data.tokenizer_text = "builtin:tinyshakespeare"
    pre.train.update(steps=2, seq_len=64)
    pre.model.max_seq_len = 64
    pre.checkpoint.update(every_steps=2, async_save=False)
    train(pre, str(tmp_path / "pretrain"))
    sft_config = tiny_config()
    sft_config.init_from = str(tmp_path / "pretrain")
    sft_config.model.max_seq_len = 64
    sft_config.data.update(source="builtin:hh_rlhf_harmless_test", tokenizer_text="builtin:tinyshakespeare",
                           truncate=True)
    sft_config.train.update(objective="sft", steps=2, seq_len=64)
    train(sft_config, str(tmp_path / "sft"))
    saved = [json.loads(open(tmp_path / run / "config.json").read())["model"]["vocab_size"] for run in ("pretrain", "sft")]
    assert saved[0] == saved[1] == get_or_train_default_tokenizer(str(tmp_path / "tok")).vocab_size
    assert get_tokenizer(sft_config, str(tmp_path / "sft")).vocab_size == saved[0]
    sft_config.data.tokenizer_text = ""  # the default for HH SFT: the dialogues' own characters, another vocabulary
    assert get_tokenizer(sft_config, str(tmp_path / "other")).vocab_size != saved[0]


def test_eval_batches_0_trains_on_every_record_and_never_evaluates(tmp_path):
    config = tiny_config()
    config.train.update(objective="sft", steps=3, seq_len=128, batch_size=8, eval_batches=0, eval_every=1)
    config.model.max_seq_len = 128
    config.data.update(source="builtin:hh_rlhf_harmless_test", truncate=True, val_fraction=0.0)
    last = train(config, str(tmp_path))
    lines = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in lines] == [1, 2, 3] and not any("val_loss" in r for r in lines)
    assert np.isfinite(last["loss"]) and "val_loss" not in last


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return f"jsonl:{path}"


@pytest.mark.parametrize("objective,formats,record", [
    ("sft", dict(sft_format="chat"), {"messages": [{"role": "user", "content": "Qué tal?"},
                                                   {"role": "assistant", "content": "Très bien!"}]}),
    ("sft", dict(sft_format="instruction"), {"instruction": "Qué tal?", "output": "Très bien!"}),
    ("dpo", dict(preference_format="pairs"), {"prompt": "Qué tal?", "rejected": "Non.",
                                              "chosen": [{"role": "assistant", "content": "Très bien!"}]}),
])
def test_a_char_tokenizer_learns_the_messages_of_records_without_a_text_field(tmp_path, objective, formats, record):
    config = tiny_config()
    config.train.update(objective=objective, batch_size=2)
    config.data.update(source=_write_jsonl(tmp_path / "records.jsonl", [record] * 10), truncate=True, **formats)
    data = make_data(config, str(tmp_path))
    pieces = {data.tokenizer.id_to_piece(i) for i in range(data.tokenizer.vocab_size)}
    assert set("Trèsbien!") <= pieces and ("Q" in pieces) == (objective == "sft")  # pairs: the chosen completions
    assert next(data.train)["tokens"].shape[0] == 2


def test_bad_sft_dialogues_are_named_or_skipped_as_data_on_bad_record_says(tmp_path):
    good = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}
    bad = [{"messages": [{"role": "bot", "content": "x"}]}, {"messages": [{"role": "user", "content": "Hi"}]},
           {"messages": "Hi"}]
    config = tiny_config()
    config.train.update(objective="sft", batch_size=2)
    config.data.update(source=_write_jsonl(tmp_path / "chat.jsonl", [good, *bad] + [good] * 8), sft_format="chat",
                       tokenizer_text="builtin:tinyshakespeare", truncate=True)
    with pytest.raises(BadRecordError, match=r"chat.jsonl record 1: unknown chat roles \['bot'\].*"
                                             "set data.on_bad_record=skip"):
        make_data(config, str(tmp_path))
    config.data.on_bad_record = "skip"
    assert read_sft_records(config.data.source, config.data) == [good] * 9
    assert next(make_data(config, str(tmp_path)).train)["tokens"].shape[0] == 2
    config.data.update(sft_format="hh", source=_write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "not a dialogue"}]))
    with pytest.raises(ValueError, match="hh.jsonl: no usable SFT records"):
        read_sft_records(config.data.source, config.data)
