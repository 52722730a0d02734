"""Supervised fine-tuning data: dialogues rendered with a chat template, loss on assistant tokens only.

Records come in three formats (``data.sft_format``):
  ``hh``           Anthropic HH-RLHF text, ``"\\n\\nHuman: ...\\n\\nAssistant: ..."`` (field ``chosen`` by default)
  ``chat``         ``{"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}``
  ``instruction``  Alpaca style ``{"instruction", "input" (optional), "output"}``

A template (``data.chat_template``) says what text goes before and after each role's content. The
rendered dialogue is tokenized piece by piece, so every token knows which role it belongs to; the loss
mask is 1 on the assistant's content and its end-of-turn text (plus eos), for every assistant turn.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from maxlm.data.hf_chat import HFChatTemplate
from maxlm.data.tokenizer import Tokenizer

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class ChatTemplate:
    """Text around each role's content; ``add_bos``/``eos_after_assistant`` control special tokens."""

    prefix: Mapping[str, str]
    suffix: Mapping[str, str]
    add_bos: bool = True
    eos_after_assistant: bool = True


TEMPLATES = {
    # The HH-RLHF convention itself: what the vendored dialogues look like.
    "hh": ChatTemplate(prefix={"system": "", "user": "\n\nHuman: ", "assistant": "\n\nAssistant: "},
                       suffix={"system": "", "user": "", "assistant": ""}),
    # ChatML, as used by Qwen2 and many others.
    "chatml": ChatTemplate(
        prefix={r: f"<|im_start|>{r}\n" for r in ROLES}, suffix={r: "<|im_end|>\n" for r in ROLES},
        add_bos=False),
}

_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(text: str) -> list[dict[str, str]]:
    """Splits an HH-RLHF dialogue into messages; raises ValueError if it has no Human/Assistant turns."""
    parts = _HH_TURN.split(text)
    if len(parts) < 3 or parts[0].strip():
        raise ValueError(f"not an HH dialogue (expected '\\n\\nHuman: ...'): {text[:80]!r}")
    return [{"role": "user" if speaker == "Human" else "assistant", "content": content}
            for speaker, content in zip(parts[1::2], parts[2::2])]


def to_messages(record: Mapping[str, Any], sft_format: str, field: str = "chosen") -> list[dict[str, str]]:
    """One record in the given format as a list of ``{role, content}`` messages."""
    if sft_format == "hh":
        return parse_hh(record[field])
    if sft_format == "chat":
        messages = record.get("messages")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                     for m in messages):
            raise ValueError("a chat record needs 'messages': a list of {role, content} objects")
        bad = [m.get("role") for m in messages if m.get("role") not in ROLES]
        if bad:
            raise ValueError(f"unknown chat roles {bad}; expected {ROLES}")
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    if sft_format == "instruction":
        prompt = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
        return [{"role": "user", "content": prompt}, {"role": "assistant", "content": record["output"]}]
    raise ValueError(f"data.sft_format={sft_format!r} is not one of hh, chat, instruction")


def check_learnable(messages: Sequence[Mapping[str, str]]) -> None:
    """Raises ValueError if the dialogue has no assistant turn (nothing for the loss)."""
    if not any(m["role"] == "assistant" for m in messages):
        raise ValueError("a dialogue without an assistant turn has nothing to learn from")


def tokenize_dialogue(messages: Sequence[Mapping[str, str]], tokenizer: Tokenizer,
                      template: ChatTemplate | HFChatTemplate, *, train_on_prompt: bool = False) -> dict[str, np.ndarray]:
    """``{'tokens', 'loss_mask'}`` where ``loss_mask[j]`` = 1 if token j is a target the loss counts."""
    check_learnable(messages)
    if isinstance(template, HFChatTemplate):
        return template.tokenize(messages, tokenizer, train_on_prompt=train_on_prompt)
    tokens: list[int] = [tokenizer.bos_id] if template.add_bos and tokenizer.bos_id >= 0 else []
    mask: list[float] = [0.0] * len(tokens)

    def add(text: str, weight: float) -> None:
        ids = tokenizer.encode(text) if text else []
        tokens.extend(ids)
        mask.extend([weight] * len(ids))

    for message in messages:
        role = message["role"]
        is_assistant = role == "assistant"
        add(template.prefix[role], 1.0 if train_on_prompt else 0.0)
        add(message["content"] + template.suffix[role], 1.0 if is_assistant or train_on_prompt else 0.0)
        if is_assistant and template.eos_after_assistant:
            tokens.append(tokenizer.eos_id)
            mask.append(1.0)
    return {"tokens": np.asarray(tokens, np.int32), "loss_mask": np.asarray(mask, np.float32)}
