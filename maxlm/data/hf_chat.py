"""The chat template a Hugging Face tokenizer defines (``data.chat_template=hf``), with the loss on assistant turns.

The template is the tokenizer's own Jinja ``chat_template`` (``tokenizer_config.json`` or
``chat_template.jinja``), rendered by ``transformers`` exactly as ``apply_chat_template`` renders it.
The loss spans come from rendering prefixes of the dialogue: assistant turn ``i`` is the text between
``render(messages[:i], add_generation_prompt=True)`` and ``render(messages[:i + 1])``, i.e. its content
and whatever end-of-turn text the template puts after it. The text is then tokenized segment by segment,
with the template's special tokens (``<|im_end|>``, ``<s>`` ...) mapped to their ids, so every token knows
whether the loss counts it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np


class HFChatTemplate:
    """A tokenizer directory's chat template; ``tokenize`` gives ``{'tokens', 'loss_mask'}`` like ``sft.tokenize_dialogue``."""

    def __init__(self, directory: str):
        from transformers import AutoTokenizer  # the hf extra

        self.directory = directory
        self._hf = AutoTokenizer.from_pretrained(directory)
        if not self._hf.chat_template:
            raise ValueError(f"data.chat_template=hf: the tokenizer in {directory} defines no chat_template; "
                             "use data.chat_template=hh or chatml")
        specials = sorted(set(self._hf.all_special_tokens), key=len, reverse=True)
        self._special_pattern = re.compile("(" + "|".join(map(re.escape, specials)) + ")") if specials else None

    def render(self, messages: Sequence[Mapping[str, str]], add_generation_prompt: bool = False) -> str:
        return self._hf.apply_chat_template([dict(m) for m in messages], tokenize=False,
                                            add_generation_prompt=add_generation_prompt)

    def loss_spans(self, messages: Sequence[Mapping[str, str]]) -> tuple[str, list[tuple[int, int]]]:
        """The rendered dialogue and the ``[start, end)`` character spans of its assistant turns."""
        spans, text = [], ""
        for i, message in enumerate(messages):
            start = len(self.render(messages[:i], add_generation_prompt=True)) if message["role"] == "assistant" else 0
            rendered = self.render(messages[: i + 1])
            if not rendered.startswith(text) or start > len(rendered):
                raise ValueError(f"the chat template of {self.directory} does not render a dialogue's prefix as a "
                                 "prefix of the whole, so its assistant turns cannot be located")
            if message["role"] == "assistant":
                spans.append((start, len(rendered)))
            text = rendered
        return text, spans

    def tokenize(self, messages: Sequence[Mapping[str, str]], tokenizer, *, train_on_prompt: bool = False
                 ) -> dict[str, np.ndarray]:
        text, spans = self.loss_spans(messages)
        bounds = sorted({0, len(text), *(b for span in spans for b in span)})
        tokens: list[int] = []
        mask: list[float] = []
        for start, end in zip(bounds, bounds[1:]):
            in_loss = train_on_prompt or any(s <= start and end <= e for s, e in spans)
            ids = self._encode(text[start:end], tokenizer)
            tokens.extend(ids)
            mask.extend([1.0 if in_loss else 0.0] * len(ids))
        return {"tokens": np.asarray(tokens, np.int32), "loss_mask": np.asarray(mask, np.float32)}

    def _encode(self, text: str, tokenizer) -> list[int]:
        """``tokenizer.encode`` with the template's special-token strings mapped to their ids."""
        if self._special_pattern is None:
            return list(tokenizer.encode(text))
        ids: list[int] = []
        for i, part in enumerate(self._special_pattern.split(text)):
            if i % 2:
                ids.append(tokenizer.piece_to_id(part))
            elif part:
                ids.extend(tokenizer.encode(part))
        return ids
