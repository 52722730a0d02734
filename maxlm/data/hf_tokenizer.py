"""Tokenizers shipped with Hugging Face checkpoints, behind ``maxlm.data.tokenizer.Tokenizer``'s interface.

A sentencepiece ``tokenizer.model`` in the directory is used as is (``load_tokenizer``); otherwise the
``tokenizer.json`` (GPT-2, OPT, Llama-3) is loaded with the ``tokenizers`` library (the ``hf`` extra).
Special ids come from ``tokenizer_config.json`` / ``special_tokens_map.json``, -1 when absent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from maxlm.data.tokenizer import Tokenizer, load_tokenizer

SPECIAL_FILES = ("tokenizer_config.json", "special_tokens_map.json")


class HFTokenizer:
    """A ``tokenizers.Tokenizer`` with maxlm's tokenizer interface; ``encode`` adds no special tokens."""

    def __init__(self, tokenizer, path: str | None = None, special: dict[str, str] | None = None):
        self.tokenizer = tokenizer
        self.path = path
        self._special = {k: self._id(v) for k, v in (special or {}).items()}

    def _id(self, token: str | None) -> int:
        i = self.tokenizer.token_to_id(token) if token is not None else None
        return -1 if i is None else i

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def bos_id(self) -> int:
        return self._special.get("bos_token", -1)

    @property
    def eos_id(self) -> int:
        return self._special.get("eos_token", -1)

    @property
    def pad_id(self) -> int:
        return self._special.get("pad_token", -1)

    @property
    def unk_id(self) -> int:
        return self._special.get("unk_token", -1)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str], *, num_threads: int = 2) -> list[list[int]]:
        """Encodes many texts at once (``tokenizers`` parallelises in Rust; ``num_threads`` is unused)."""
        del num_threads
        return [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        return self.tokenizer.id_to_token(int(i))

    def piece_to_id(self, piece: str) -> int:
        i = self.tokenizer.token_to_id(piece)
        return self.unk_id if i is None else i

    def __repr__(self) -> str:
        return f"HFTokenizer(path={self.path!r}, vocab_size={self.vocab_size})"


def _special_tokens(directory: Path) -> dict[str, str]:
    """{bos_token: '<s>', ...} from the directory's tokenizer_config.json, then special_tokens_map.json."""
    found: dict[str, str] = {}
    for name in reversed(SPECIAL_FILES):
        if (directory / name).is_file():
            with open(directory / name) as f:
                config = json.load(f)
            for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
                value = config.get(key)
                value = value.get("content") if isinstance(value, dict) else value
                if isinstance(value, str):
                    found[key] = value
    return found


def load_hf_tokenizer(path: str | os.PathLike) -> Tokenizer | HFTokenizer:
    """The tokenizer of an HF model directory (or a ``tokenizer.json`` / ``.model`` file)."""
    path = Path(path)
    if path.is_dir():
        if (path / "tokenizer.model").is_file():
            return load_tokenizer(str(path / "tokenizer.model"))
        if not (path / "tokenizer.json").is_file():
            raise FileNotFoundError(f"{path} has neither a sentencepiece tokenizer.model nor a tokenizer.json")
        path = path / "tokenizer.json"
    if path.suffix == ".model":
        return load_tokenizer(str(path))
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer {path} does not exist")
    try:
        from tokenizers import Tokenizer as RustTokenizer
    except ImportError as e:
        raise ImportError("reading a tokenizer.json needs the `tokenizers` package: pip install 'maxlm[hf]'") from e
    return HFTokenizer(RustTokenizer.from_file(str(path)), str(path), _special_tokens(path.parent))
