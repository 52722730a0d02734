"""launch/generate.py and launch/eval.py end to end on a tiny trained workdir; loading LoRA runs."""

import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from maxlm import generate as G
from maxlm.config import base_config, to_json
from maxlm.pretrained import load_workdir
from maxlm.train.loop import train
from tests.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _launch(app, *flags):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, os.path.join(ROOT, "launch", app), *flags], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)


def test_generate_and_eval_apps_on_a_tiny_trained_workdir_with_lora(tmp_path):
    """One test, so the workdir is trained once (not once per xdist worker)."""
    workdir = str(tmp_path / "run")
    config = tiny_config()
    config.train.steps = 3
    train(config, workdir)
    _check_generate(workdir, tmp_path)
    _check_eval(workdir, tmp_path)
    _check_lora(workdir, tmp_path)


def _check_generate(workdir, tmp_path):
    run = load_workdir(workdir)
    start = run.tokenizer.eos_id
    prompts = ["ROMEO:", "To be"]
    greedy = G.generate(run.model, run.params, [[start] + run.tokenizer.encode(p) for p in prompts],
                        max_new_tokens=8, eos_id=start)
    result = _launch("generate.py", f"--workdir={workdir}", "--prompt=ROMEO:", "--prompt=To be",
                     "--temperature=0", "--max_new_tokens=8")
    assert result.returncode == 0, result.stderr
    for prompt, new in zip(prompts, greedy):
        assert prompt + run.tokenizer.decode([t for t in new if t != start]) in result.stdout

    prompts_file = tmp_path / "prompts.jsonl"
    prompts_file.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    out = tmp_path / "out.jsonl"
    result = _launch("generate.py", f"--workdir={workdir}", f"--prompts_file={prompts_file}", "--num_beams=2",
                     "--max_new_tokens=6", f"--output={out}")
    assert result.returncode == 0, result.stderr
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in records] == prompts
    assert all(1 <= len(r["tokens"]) <= 6 and isinstance(r["completion"], str) for r in records)


def _check_eval(workdir, tmp_path):
    text = tmp_path / "doc.txt"
    text.write_text("First Citizen:\nBefore we proceed any further, hear me speak.\n" * 3)
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": f"Who speaks {i}?", "choices": ["Romeo", "Juliet", "Nurse"],
                                      "answer": i % 3}) + "\n" for i in range(4)))
    out = tmp_path / "eval.json"
    result = _launch("eval.py", f"--workdir={workdir}", f"--text={text}", "--window=32", "--stride=16",
                     f"--mc={mc}", f"--letter={mc}", "--shots=1", "--preference=builtin:hh_rlhf_harmless_test",
                     "--max_pairs=6", f"--out={out}")
    assert result.returncode == 0, result.stderr
    tasks = json.load(open(out))["tasks"]
    ppl = tasks[f"text:{text}"]
    assert ppl["bytes"] == len(text.read_text().encode()) and ppl["perplexity"] > 1
    assert tasks[f"mc:{mc}"]["questions"] == 4 and tasks[f"letter:{mc}"]["questions"] == 3
    pairs = tasks["preference:builtin:hh_rlhf_harmless_test"]
    assert pairs["pairs"] == 6 and 0.0 <= pairs["accuracy"] <= 1.0 and math.isfinite(pairs["margin"])
    assert "bits_per_byte" in result.stdout and "accuracy_norm" in result.stdout
    messages = tmp_path / "pairs.jsonl"  # the message-list records training accepts
    messages.write_text("".join(json.dumps({
        "prompt": [{"role": "user", "content": f"Who art thou, {i}?"}],
        "chosen": [{"role": "assistant", "content": "A friend."}],
        "rejected": [{"role": "assistant", "content": "None."}]}) + "\n" for i in range(3)))
    result = _launch("eval.py", f"--workdir={workdir}", f"--preference=jsonl:{messages}", "--preference_format=pairs",
                     f"--out={out}")
    assert result.returncode == 0, result.stderr
    assert json.load(open(out))["tasks"][f"preference:jsonl:{messages}"]["pairs"] == 3


def _check_lora(workdir, tmp_path):
    config = tiny_config()
    config.train.steps = 2
    config.init_from = workdir
    config.lora.rank = 4
    lora_dir = str(tmp_path / "lora")
    train(config, lora_dir)
    base = load_workdir(workdir)
    own = load_workdir(lora_dir)  # the run's base (init_from) with its adapters folded in
    added = load_workdir(workdir, lora_workdir=lora_dir)
    jax.tree.map(np.testing.assert_array_equal, own.params, added.params)
    changed = jax.tree.map(lambda a, b: not np.array_equal(a, b), base.params, own.params)
    assert changed["blocks"]["attn"]["wq"] and not changed["embed"]
    with pytest.raises(ValueError, match="is not a LoRA run"):
        load_workdir(lora_dir, lora_workdir=workdir)


@pytest.mark.parametrize("app,flags,message", [
    ("eval.py", ["--mc={bad}"], "bad.jsonl:2: 'answer' must be a choice index 0-1"),
    ("generate.py", [], "no prompts"),
])
def test_bad_input_is_one_line_and_exit_2_before_loading_a_model(tmp_path, app, flags, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 1}\n'
                   '{"question": "q", "choices": ["a", "b"], "answer": 7}\n')
    result = _launch(app, f"--workdir={tmp_path}/no_such_run", *[f.format(bad=bad) for f in flags])
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_preference_eval_of_a_run_with_the_hf_chat_template_is_one_line_before_loading(tmp_path):
    config = base_config()
    config.data.chat_template = "hf"
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text(to_json(config))
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b"}) + "\n")
    result = _launch("eval.py", f"--workdir={tmp_path}/run", f"--preference=jsonl:{pairs}", "--preference_format=pairs")
    assert result.returncode == 2
    assert "data.chat_template=hf" in result.stderr and "Traceback" not in result.stderr
