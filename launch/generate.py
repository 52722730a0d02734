"""Generate text from a trained model, streamed to the terminal or written as JSONL.

    python launch/generate.py --workdir=runs/shakespeare --prompt="ROMEO:" --max_new_tokens=200
    python launch/generate.py --workdir=runs/sft --lora=runs/sft_lora --prompts_file=prompts.jsonl \\
        --num_beams=4 --output=out.jsonl

Prompts come from ``--prompt`` (repeatable) and ``--prompts_file`` (a ``.jsonl`` file of
``{"prompt": ...}`` records, or a text file with one prompt per line). Each prompt is encoded after
the document separator (eos), as documents start in training. Without ``--output`` every prompt's
tokens are printed as they are decoded (beam search prints when done); with it all prompts run as
one batch and each becomes a JSONL line ``{"prompt", "completion", "tokens"}``.
Decoding stops at eos (``--nostop_at_eos`` to go on) or after ``--max_new_tokens``.
Exit code 2: bad flags or input.
"""

import json
import sys

from absl import app, flags

from maxlm import generate as G
from maxlm.checkpoint import CheckpointMismatchError
from maxlm.data.sources import BadRecordError, load_jsonl
from maxlm.evaluate import start_id
from maxlm.pretrained import Pretrained, load_workdir
from maxlm.train.metrics import quiet_library_logs

_WORKDIR = flags.DEFINE_string("workdir", None, "A maxlm run directory (config.json + checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_LORA = flags.DEFINE_string("lora", None, "A LoRA run whose adapters are folded into the model.")
_PROMPT = flags.DEFINE_multi_string("prompt", [], "A prompt (repeatable).")
_PROMPTS_FILE = flags.DEFINE_string("prompts_file", None, "JSONL {'prompt': ...} records or one prompt per line.")
_OUTPUT = flags.DEFINE_string("output", None, "Write JSONL here instead of streaming to the terminal.")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 128, "Tokens to generate at most.", lower_bound=1)
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0: greedy.", lower_bound=0.0)
_TOP_K = flags.DEFINE_integer("top_k", 0, "Sample from the k most likely tokens (0: off).", lower_bound=0)
_TOP_P = flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass (1: off).", lower_bound=0.0, upper_bound=1.0)
_REPETITION = flags.DEFINE_float("repetition_penalty", 1.0, "CTRL repetition penalty (1: off).", lower_bound=0.0)
_NO_REPEAT = flags.DEFINE_integer("no_repeat_ngram", 0, "Never repeat an n-gram of this size (0: off).",
                                  lower_bound=0)
_MIN_NEW = flags.DEFINE_integer("min_new_tokens", 0, "No eos before this many new tokens.", lower_bound=0)
_BEAMS = flags.DEFINE_integer("num_beams", 1, "Beam search with this many beams (1: sampling/greedy).",
                              lower_bound=1)
_LENGTH_PENALTY = flags.DEFINE_float("length_penalty", 1.0, "Beam scores are log-prob / length**this.")
_EARLY_STOPPING = flags.DEFINE_bool("early_stopping", False, "Beam search stops at num_beams finished beams.")
_STOP_AT_EOS = flags.DEFINE_bool("stop_at_eos", True, "Stop a sequence at the tokenizer's eos.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
flags.mark_flag_as_required("workdir")


def read_prompts() -> list[str]:
    prompts = list(_PROMPT.value)
    path = _PROMPTS_FILE.value
    if path and path.endswith((".jsonl", ".jsonl.gz")):
        prompts += [r["prompt"] for r in load_jsonl(path, fields=("prompt",))]
    elif path:
        with open(path, encoding="utf-8") as f:
            prompts += [line.rstrip("\n") for line in f if line.strip()]
    if not prompts:
        raise ValueError("no prompts: give --prompt or --prompts_file")
    return prompts


def _options(run: Pretrained) -> dict:
    eos = run.tokenizer.eos_id if _STOP_AT_EOS.value and run.tokenizer.eos_id >= 0 else None
    return dict(max_new_tokens=_MAX_NEW.value, eos_id=eos, pad_id=max(run.tokenizer.pad_id, 0),
                repetition_penalty=_REPETITION.value, no_repeat_ngram=_NO_REPEAT.value,
                min_new_tokens=_MIN_NEW.value)


def _sampling() -> dict:
    if _BEAMS.value > 1:
        return dict(temperature=0.0, num_beams=_BEAMS.value, length_penalty=_LENGTH_PENALTY.value,
                    early_stopping=_EARLY_STOPPING.value)
    return dict(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value, seed=_SEED.value)


def _new_text(run: Pretrained, tokens: list[int], eos) -> str:
    return run.tokenizer.decode([t for t in tokens if t != eos])


def stream_to_terminal(run: Pretrained, prompts: list[str], encoded: list[list[int]]) -> None:
    """Prints each prompt, then its new text piece by piece as the tokens are decoded."""
    options = _options(run)
    for prompt, ids in zip(prompts, encoded):
        print(prompt, end="", flush=True)
        if _BEAMS.value > 1:
            new = G.generate(run.model, run.params, [ids], **options, **_sampling())[0]
            print(_new_text(run, new, options["eos_id"]), flush=True)
            continue
        new, shown = [], ""
        for step in G.stream(run.model, run.params, [ids], **options, **_sampling()):
            if int(step[0]) == options["eos_id"]:
                break
            new.append(int(step[0]))
            text = run.tokenizer.decode(new)
            if text.startswith(shown):  # a multi-byte character may need more than one token
                print(text[len(shown):], end="", flush=True)
                shown = text
        print(run.tokenizer.decode(new)[len(shown):], flush=True)


def write_jsonl(run: Pretrained, prompts: list[str], encoded: list[list[int]], path: str) -> None:
    options = _options(run)
    outputs = G.generate(run.model, run.params, encoded, **options, **_sampling())
    with open(path, "w", encoding="utf-8") as f:
        for prompt, new in zip(prompts, outputs):
            record = {"prompt": prompt, "completion": _new_text(run, new, options["eos_id"]), "tokens": new}
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"wrote {len(outputs)} completions to {path}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_library_logs()
    try:
        prompts = read_prompts()
        run = load_workdir(_WORKDIR.value, step=_STEP.value, lora_workdir=_LORA.value)
        encoded = [[start_id(run.tokenizer)] + list(run.tokenizer.encode(p)) for p in prompts]
        if _OUTPUT.value:
            write_jsonl(run, prompts, encoded, _OUTPUT.value)
        else:
            stream_to_terminal(run, prompts, encoded)
    except (BadRecordError, CheckpointMismatchError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
