"""Evaluate a trained model: perplexity / bits-per-byte on text, multiple-choice accuracy.

    python launch/eval.py --workdir=runs/shakespeare --text=builtin:tinyshakespeare \\
        --mc=facts.jsonl --letter=ceval_dev.jsonl --shots=5 --out=eval.json

``--text`` takes source specs (``text:``, ``jsonl:``, ``builtin:``, ...; a plain path is inferred);
``--mc`` scores every choice as a continuation (accuracy by summed and per-byte log-prob);
``--preference`` scores preference pairs (HH-RLHF dialogues or ``{prompt, chosen, rejected}``): the share
whose chosen completion gets the higher summed log-prob, and the mean margin;
``--letter`` scores C-Eval style: ``--shots`` solved examples (the first records of ``--shots_file``,
else of the same file, which are then not scored), then the letter logits after ``Answer:``.
JSONL records are ``{"question": str, "choices": [str, ...], "answer": index or letter}``.
Results are printed as a table and written as JSON to ``--out``. Exit code 2: bad flags or input.
"""

import json
import sys

from absl import app, flags

from maxlm import evaluate
from maxlm.checkpoint import CheckpointMismatchError
from maxlm.data import preference, sft
from maxlm.data.sources import BadRecordError, infer_spec, make_source
from maxlm.pretrained import load_workdir, read_run_config
from maxlm.train.data import read_preference_records
from maxlm.train.metrics import quiet_library_logs

_WORKDIR = flags.DEFINE_string("workdir", None, "A maxlm run directory (config.json + checkpoints/).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_LORA = flags.DEFINE_string("lora", None, "A LoRA run whose adapters are folded into the model.")
_TEXT = flags.DEFINE_multi_string("text", [], "Text sources for perplexity and bits-per-byte.")
_MAX_DOCS = flags.DEFINE_integer("max_docs", 0, "Score at most this many documents per text source (0: all).")
_MC = flags.DEFINE_multi_string("mc", [], "Multiple-choice JSONL files, full-continuation scoring.")
_LETTER = flags.DEFINE_multi_string("letter", [], "Multiple-choice JSONL files, single-letter (C-Eval) scoring.")
_PREFERENCE = flags.DEFINE_multi_string(
    "preference", [], "Preference pairs (jsonl:PATH or builtin:hh_rlhf_harmless_test): how often the chosen "
    "completion gets the higher log-prob.")
_PREFERENCE_FORMAT = flags.DEFINE_enum("preference_format", "hh", ["hh", "pairs"],
                                       "hh: chosen/rejected dialogues; pairs: {prompt, chosen, rejected}.")
_MAX_PAIRS = flags.DEFINE_integer("max_pairs", 0, "Score at most this many pairs per --preference source (0: all).")
_SHOTS = flags.DEFINE_integer("shots", 0, "Solved examples before each --letter question.", lower_bound=0)
_SHOTS_FILE = flags.DEFINE_string("shots_file", None, "JSONL file the --letter shots come from.")
_WINDOW = flags.DEFINE_integer("window", 0, "Tokens per forward pass (0: the model's max_seq_len).", lower_bound=0)
_STRIDE = flags.DEFINE_integer("stride", 0, "Sliding-window stride for long documents (0: window / 2).",
                               lower_bound=0)
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per forward pass.", lower_bound=1)
_OUT = flags.DEFINE_string("out", None, "Write the results as JSON here.")
flags.mark_flag_as_required("workdir")


def _letter_questions(path: str) -> tuple[list[evaluate.Question], list[evaluate.Question]]:
    """(shots, questions) of a --letter file."""
    questions = evaluate.read_choices(path)
    if _SHOTS_FILE.value:
        shots = evaluate.read_choices(_SHOTS_FILE.value)[: _SHOTS.value]
    else:
        shots, questions = questions[: _SHOTS.value], questions[_SHOTS.value:]
    if len(shots) < _SHOTS.value or not questions:
        raise ValueError(f"--shots={_SHOTS.value}: {path} has too few records for the shots and the questions")
    return shots, questions


def _preference_template() -> sft.ChatTemplate:
    """The run's ``data.chat_template``, which renders the --preference pairs (``hf`` cannot)."""
    name = read_run_config(_WORKDIR.value).data.chat_template
    if name not in sft.TEMPLATES:
        raise ValueError(f"--preference renders pairs with the run's chat template, which must be one of "
                         f"{', '.join(sorted(sft.TEMPLATES))}: this run has data.chat_template={name}")
    return sft.TEMPLATES[name]


def run_tasks() -> dict:
    """Reads every input (so bad data fails before the model loads), then scores each task."""
    if not (_TEXT.value or _MC.value or _LETTER.value or _PREFERENCE.value):
        raise ValueError("nothing to evaluate: give --text, --mc, --letter or --preference")
    preference_records = {spec: read_preference_records(spec, _PREFERENCE_FORMAT.value, "error")
                          for spec in _PREFERENCE.value}
    template = _preference_template() if preference_records else None
    sources = {spec: make_source(infer_spec(spec)) for spec in _TEXT.value}
    mc = {path: evaluate.read_choices(path) for path in _MC.value}
    letters = {path: _letter_questions(path) for path in _LETTER.value}
    run = load_workdir(_WORKDIR.value, step=_STEP.value, lora_workdir=_LORA.value)
    common = dict(window=_WINDOW.value or None, batch_size=_BATCH.value, progress=True)
    tasks = {}
    for spec, source in sources.items():
        texts = [source[i] for i in range(min(len(source), _MAX_DOCS.value or len(source)))]
        docs = evaluate.tokenize_texts(run.tokenizer, texts)
        tasks[f"text:{spec}"] = evaluate.perplexity(run.model, run.params, docs, stride=_STRIDE.value or None,
                                                    **common)
    for path, questions in mc.items():
        tasks[f"mc:{path}"] = evaluate.score_choices(run.model, run.params, run.tokenizer, questions, **common)
    for path, (shots, questions) in letters.items():
        tasks[f"letter:{path}"] = evaluate.score_letters(run.model, run.params, run.tokenizer, questions,
                                                         shots=shots, **common)
    seq_len = _WINDOW.value or run.model.cfg.max_seq_len
    for spec, records in preference_records.items():
        pairs, _ = preference.records_to_pairs(
            records[: _MAX_PAIRS.value or len(records)], run.tokenizer, template,
            preference_format=_PREFERENCE_FORMAT.value, seq_len=seq_len, max_prompt_len=(seq_len + 1) // 2,
            skip_bad=False, where=spec)
        tasks[f"preference:{spec}"] = evaluate.preference_accuracy(run.model, run.params, pairs,
                                                                   batch_size=_BATCH.value, progress=True)
    return {"workdir": _WORKDIR.value, "checkpoint": run.checkpoint, "tasks": tasks}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    quiet_library_logs()
    try:
        results = run_tasks()
    except (BadRecordError, CheckpointMismatchError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    print(evaluate.format_table(results["tasks"]))
    if _OUT.value:
        with open(_OUT.value, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    app.run(main)
