"""data.chat_template=hf: a Hugging Face tokenizer's own Jinja chat template, rendered by transformers."""

import json

import numpy as np
import pytest

from maxlm.config import ConfigError, validate
from maxlm.data import sft
from maxlm.data.hf_chat import HFChatTemplate
from maxlm.data.hf_tokenizer import load_hf_tokenizer
from maxlm.train.loop import train
from tests.helpers import tiny_config

pytest.importorskip("transformers")

# The ChatML template as Qwen2 ships it (minus its default system prompt), and a Llama-3-style one.
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + "
          "'\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = ("{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + "
          "'<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
SPECIALS = ["<|im_start|>", "<|im_end|>", "<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>", "<|endoftext|>"]
DIALOGUE = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Name a fruit."},
            {"role": "assistant", "content": "An apple."}]


def _tokenizer_dir(tmp_path, template: str | None):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    rust = Tokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.train_from_iterator([m["content"] for m in DIALOGUE] * 20 + ["system user assistant\n"] * 20,
                             trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    directory = tmp_path / "tok"
    directory.mkdir(parents=True)
    rust.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|begin_of_text|>",
              "eos_token": "<|endoftext|>", "additional_special_tokens": SPECIALS[:2] + SPECIALS[3:6]}
    if template:
        config["chat_template"] = template
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    return directory


@pytest.mark.parametrize("template,turn_end", [(CHATML, "<|im_end|>\n"), (LLAMA3, "<|eot_id|>")])
def test_hf_template_renders_like_transformers_and_masks_exactly_the_assistant_turns(tmp_path, template, turn_end):
    from transformers import AutoTokenizer

    directory = _tokenizer_dir(tmp_path, template)
    tokenizer = load_hf_tokenizer(directory)
    example = sft.tokenize_dialogue(DIALOGUE, tokenizer, HFChatTemplate(str(directory)))
    tokens, mask = example["tokens"], example["loss_mask"]
    expected_text = AutoTokenizer.from_pretrained(directory).apply_chat_template(DIALOGUE, tokenize=False)
    assert tokenizer.decode(tokens) == expected_text
    assert tokenizer.decode(tokens[mask == 1]) == f"Hello! How can I help?{turn_end}An apple.{turn_end}"
    assert tokenizer.piece_to_id(turn_end.strip()) in tokens[mask == 1]  # end of turn: one special token, learned
    assert set(np.unique(mask)) == {0.0, 1.0}
    everything = sft.tokenize_dialogue(DIALOGUE, tokenizer, HFChatTemplate(str(directory)), train_on_prompt=True)
    np.testing.assert_array_equal(everything["tokens"], tokens)
    assert everything["loss_mask"].all()


def test_missing_or_unusable_templates_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="defines no chat_template"):
        HFChatTemplate(str(_tokenizer_dir(tmp_path / "none", None)))
    reversed_turns = "{% for message in messages | reverse %}{{ message['content'] + '\n' }}{% endfor %}"
    template = HFChatTemplate(str(_tokenizer_dir(tmp_path / "reversed", reversed_turns)))
    with pytest.raises(ValueError, match="cannot be located"):
        template.loss_spans(DIALOGUE)


def test_config_needs_sft_and_a_tokenizer_directory(tmp_path):
    config = tiny_config()
    config.data.chat_template = "hf"
    config.train.objective = "sft"
    with pytest.raises(ConfigError, match="data.chat_template=hf renders SFT dialogues"):
        validate(config, num_devices=8)  # data.tokenizer=char
    config.data.tokenizer = str(_tokenizer_dir(tmp_path, CHATML))
    validate(config, num_devices=8)
    config.train.objective = "dpo"
    config.train.dpo.reference_free = True
    with pytest.raises(ConfigError, match="needs train.objective=sft"):
        validate(config, num_devices=8)


def test_sft_run_with_the_hf_template(tmp_path):
    records = tmp_path / "chats.jsonl"
    records.write_text("".join(json.dumps({"messages": DIALOGUE}) + "\n" for _ in range(20)))
    config = tiny_config()
    config.data.update(source=f"jsonl:{records}", sft_format="chat", chat_template="hf",
                       tokenizer=str(_tokenizer_dir(tmp_path, CHATML)))
    config.model.max_seq_len = 64
    config.train.update(objective="sft", steps=2, seq_len=64)
    with pytest.raises(ConfigError, match="does not fill one batch of train.batch_size=8 rows"):
        train(config, str(tmp_path / "small_val"))  # 2 held-out dialogues, one per row
    config.data.val_fraction = 0.5
    last = train(config, str(tmp_path / "run"))
    assert np.isfinite(last["loss"]) and np.isfinite(last["val_loss"])
