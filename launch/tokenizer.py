"""Trains a SentencePiece tokenizer, or extends one with pieces from a new corpus.

  python launch/tokenizer.py --input='data/*.txt,data/chat.jsonl#text' --model_prefix=out/tok \
      --vocab_size=8000 --model_type=bpe --special_tokens='<|user|>,<|assistant|>'
  python launch/tokenizer.py --extend=out/tok.model --input=zh/*.txt --model_prefix=out/tok_zh \
      --vocab_size=12000

Inputs are paths, globs or source specs (text:, jsonl:, tfds:, arrayrecord:, builtin:);
``*.jsonl[.gz][#field]`` paths are read as JSONL. With ``--extend`` the base model's ids stay
unchanged and ``--vocab_size`` is the extended total. See maxlm/data/tokenizer.py.
"""

from __future__ import annotations

from absl import app, flags

from maxlm.data import tokenizer

_INPUT = flags.DEFINE_list("input", None, "Comma-separated inputs.", required=True)
_MODEL_PREFIX = flags.DEFINE_string("model_prefix", None, "Writes MODEL_PREFIX.model.", required=True)
_VOCAB_SIZE = flags.DEFINE_integer("vocab_size", None, "Vocabulary size (the total, with --extend).", required=True)
_MODEL_TYPE = flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram", "char"], "SentencePiece model type.")
_SPECIAL_TOKENS = flags.DEFINE_list("special_tokens", [], "Pieces never split, e.g. chat markers.")
_BYTE_FALLBACK = flags.DEFINE_bool("byte_fallback", True, "Encode unseen characters as UTF-8 bytes.")
_CHARACTER_COVERAGE = flags.DEFINE_float("character_coverage", 1.0, "Fraction of characters covered by the vocab.")
_EXTEND = flags.DEFINE_string("extend", None, "Base .model to extend instead of training from scratch.")


def main(argv):
    del argv
    if _EXTEND.value:
        base = tokenizer.load_tokenizer(_EXTEND.value)
        result = tokenizer.extend_tokenizer(base, _INPUT.value, _MODEL_PREFIX.value, new_vocab_size=_VOCAB_SIZE.value)
        print(f"extended {base.path} (vocab {base.vocab_size}) -> {result.path} (vocab {result.vocab_size})")
        return
    result = tokenizer.train_tokenizer(
        _INPUT.value, _MODEL_PREFIX.value, vocab_size=_VOCAB_SIZE.value, model_type=_MODEL_TYPE.value,
        byte_fallback=_BYTE_FALLBACK.value, special_tokens=_SPECIAL_TOKENS.value,
        character_coverage=_CHARACTER_COVERAGE.value,
    )
    print(f"trained {result.path} (vocab {result.vocab_size})")


if __name__ == "__main__":
    app.run(main)
