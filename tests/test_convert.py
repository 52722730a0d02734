"""Hugging Face interop: logit parity with transformers, round trips, fine-tune then export, clear errors.

Every HF model is a tiny random one built from a config here (no downloads), with all weights perturbed
(norm scales and biases too) so that a wrong mapping cannot hide behind the default init.
"""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("safetensors")

from safetensors.numpy import load_file

from maxlm import sharding
from maxlm.convert import hf, workdir
from maxlm.checkpoint import load_params
from maxlm.data.hf_tokenizer import HFTokenizer, load_hf_tokenizer
from maxlm.data.tokenizer import Tokenizer, train_tokenizer
from maxlm.models import build_model

ROOT = Path(__file__).resolve().parent.parent
VOCAB, SEQ = 160, 16
_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)
_LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=64, **_IDS)
_OPT = dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=32, **_IDS)
CASES = {
    # GQA, head_dim != d_model / heads, untied, Llama-3 theta, Llama-3.1 rope scaling (its low, medium and
    # high frequency bands all occur at head_dim 16)
    "llama_gqa_llama3": lambda: transformers.LlamaConfig(
        **_LLAMA, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 48}),
    "llama_tied_linear": lambda: transformers.LlamaConfig(
        **_LLAMA, num_key_value_heads=4, tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "mistral_window": lambda: transformers.MistralConfig(**_LLAMA, num_key_value_heads=2, sliding_window=4),
    "qwen2_bias": lambda: transformers.Qwen2Config(**_LLAMA, num_key_value_heads=2, tie_word_embeddings=True),
    "opt_125m_like": lambda: transformers.OPTConfig(**_OPT, do_layer_norm_before=True, word_embed_proj_dim=32),
    "opt_350m_like": lambda: transformers.OPTConfig(**_OPT, do_layer_norm_before=False, word_embed_proj_dim=16),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=32,
                                            bos_token_id=1, eos_token_id=2),
}


@pytest.fixture(scope="module")
def hf_models(tmp_path_factory):
    """name -> (directory, transformers model), built once per module on first use."""
    built: dict[str, tuple[Path, object]] = {}

    def get(name: str):
        if name not in built:
            torch.manual_seed(sorted(CASES).index(name))
            model = transformers.AutoModelForCausalLM.from_config(CASES[name](), attn_implementation="eager").eval()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * 0.2)
            directory = tmp_path_factory.mktemp(name)
            model.save_pretrained(directory)
            assert (directory / "model.safetensors").is_file()
            built[name] = directory, model
        return built[name]

    return get


def _batch(seed: int = 0):
    """Right-padded rows of lengths SEQ, SEQ - 5 and 6 (padding: segment 0 / attention_mask 0)."""
    tokens = np.random.default_rng(seed).integers(3, VOCAB, (3, SEQ)).astype(np.int32)
    mask = (np.arange(SEQ)[None] < np.array([SEQ, SEQ - 5, 6])[:, None]).astype(np.int32)
    return np.where(mask, tokens, 0).astype(np.int32), mask


def _hf_logits(model, tokens, mask) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long), attention_mask=torch.tensor(mask)).logits.numpy()


def _one_device():
    return sharding.make_mesh(1, 1, 1, jax.devices()[:1])


@functools.cache
def _forward(cfg):
    return jax.jit(build_model(cfg).apply)


def _logits(overrides, params, tokens, mask) -> np.ndarray:
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), tokens.shape)
    return np.asarray(_forward(hf.model_config(overrides, attention="xla"))(params, tokens, positions, mask)[0])


def _max_diff(a, b, mask) -> float:
    return float(np.abs(a - b)[mask.astype(bool)].max())


def _assert_same_tensors(original: Path, exported: Path, tied: bool) -> None:
    ref = load_file(str(original / "model.safetensors"))
    if tied:
        ref.pop("lm_head.weight", None)
    got = {}
    for f in sorted(exported.glob("*.safetensors")):
        got.update(load_file(str(f)))
    assert sorted(got) == sorted(ref)
    for name, tensor in ref.items():
        assert got[name].dtype == tensor.dtype and np.array_equal(got[name], tensor), name


@pytest.mark.parametrize("name", sorted(CASES))
def test_logit_parity_and_round_trip(name, hf_models, tmp_path):
    directory, model = hf_models(name)
    overrides, params = hf.load_hf(directory, mesh=_one_device())
    tokens, mask = _batch()
    ref = _hf_logits(model, tokens, mask)
    ours = _logits(overrides, params, tokens, mask)
    assert ref.std() > 0.3  # not a trivially small output
    diff = _max_diff(ours, ref, mask)
    print(f"{name}: max |maxlm - transformers| = {diff:.2e}")
    assert diff <= 1e-4

    # HF -> maxlm -> HF: identical tensors in several shards with an index; transformers gives the same logits
    out = tmp_path / "export"
    cfg = hf.model_config(overrides)
    names = hf.save_hf(params, cfg, out, max_shard_bytes=40_000)
    assert len(names) > 1 and (out / hf.INDEX_FILE).is_file()
    _assert_same_tensors(directory, out, cfg.tie_embeddings)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
    assert _max_diff(_hf_logits(reloaded, tokens, mask), ref, mask) <= 1e-6
    again_overrides, again = hf.load_hf(out, mesh=_one_device())  # the sharded directory reads back too
    assert again_overrides == overrides
    jax.tree.map(np.testing.assert_array_equal, again, params)


def test_variants_are_read(hf_models):
    assert hf.model_overrides(hf.read_hf_config(hf_models("mistral_window")[0]))["sliding_window"] == 4
    llama = hf.model_overrides(hf.read_hf_config(hf_models("llama_gqa_llama3")[0]))
    assert (llama["rope_scaling"], llama["rope_theta"], llama["num_kv_heads"], llama["head_dim"]) == (
        "llama3", 500000.0, 2, 16)
    opt = hf.model_overrides(hf.read_hf_config(hf_models("opt_350m_like")[0]))
    assert (opt["norm_position"], opt["embed_dim"], opt["position_offset"]) == ("post", 16, 2)
    assert hf.model_overrides(hf.read_hf_config(hf_models("qwen2_bias")[0]))["qkv_bias"]


def test_params_are_placed_on_the_target_mesh(hf_models):
    directory, _ = hf_models("llama_gqa_llama3")
    mesh = sharding.make_mesh(1, 4, 2)
    _, params = hf.load_hf(directory, mesh=mesh)
    wq = params["blocks"]["attn"]["wq"]
    assert wq.sharding == jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp", "tensor", None))
    assert len({s.device for s in wq.addressable_shards}) == 8
    _, single = hf.load_hf(directory, mesh=_one_device())
    jax.tree.map(np.testing.assert_array_equal, params, single)


def test_fine_tuned_model_exports_with_its_logits(hf_models, tmp_path):
    directory, model = hf_models("llama_gqa_llama3")
    overrides, params = hf.load_hf(directory, mesh=_one_device())
    apply = build_model(hf.model_config(overrides, attention="xla")).apply
    tokens, mask = _batch(seed=1)
    positions = np.broadcast_to(np.arange(SEQ, dtype=np.int32), tokens.shape)

    def loss_fn(params):
        logits = apply(params, tokens[:, :-1], positions[:, :-1], mask[:, :-1])[0]
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, 1:, None], -1)[..., 0]
        return jnp.sum(nll * mask[:, 1:]) / jnp.sum(mask[:, 1:])

    tx = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state):
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    opt_state, losses = tx.init(params), []
    for _ in range(4):
        params, opt_state, loss = step(params, opt_state)
        losses.append(float(loss))
    assert losses[-1] < losses[0]

    ours = _logits(overrides, params, tokens, mask)
    assert _max_diff(ours, _hf_logits(model, tokens, mask), mask) > 1e-2  # it did change
    hf.save_hf(params, hf.model_config(overrides), tmp_path / "tuned", base_config=hf.read_hf_config(directory))
    tuned = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "tuned", attn_implementation="eager")
    diff = _max_diff(_hf_logits(tuned.eval(), tokens, mask), ours, mask)
    print(f"fine-tuned then exported: max |maxlm - transformers| = {diff:.2e}")
    assert diff <= 1e-4


def test_workdir_round_trip_keeps_config_and_tokenizer(hf_models, tmp_path):
    directory, _ = hf_models("gpt2")
    (directory / "tokenizer.json").write_text("{}")  # carried over byte for byte, not parsed
    config = workdir.hf_to_workdir(directory, tmp_path / "run")
    assert config["model"]["d_model"] == 32 and config["data"]["tokenizer"].endswith("hf/tokenizer.json")
    assert (tmp_path / "run" / "checkpoints" / "0" / "state").is_dir()
    _, cfg = workdir.read_model_config(tmp_path / "run")
    params = load_params(tmp_path / "run", hf.param_shardings(cfg, sharding.make_mesh(1, -1, 1)))
    assert params["blocks"]["attn"]["wq"].shape == (2, 32, 4, 8)
    workdir.workdir_to_hf(tmp_path / "run", tmp_path / "back")
    _assert_same_tensors(directory, tmp_path / "back", tied=True)
    back = json.loads((tmp_path / "back" / "config.json").read_text())
    assert (back["bos_token_id"], back["model_type"]) == (1, "gpt2")
    assert (tmp_path / "back" / "tokenizer.json").read_text() == "{}"


def test_export_of_a_run_from_a_checkpoint_dir_keeps_the_hf_files(hf_models, tmp_path):
    directory, _ = hf_models("gpt2")
    (directory / "tokenizer.json").write_text("{}")
    workdir.hf_to_workdir(directory, tmp_path / "base")
    workdir.hf_to_workdir(directory, tmp_path / "run")  # stands in for a run started from base's step 0
    for f in (tmp_path / "run" / "hf").iterdir():
        f.unlink()
    (tmp_path / "run" / "hf").rmdir()
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    config["init_from"] = str(tmp_path / "base" / "checkpoints" / "0")
    (tmp_path / "run" / "config.json").write_text(json.dumps(config))
    workdir.workdir_to_hf(tmp_path / "run", tmp_path / "back")
    assert json.loads((tmp_path / "back" / "config.json").read_text())["bos_token_id"] == 1
    assert (tmp_path / "back" / "tokenizer.json").read_text() == "{}"


def test_mistral_without_window_exports_no_window():
    cfg = hf.model_config(hf.model_overrides(dict(_LLAMA_JSON, model_type="mistral")))
    out = hf.hf_config(cfg, "mistral")
    assert "sliding_window" in out and out["sliding_window"] is None
    assert transformers.MistralConfig.from_dict(out).sliding_window is None  # not its default of 4096


def test_export_refuses_a_reward_model():
    cfg = hf.model_config(hf.model_overrides(dict(_LLAMA_JSON)), value_head=True)
    with pytest.raises(hf.UnsupportedHFError, match="value_head"):
        hf.hf_config(cfg)


# ---------------------------------------------------------------- clear errors


def _write_config(directory: Path, **config) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    return directory


_LLAMA_JSON = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, vocab_size=VOCAB)


@pytest.mark.parametrize("config, message", [
    (dict(model_type="falcon", hidden_size=32), "model_type='falcon' is not supported"),
    (dict(_LLAMA_JSON, rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling type 'yarn'"),
    (dict(_LLAMA_JSON, rope_parameters={"rope_type": "dynamic", "factor": 2.0}), "rope_scaling type 'dynamic'"),
    (dict(_LLAMA_JSON, attn_logit_softcapping=30.0), "field 'attn_logit_softcapping'"),
    (dict(_LLAMA_JSON, hidden_act="gelu"), "hidden_act='gelu'"),
    (dict(model_type="gpt2", n_embd=32, n_head=4, n_layer=2, n_positions=32, vocab_size=VOCAB,
          scale_attn_by_inverse_layer_idx=True), "scale_attn_by_inverse_layer_idx"),
    (dict(model_type="opt", hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
          max_position_embeddings=32, vocab_size=VOCAB, activation_function="gelu"), "activation_function"),
    (dict(_LLAMA_JSON, model_type="qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=1),
     "mixes full and sliding-window layers"),
])
def test_unsupported_configs_name_the_field(config, message, tmp_path):
    with pytest.raises(hf.UnsupportedHFError, match=message.replace("(", r"\(")):
        hf.load_hf(_write_config(tmp_path, **config))


def test_pickled_weights_are_refused_unread(tmp_path):
    directory = _write_config(tmp_path / "m", **_LLAMA_JSON)
    (directory / "pytorch_model.bin").write_bytes(b"not a pickle: never opened")
    with pytest.raises(hf.UnsupportedHFError, match="safetensors only"):
        hf.load_hf(directory)


def test_export_refuses_a_model_without_hf_equivalent():
    cfg = hf.model_config(hf.model_overrides(dict(_LLAMA_JSON)), norm="layernorm")
    with pytest.raises(hf.UnsupportedHFError, match="model.norm='layernorm'"):
        hf.hf_config(cfg)


def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    directory = _write_config(tmp_path / "m", model_type="bert", hidden_size=32)
    proc = subprocess.run([sys.executable, str(ROOT / "launch" / "convert.py"), f"--from_hf={directory}",
                           f"--to={tmp_path / 'run'}"], capture_output=True, text=True, cwd=ROOT, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: config.json model_type='bert'")


# ---------------------------------------------------------------- tokenizers


def test_tokenizer_json_behind_the_tokenizer_interface(tmp_path):
    from tokenizers import Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, trainers

    rust = RustTokenizer(models.BPE())
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    rust.train_from_iterator(["hello world, hello maxlm\n", "the quick brown fox"] * 20,
                             trainers.BpeTrainer(vocab_size=300, special_tokens=["<pad>", "<s>", "</s>"],
                                                 initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    rust.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    tok = load_hf_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    text = "hello world\nthe fox, é"
    assert tok.decode(tok.encode(text)) == text
    assert tok.encode_batch([text, "hello"]) == [tok.encode(text), tok.encode("hello")]
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, -1)
    assert tok.vocab_size == rust.get_vocab_size() and tok.piece_to_id(tok.id_to_piece(5)) == 5


def test_sentencepiece_model_in_the_directory_is_used_as_is(tmp_path):
    (tmp_path / "corpus.txt").write_text("to be or not to be\nthat is the question\n" * 10)
    trained = train_tokenizer([str(tmp_path / "corpus.txt")], str(tmp_path / "hf" / "tokenizer"), vocab_size=64,
                              model_type="char", byte_fallback=False)
    (tmp_path / "hf" / "tokenizer.json").write_text("{}")  # ignored: the .model wins
    tok = load_hf_tokenizer(tmp_path / "hf")
    assert isinstance(tok, Tokenizer) and tok.encode("to be") == trained.encode("to be")


def _gpt2_with_tokenizer(hf_models, tmp_path) -> tuple[Path, object]:
    """The tiny GPT-2 directory plus a sentencepiece ``tokenizer.model`` (char, Tiny Shakespeare)."""
    from maxlm.data.sources import BUILTIN_CORPORA, asset_path

    directory, hf_model = hf_models("gpt2")
    hf_dir = tmp_path / "gpt2"
    hf_dir.mkdir()
    for name in ("config.json", "model.safetensors"):
        (hf_dir / name).write_bytes((directory / name).read_bytes())
    corpus = asset_path(BUILTIN_CORPORA["tinyshakespeare"][0])
    train_tokenizer([corpus], str(hf_dir / "tokenizer"), vocab_size=VOCAB, model_type="char", byte_fallback=False)
    return hf_dir, hf_model


def test_train_init_from_hf_starts_from_the_hf_weights_and_tokenizer(hf_models, tmp_path):
    from maxlm.train.loop import train
    from tests.helpers import tiny_config

    hf_dir, _ = _gpt2_with_tokenizer(hf_models, tmp_path)
    (hf_dir / "generation_config.json").write_text('{"bos_token_id": 1, "eos_token_id": 2}')

    config = tiny_config()
    config.init_from_hf = str(hf_dir)
    config.train.update(steps=2, lr=1e-6, warmup_steps=0)
    config.checkpoint.every_steps = 1
    train(config, str(tmp_path / "run"))

    resolved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert resolved["model"]["d_model"] == 32 and resolved["model"]["position"] == "learned"
    assert resolved["model"]["vocab_size"] == VOCAB and resolved["data"]["tokenizer"] == str(hf_dir)
    _, imported = hf.load_hf(hf_dir)
    model = build_model(hf.model_config(hf.model_overrides(hf.read_hf_config(hf_dir))))
    trained = load_params(str(tmp_path / "run"), model.abstract_params())
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), trained, imported)
    assert max(jax.tree.leaves(diffs)) < 1e-4  # two steps at lr 1e-6 from the HF weights, not a fresh init

    # the export keeps the source's token ids, tokenizer and generation config (init_from_hf is the HF base)
    workdir.workdir_to_hf(tmp_path / "run", tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "config.json").read_text())
    assert (exported["bos_token_id"], exported["eos_token_id"]) == (1, 2)
    for name in ("tokenizer.model", "generation_config.json"):
        assert (tmp_path / "export" / name).read_bytes() == (hf_dir / name).read_bytes(), name


def test_train_init_from_hf_errors_name_the_directory(tmp_path):
    from maxlm.config import ConfigError
    from maxlm.train.loop import train
    from tests.helpers import tiny_config

    config = tiny_config()
    config.init_from_hf = str(tmp_path / "missing")
    with pytest.raises(ConfigError, match="init_from_hf=.*missing.*not a Hugging Face model directory"):
        train(config, str(tmp_path / "run"))


def test_a_converted_hf_model_loads_for_generate_and_eval_with_its_logits(hf_models, tmp_path):
    from maxlm.pretrained import load_workdir

    hf_dir, hf_model = _gpt2_with_tokenizer(hf_models, tmp_path)
    workdir.hf_to_workdir(hf_dir, tmp_path / "run")
    run = load_workdir(str(tmp_path / "run"))  # what launch/generate.py and launch/eval.py load
    tokens = np.asarray([run.tokenizer.encode("To be, or not")], np.int32)
    positions = np.arange(tokens.shape[1])[None]
    ours = np.asarray(run.model.apply(run.params, tokens, positions, np.ones_like(tokens))[0])
    with torch.no_grad():
        theirs = hf_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.max(np.abs(ours - theirs)) < 1e-4


def test_a_lora_run_from_hf_loads_its_adapters_on_the_hf_weights(hf_models, tmp_path):
    from maxlm.pretrained import load_workdir
    from maxlm.train.loop import train
    from tests.helpers import tiny_config

    hf_dir, _ = _gpt2_with_tokenizer(hf_models, tmp_path)
    config = tiny_config()
    config.init_from_hf = str(hf_dir)
    config.lora.rank = 4
    config.train.update(steps=1, lr=1e-3, warmup_steps=0)
    train(config, str(tmp_path / "lora"))
    run = load_workdir(str(tmp_path / "lora"))
    _, imported = hf.load_hf(hf_dir, mesh=_one_device())
    diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), run.params, imported)
    assert diffs["embed"] == 0 and 0 < diffs["blocks"]["attn"]["wq"]  # the HF base, adapters folded in
    assert max(jax.tree.leaves(diffs)) < 2e-2, diffs  # one small step from the HF weights, not a random base
