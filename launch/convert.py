"""Convert checkpoints between Hugging Face and maxlm.

  python launch/convert.py --from_hf=HF_DIR --to=WORKDIR
  python launch/convert.py --from=WORKDIR --to_hf=HF_DIR [--max_shard_size=5GB] [--dtype=bfloat16]

``--from_hf`` writes an Orbax checkpoint under WORKDIR/checkpoints/0/ (fine-tune it with
``launch/train.py --config.init_from=WORKDIR``) and WORKDIR/config.json; ``--to_hf`` writes config.json and
safetensors (sharded, with an index, above --max_shard_size) that ``transformers`` loads. Llama, Mistral,
Qwen2, OPT and GPT-2; safetensors only. Exit codes: 0 done, 2 bad input. See maxlm/convert/.
"""

from __future__ import annotations

import re
import sys

from absl import app, flags

from maxlm.checkpoint import CheckpointMismatchError
from maxlm.train.metrics import quiet_library_logs

_FROM_HF = flags.DEFINE_string("from_hf", None, "Hugging Face model directory to import.")
_TO = flags.DEFINE_string("to", None, "maxlm workdir to write (with --from_hf).")
_FROM = flags.DEFINE_string("from", None, "maxlm workdir (or a run fine-tuned from one) to export.")
_TO_HF = flags.DEFINE_string("to_hf", None, "Hugging Face model directory to write (with --from).")
_HF_BASE = flags.DEFINE_string("hf_base", None, "HF directory whose config fields and tokenizer to keep "
                               "(default: WORKDIR/hf, or that of the run's init_from).")
_MAX_SHARD_SIZE = flags.DEFINE_string("max_shard_size", "5GB", "Largest safetensors file, e.g. 5GB, 500MB.")
_DTYPE = flags.DEFINE_enum("dtype", None, ["float32", "bfloat16", "float16"],
                           "Stored dtype (import: float32 or bfloat16 params; export: default the params').")
_ALLOW_UNKNOWN = flags.DEFINE_bool("allow_unknown_fields", False,
                                   "Import even if config.json has fields the converter does not know.")

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    if not match or match.group(2).upper() not in _UNITS:
        raise ValueError(f"--max_shard_size={text!r} is not a size like 5GB or 500MB")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_library_logs()
    importing, exporting = bool(_FROM_HF.value or _TO.value), bool(_FROM.value or _TO_HF.value)
    if importing == exporting or not ((_FROM_HF.value and _TO.value) or (_FROM.value and _TO_HF.value)):
        print("error: give either --from_hf=DIR --to=WORKDIR or --from=WORKDIR --to_hf=DIR", file=sys.stderr)
        sys.exit(2)
    try:
        from maxlm.convert import hf, workdir
    except ImportError as e:
        print(f"error: {e}; install the hf extra: pip install 'maxlm[hf]'", file=sys.stderr)
        sys.exit(2)
    try:
        if importing:
            if _DTYPE.value == "float16":
                raise ValueError("--dtype=float16 is not a maxlm param dtype; use float32 or bfloat16")
            config = workdir.hf_to_workdir(_FROM_HF.value, _TO.value, param_dtype=_DTYPE.value or "float32",
                                           allow_unknown_fields=_ALLOW_UNKNOWN.value)
            m = config["model"]
            print(f"wrote {_TO.value}/checkpoints/0 ({m['num_layers']} layers, d_model {m['d_model']}, "
                  f"vocab {m['vocab_size']}); fine-tune with --config.init_from={_TO.value}")
        else:
            names = workdir.workdir_to_hf(_FROM.value, _TO_HF.value, hf_base=_HF_BASE.value,
                                          max_shard_bytes=parse_size(_MAX_SHARD_SIZE.value), dtype=_DTYPE.value)
            print(f"wrote {_TO_HF.value}: config.json, {', '.join(names)}")
    except (hf.UnsupportedHFError, CheckpointMismatchError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
