"""Preference data: HH splitting, completion-only loss masks, truncation, pair rows."""

import json

import numpy as np
import pytest

from maxlm.data import preference, sft
from maxlm.data.tokenizer import get_or_train_default_tokenizer

HH_CHOSEN = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me?\n\nAssistant: Gladly."
HH_REJECTED = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me?\n\nAssistant: No."


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return get_or_train_default_tokenizer(str(tmp_path_factory.mktemp("tok")))


def test_hh_pairs_split_at_the_last_shared_assistant_turn():
    prompt, chosen, rejected = preference.split_hh(HH_CHOSEN, HH_REJECTED)
    assert prompt == sft.parse_hh("\n\nHuman: hi\n\nAssistant: hello\n\nHuman: help me?")
    assert chosen == [{"role": "assistant", "content": "Gladly."}]
    assert rejected == [{"role": "assistant", "content": "No."}]
    # Dialogues that part earlier: the completions hold every turn after the last shared "Assistant:".
    _, chosen, _ = preference.split_hh("\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant: d",
                                       "\n\nHuman: a\n\nAssistant: x")
    assert [m["role"] for m in chosen] == ["assistant", "user", "assistant"]
    with pytest.raises(ValueError, match="share no"):
        preference.split_hh("\n\nHuman: a", "\n\nHuman: b")
    assert preference.to_pair({"prompt": "q", "chosen": "a", "rejected": "b"}, "pairs")[0] == [
        {"role": "user", "content": "q"}]


@pytest.mark.parametrize("template", sorted(sft.TEMPLATES))
def test_pair_tokens_are_the_rendered_dialogue_and_the_mask_covers_the_completion_only(tok, template):
    t = sft.TEMPLATES[template]
    prompt, chosen, rejected = preference.split_hh(HH_CHOSEN, HH_REJECTED)
    pair = preference.tokenize_pair(prompt, chosen, rejected, tok, t)
    for name, completion in (("chosen", chosen), ("rejected", rejected)):
        whole = sft.tokenize_dialogue(prompt + completion, tok, t)
        np.testing.assert_array_equal(np.concatenate([pair["prompt"], pair[name]]), whole["tokens"])
        content = tok.encode(completion[0]["content"] + t.suffix["assistant"])
        expected = np.zeros(len(pair[name]))
        expected[-len(content) - 1:] = 1  # content + end-of-turn text + eos; not the assistant prefix
        np.testing.assert_array_equal(pair[f"{name}_mask"], expected)


def test_truncation_keeps_the_prompt_end_and_caps_the_completions():
    pair = {"prompt": np.arange(10), "chosen": np.arange(100, 108), "chosen_mask": np.ones(8),
            "rejected": np.arange(200, 203), "rejected_mask": np.ones(3)}
    assert preference.truncate_pair(pair, 18, 4)["prompt"].tolist() == list(range(10))  # fits
    cut = preference.truncate_pair(pair, 16, 4)  # only as much prompt as needed goes
    assert cut["prompt"].tolist() == list(range(2, 10)) and len(cut["chosen"]) == 8
    cut = preference.truncate_pair(pair, 12, 6)  # the prompt keeps 6, the completions get the other 6
    assert cut["prompt"].tolist() == list(range(4, 10))
    assert cut["chosen"].tolist() == list(range(100, 106)) and cut["rejected"].tolist() == [200, 201, 202]
    rows = preference.pair_rows(cut, seq_len=12)
    assert {k: v.shape for k, v in rows.items()} == {k: (2, 12) for k in rows}
    assert rows["tokens"][0, :11].tolist() == [4, 5, 6, 7, 8, 9, 100, 101, 102, 103, 104]
    assert rows["targets"][1, :8].tolist() == [5, 6, 7, 8, 9, 200, 201, 202]
    assert rows["loss_mask"][1].tolist() == [0] * 5 + [1] * 3 + [0] * 4
    assert rows["segment_ids"][1].tolist() == [1] * 8 + [0] * 4
    assert rows["positions"][1, :9].tolist() == list(range(8)) + [0]


def test_pairs_records_become_batches_with_held_out_pairs_and_reference_logps(tmp_path):
    from maxlm.train.data import make_data, with_reference_logps
    from tests.helpers import tiny_config

    path = tmp_path / "pairs.jsonl"
    with open(path, "w") as f:
        for i in range(10):
            f.write(json.dumps({"prompt": f"What is {i} plus {i}?", "chosen": f"It is {2 * i}.",
                                "rejected": [{"role": "assistant", "content": "No idea."}]}) + "\n")
    config = tiny_config()
    config.train.update(objective="dpo", batch_size=2, eval_batches=5)
    config.data.update(source=f"jsonl:{path}", preference_format="pairs", chat_template="chatml", val_fraction=0.2)
    data = make_data(config, str(tmp_path))
    assert data.pairs["tokens"].shape == (10, 2, 16) and data.num_train_pairs == 8
    batch = next(data.train)
    assert {k: v.shape for k, v in batch.items()} == {k: (2, 2, 16) for k in batch}
    assert "ref_logps" not in batch and len(list(data.val_batches())) == 1
    ref = np.arange(20, dtype=np.float32).reshape(10, 2)
    val = list(with_reference_logps(config, data, ref).val_batches())
    np.testing.assert_array_equal(val[0]["ref_logps"], ref[8:])  # the held-out pairs, in order
    np.testing.assert_array_equal(val[0]["tokens"], data.pairs["tokens"][8:])
