"""Hugging Face checkpoints <-> maxlm: config.json <-> model config, safetensors <-> params.

Architectures: Llama (1/2/3, rope scaling ``linear`` and ``llama3``, GQA, tied or not), Mistral (sliding
window), Qwen2 (q/k/v biases), OPT (learned positions with offset 2, pre- and post-norm, the projected
embeddings of 350m) and GPT-2 (Conv1D layout). A config field that would change the model and that maxlm
cannot express, or one the converter does not know, raises :class:`UnsupportedHFError` naming it; so does
exporting a maxlm model HF cannot express (e.g. a reward model's value head).

Import reads one tensor at a time from the safetensors files (memory-mapped) and builds every device's
shard of a parameter directly on the target mesh sharding. Export streams one layer's tensor at a time
into safetensors shards of at most ``max_shard_bytes``, with a ``model.safetensors.index.json`` when there
is more than one. Pickled ``.bin`` checkpoints are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from safetensors import safe_open
from safetensors.numpy import save_file

from maxlm import sharding
from maxlm.models import Model, Params, build_model
from maxlm.models.transformer import DTYPES, ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "opt": "OPTForCausalLM", "gpt2": "GPT2LMHeadModel"}
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Fields that do not change the forward pass (ids, bookkeeping, training-only dropout).
_BENIGN = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "bos_token_id", "eos_token_id",
    "pad_token_id", "sep_token_id", "decoder_start_token_id", "use_cache", "initializer_range", "_name_or_path",
    "attention_dropout", "dropout", "output_attentions", "output_hidden_states", "return_dict", "id2label",
    "label2id", "problem_type", "tokenizer_class", "prefix", "task_specific_params", "finetuning_task",
    "chunk_size_feed_forward", "is_decoder", "is_encoder_decoder", "tie_encoder_decoder", "max_length",
    "_attn_implementation_autoset", "keys_to_ignore_at_inference", "_commit_hash",
}
_BENIGN_BY_ARCH = {
    "llama": {"pretraining_tp"},
    "mistral": set(),
    "qwen2": set(),
    "opt": {"layerdrop", "init_std", "activation_dropout"},
    "gpt2": {"attn_pdrop", "embd_pdrop", "resid_pdrop", "summary_type", "summary_use_proj", "summary_activation",
             "summary_proj_to_labels", "summary_first_dropout", "reorder_and_upcast_attn", "n_ctx"},
}
_REQUIRED = {
    "rope": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size"),
    "opt": ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "ffn_dim",
            "max_position_embeddings"),
    "gpt2": ("vocab_size", "n_embd", "n_layer", "n_head", "n_positions"),
}
_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
              "original_max_position_embeddings", "partial_rotary_factor"}
_IGNORED_TENSORS = re.compile(r"(\.attn\.(masked_)?bias|rotary_emb\.inv_freq)$")


class UnsupportedHFError(ValueError):
    """An HF checkpoint maxlm cannot represent exactly; the message names the field or file."""


# ---------------------------------------------------------------- config.json -> maxlm


def read_hf_config(directory: str | os.PathLike) -> dict[str, Any]:
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a Hugging Face model directory")
    with open(path) as f:
        return json.load(f)


def model_overrides(hf: dict[str, Any], *, allow_unknown_fields: bool = False) -> dict[str, Any]:
    """The maxlm ``model`` config values (every shape and variant key, resolved) of an HF config.json."""
    arch = hf.get("model_type")
    if arch not in ARCHITECTURES:
        raise UnsupportedHFError(f"config.json model_type={arch!r} is not supported "
                                 f"(maxlm converts {', '.join(ARCHITECTURES)})")
    missing = [k for k in _REQUIRED.get(arch, _REQUIRED["rope"]) if hf.get(k) is None]
    if missing:
        raise UnsupportedHFError(f"config.json has no {missing[0]!r}, which a {arch} model needs")
    used: set[str] = set()

    def get(key: str, default: Any = None) -> Any:
        used.add(key)
        return hf.get(key, default)

    def require(key: str, ok: Callable[[Any], bool], default: Any, why: str) -> None:
        if not ok(get(key, default)):
            raise UnsupportedHFError(f"config.json {key}={hf.get(key)!r} is not supported: {why}")

    out = _opt(get, require) if arch == "opt" else _gpt2(get, require) if arch == "gpt2" else _rope_family(
        arch, get, require)
    out["vocab_size"] = get("vocab_size")
    unknown = sorted(set(hf) - used - _BENIGN - _BENIGN_BY_ARCH[arch])
    if unknown and not allow_unknown_fields:
        raise UnsupportedHFError(
            f"config.json field {unknown[0]!r}={hf[unknown[0]]!r} is not understood by the {arch} converter and "
            f"may change the model{f' (also: {unknown[1:]})' if unknown[1:] else ''}; "
            "pass allow_unknown_fields to convert anyway")
    return out


def _rope_family(arch: str, get, require) -> dict[str, Any]:
    d, h = get("hidden_size"), get("num_attention_heads")
    out = dict(d_model=d, num_layers=get("num_hidden_layers"), num_heads=h,
               num_kv_heads=get("num_key_value_heads") or h, head_dim=get("head_dim") or d // h,
               d_ff=get("intermediate_size"), max_seq_len=get("max_position_embeddings", 2048), norm="rmsnorm",
               norm_eps=get("rms_norm_eps", 1e-6), norm_position="pre", position="rope", position_offset=0,
               mlp="swiglu", use_bias=False, qkv_bias=arch == "qwen2", embed_dim=d,
               tie_embeddings=bool(get("tie_word_embeddings", False)), sliding_window=0)
    require("hidden_act", lambda v: v == "silu", "silu", "maxlm's swiglu MLP uses silu")
    out.update(_rope(get))
    if arch == "llama":
        require("attention_bias", lambda v: not v, False, "maxlm has no q/k/v/o-only biases for Llama")
        require("mlp_bias", lambda v: not v, False, "maxlm's swiglu MLP has no gate bias")
    elif arch == "mistral":
        out["sliding_window"] = get("sliding_window") or 0
    else:
        out["sliding_window"] = _qwen2_window(get, out["num_layers"])
        require("use_mrope", lambda v: not v, False, "multimodal rope is not implemented")
    return out


def _rope(get) -> dict[str, Any]:
    """rope_theta and scaling, from v5's ``rope_parameters`` or v4's ``rope_theta`` + ``rope_scaling``."""
    params = dict(get("rope_parameters") or get("rope_scaling") or {})
    if any(isinstance(v, dict) for v in params.values()):
        raise UnsupportedHFError(f"config.json rope_parameters per layer type ({sorted(params)}) are not supported")
    unknown = sorted(set(params) - _ROPE_KEYS)
    if unknown:
        raise UnsupportedHFError(f"config.json rope parameter {unknown[0]!r} is not supported")
    partial = params.get("partial_rotary_factor", get("partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise UnsupportedHFError(f"config.json partial_rotary_factor={partial} is not supported (maxlm rotates "
                                 "the whole head)")
    kind = params.get("rope_type", params.get("type", "default"))

    def need(key: str, default: Any = None) -> float:
        if params.get(key, default) is None:
            raise UnsupportedHFError(f"config.json rope scaling of type {kind!r} has no {key!r}")
        return float(params.get(key, default))

    out = dict(rope_theta=float(params.get("rope_theta", get("rope_theta", 10000.0))), rope_scaling="none")
    if kind == "linear":
        out.update(rope_scaling="linear", rope_factor=need("factor"))
    elif kind == "llama3":
        out.update(rope_scaling="llama3", rope_factor=need("factor"), rope_low_freq_factor=need("low_freq_factor"),
                   rope_high_freq_factor=need("high_freq_factor"),
                   rope_original_max_len=int(need("original_max_position_embeddings",
                                                  get("max_position_embeddings"))))
    elif kind != "default":
        raise UnsupportedHFError(f"config.json rope_scaling type {kind!r} is not supported "
                                 "(maxlm has default, linear and llama3)")
    return out


def _qwen2_window(get, num_layers: int) -> int:
    """Qwen2 slides the window only on some layers; maxlm supports all or none."""
    window, start = get("sliding_window") or 0, get("max_window_layers", num_layers)
    sliding = get("use_sliding_window", False)
    types = get("layer_types") or ["sliding_attention" if sliding and i >= start else "full_attention"
                                   for i in range(num_layers)]
    if set(types) == {"full_attention"}:
        return 0
    if set(types) == {"sliding_attention"} and window:
        return window
    raise UnsupportedHFError(f"config.json layer_types={types} mixes full and sliding-window layers, which maxlm "
                             "does not support")


def _opt(get, require) -> dict[str, Any]:
    d = get("hidden_size")
    pre = bool(get("do_layer_norm_before", True))
    require("activation_function", lambda v: v == "relu", "relu", "maxlm's OPT MLP is relu")
    require("layer_norm_elementwise_affine", bool, True, "maxlm's layer norms have a scale and a bias")
    require("_remove_final_layer_norm", lambda v: not (v and pre), False, "maxlm's pre-norm has a final norm")
    return dict(d_model=d, num_layers=get("num_hidden_layers"), num_heads=get("num_attention_heads"),
                num_kv_heads=get("num_attention_heads"), head_dim=d // get("num_attention_heads"),
                d_ff=get("ffn_dim"), max_seq_len=get("max_position_embeddings"), norm="layernorm", norm_eps=1e-5,
                norm_position="pre" if pre else "post", position="learned", position_offset=2, mlp="relu",
                use_bias=bool(get("enable_bias", True)), qkv_bias=False,
                embed_dim=get("word_embed_proj_dim") or d, tie_embeddings=bool(get("tie_word_embeddings", True)),
                sliding_window=0)


def _gpt2(get, require) -> dict[str, Any]:
    d, h = get("n_embd"), get("n_head")
    require("activation_function", lambda v: v in ("gelu_new", "gelu_pytorch_tanh"), "gelu_new",
            "maxlm's gelu is the tanh approximation (gelu_new)")
    require("scale_attn_weights", bool, True, "maxlm always scales attention by 1/sqrt(head_dim)")
    require("scale_attn_by_inverse_layer_idx", lambda v: not v, False, "maxlm does not scale by layer index")
    require("add_cross_attention", lambda v: not v, False, "maxlm is decoder-only")
    return dict(d_model=d, num_layers=get("n_layer"), num_heads=h, num_kv_heads=h, head_dim=d // h,
                d_ff=get("n_inner") or 4 * d, max_seq_len=get("n_positions"), norm="layernorm",
                norm_eps=get("layer_norm_epsilon", 1e-5), norm_position="pre", position="learned",
                position_offset=0, mlp="gelu", use_bias=True, qkv_bias=False, embed_dim=d,
                tie_embeddings=bool(get("tie_word_embeddings", True)), sliding_window=0)


def model_config(overrides: dict[str, Any], **changes: Any) -> ModelConfig:
    """A ``ModelConfig`` from :func:`model_overrides` (plus e.g. ``param_dtype``, ``attention``)."""
    return ModelConfig(**{**overrides, **changes})


# ---------------------------------------------------------------- maxlm -> config.json


def architecture(cfg: ModelConfig) -> str:
    """The HF architecture a maxlm model config corresponds to (by its position and bias variant)."""
    if cfg.position == "learned":
        return "opt" if cfg.position_offset == 2 else "gpt2"
    if cfg.position == "rope":
        return "qwen2" if cfg.qkv_bias else "mistral" if cfg.sliding_window else "llama"
    raise UnsupportedHFError(f"model.position={cfg.position!r} has no Hugging Face architecture")


def hf_config(cfg: ModelConfig, arch: str | None = None, base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The HF config.json of a maxlm model; ``base`` (e.g. the imported one) keeps its other fields (ids)."""
    if cfg.value_head:
        raise UnsupportedHFError("model.value_head=True (a reward model) has no Hugging Face CausalLM equivalent: "
                                 "its scalar head would be dropped")
    arch = arch or architecture(cfg)
    if arch not in ARCHITECTURES:
        raise UnsupportedHFError(f"architecture {arch!r} is not supported (one of {', '.join(ARCHITECTURES)})")
    common = {"architectures": [ARCHITECTURES[arch]], "model_type": arch, "vocab_size": cfg.vocab_size,
              "tie_word_embeddings": cfg.tie_embeddings, "dtype": cfg.param_dtype}
    if arch == "opt":
        out = dict(hidden_size=cfg.d_model, ffn_dim=cfg.d_ff, num_attention_heads=cfg.num_heads,
                   num_hidden_layers=cfg.num_layers, max_position_embeddings=cfg.max_seq_len,
                   word_embed_proj_dim=cfg.embed_width, do_layer_norm_before=cfg.norm_position == "pre",
                   enable_bias=cfg.use_bias, activation_function="relu", layer_norm_elementwise_affine=True,
                   _remove_final_layer_norm=False)
    elif arch == "gpt2":
        out = dict(n_embd=cfg.d_model, n_head=cfg.num_heads, n_layer=cfg.num_layers, n_inner=cfg.d_ff,
                   n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
                   scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False)
    else:
        out = dict(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_attention_heads=cfg.num_heads,
                   num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim, num_hidden_layers=cfg.num_layers,
                   max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
                   rope_theta=cfg.rope_theta, rope_scaling=_rope_scaling(cfg))
        if arch == "llama":
            out.update(attention_bias=False, mlp_bias=False)
        elif arch == "mistral":
            out["sliding_window"] = cfg.sliding_window or None
        else:
            out.update(use_sliding_window=bool(cfg.sliding_window), sliding_window=cfg.sliding_window or None,
                       max_window_layers=0 if cfg.sliding_window else cfg.num_layers, layer_types=None)
    out.update(common)
    result = {k: v for k, v in (base or {}).items() if k not in ("rope_parameters", "layer_types", "torch_dtype")}
    result.update(out)
    problems = _mismatches(cfg, model_overrides({k: v for k, v in result.items() if v is not None},
                                                allow_unknown_fields=True))
    if problems:
        raise UnsupportedHFError(f"this maxlm model cannot be written as {arch}: {'; '.join(problems)}")
    # sliding_window: None, else transformers' MistralConfig falls back to a 4096-token window
    return {k: v for k, v in result.items() if v is not None or k in ("rope_scaling", "sliding_window")}


def _rope_scaling(cfg: ModelConfig) -> dict[str, Any] | None:
    if cfg.rope_scaling == "linear":
        return {"rope_type": "linear", "factor": cfg.rope_factor}
    if cfg.rope_scaling == "llama3":
        return {"rope_type": "llama3", "factor": cfg.rope_factor, "low_freq_factor": cfg.rope_low_freq_factor,
                "high_freq_factor": cfg.rope_high_freq_factor,
                "original_max_position_embeddings": cfg.rope_original_max_len}
    return None


def _mismatches(cfg: ModelConfig, overrides: dict[str, Any]) -> list[str]:
    """The model fields the written config would not reproduce (e.g. a Llama with layer norms)."""
    got = dataclasses.replace(cfg, **overrides)
    return [f"model.{f.name}={getattr(cfg, f.name)!r} (written as {getattr(got, f.name)!r})"
            for f in dataclasses.fields(cfg) if getattr(cfg, f.name) != getattr(got, f.name)
            and not (f.name == "embed_dim" and cfg.embed_width == got.embed_width)]


# ---------------------------------------------------------------- tensor names and layouts


@dataclasses.dataclass(frozen=True)
class Rule:
    """One HF tensor <-> one or more maxlm params (one layer's slice for ``blocks/...``)."""

    hf: str  # '{i}' is the layer index
    paths: tuple[str, ...]  # maxlm param paths, '/'-separated
    to_maxlm: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf


def _copy(hf: str, path: str) -> Rule:
    return Rule(hf, (path,), lambda t: (t,), lambda a: a)


def _reshape(hf: str, path: str, shape: tuple[int, ...]) -> Rule:
    return Rule(hf, (path,), lambda t: (t.reshape(shape),), lambda a: a.reshape(-1))


def _linear(hf: str, path: str, shape: tuple[int, ...], n_in: int = 1) -> Rule:
    """nn.Linear's ``[out, in]`` <-> maxlm's ``[*in_dims, *out_dims]`` (the first ``n_in`` dims are inputs)."""
    n = math.prod(shape[:n_in])
    return Rule(hf, (path,), lambda t: (t.T.reshape(shape),), lambda a: np.ascontiguousarray(a.reshape(n, -1).T))


def _conv1d(hf: str, paths: tuple[str, ...], shapes: tuple[tuple[int, ...], ...], n_in: int = 1) -> Rule:
    """GPT-2's Conv1D ``[in, out]`` (its c_attn fuses q, k and v along ``out``) <-> maxlm params."""
    n = math.prod(shapes[0][:n_in]) if n_in else 1
    widths = [math.prod(s[n_in:]) for s in shapes]
    cuts = np.cumsum(widths)[:-1]

    def to_maxlm(t):
        flat = t.reshape(n, -1)
        return tuple(part.reshape(s) for part, s in zip(np.split(flat, cuts, axis=1), shapes))

    def to_hf(*arrays):
        out = np.concatenate([a.reshape(n, -1) for a in arrays], axis=1)
        return out.reshape(-1) if n_in == 0 else out

    return Rule(hf, paths, to_maxlm, to_hf)


def rules(cfg: ModelConfig, arch: str) -> list[Rule]:
    """Every tensor of the HF checkpoint of ``arch``, and where it lives in maxlm."""
    d, h, k, hd, f, e, v = (cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff, cfg.embed_width,
                            cfg.vocab_size)
    out: list[Rule] = []
    if arch == "gpt2":
        p, layer = "transformer.", "transformer.h.{i}."
        out += [_copy(p + "wte.weight", "embed"), _copy(p + "wpe.weight", "pos_embed"),
                _copy(p + "ln_f.weight", "final_norm/scale"), _copy(p + "ln_f.bias", "final_norm/bias"),
                _copy(layer + "ln_1.weight", "blocks/attn_norm/scale"),
                _copy(layer + "ln_1.bias", "blocks/attn_norm/bias"),
                _copy(layer + "ln_2.weight", "blocks/mlp_norm/scale"),
                _copy(layer + "ln_2.bias", "blocks/mlp_norm/bias"),
                _conv1d(layer + "attn.c_attn.weight", ("blocks/attn/wq", "blocks/attn/wk", "blocks/attn/wv"),
                        ((d, h, hd), (d, k, hd), (d, k, hd))),
                _conv1d(layer + "attn.c_attn.bias", ("blocks/attn/bq", "blocks/attn/bk", "blocks/attn/bv"),
                        ((h, hd), (k, hd), (k, hd)), n_in=0),
                _conv1d(layer + "attn.c_proj.weight", ("blocks/attn/wo",), ((h, hd, d),), n_in=2),
                _copy(layer + "attn.c_proj.bias", "blocks/attn/bo"),
                _conv1d(layer + "mlp.c_fc.weight", ("blocks/mlp/w_up",), ((d, f),)),
                _copy(layer + "mlp.c_fc.bias", "blocks/mlp/b_up"),
                _conv1d(layer + "mlp.c_proj.weight", ("blocks/mlp/w_down",), ((f, d),)),
                _copy(layer + "mlp.c_proj.bias", "blocks/mlp/b_down")]
    else:
        opt = arch == "opt"
        p = "model.decoder." if opt else "model."
        layer = p + "layers.{i}."
        attn = layer + "self_attn."
        out += [_copy(p + "embed_tokens.weight", "embed"),
                _linear(attn + "q_proj.weight", "blocks/attn/wq", (d, h, hd)),
                _linear(attn + "k_proj.weight", "blocks/attn/wk", (d, k, hd)),
                _linear(attn + "v_proj.weight", "blocks/attn/wv", (d, k, hd)),
                _linear(attn + ("out_proj" if opt else "o_proj") + ".weight", "blocks/attn/wo", (h, hd, d), 2)]
        if cfg.use_bias or cfg.qkv_bias:
            out += [_reshape(attn + "q_proj.bias", "blocks/attn/bq", (h, hd)),
                    _reshape(attn + "k_proj.bias", "blocks/attn/bk", (k, hd)),
                    _reshape(attn + "v_proj.bias", "blocks/attn/bv", (k, hd))]
        if opt:
            out += [_copy(p + "embed_positions.weight", "pos_embed"),
                    _copy(layer + "self_attn_layer_norm.weight", "blocks/attn_norm/scale"),
                    _copy(layer + "self_attn_layer_norm.bias", "blocks/attn_norm/bias"),
                    _copy(layer + "final_layer_norm.weight", "blocks/mlp_norm/scale"),
                    _copy(layer + "final_layer_norm.bias", "blocks/mlp_norm/bias"),
                    _linear(layer + "fc1.weight", "blocks/mlp/w_up", (d, f)),
                    _linear(layer + "fc2.weight", "blocks/mlp/w_down", (f, d))]
            if cfg.use_bias:
                out += [_copy(attn + "out_proj.bias", "blocks/attn/bo"), _copy(layer + "fc1.bias", "blocks/mlp/b_up"),
                        _copy(layer + "fc2.bias", "blocks/mlp/b_down")]
            if cfg.norm_position == "pre":
                out += [_copy(p + "final_layer_norm.weight", "final_norm/scale"),
                        _copy(p + "final_layer_norm.bias", "final_norm/bias")]
            if cfg.projects_embeddings:
                out += [_linear(p + "project_in.weight", "w_proj_in", (e, d)),
                        _linear(p + "project_out.weight", "w_proj_out", (d, e))]
        else:
            out += [_copy(p + "norm.weight", "final_norm/scale"),
                    _copy(layer + "input_layernorm.weight", "blocks/attn_norm/scale"),
                    _copy(layer + "post_attention_layernorm.weight", "blocks/mlp_norm/scale"),
                    _linear(layer + "mlp.gate_proj.weight", "blocks/mlp/w_gate", (d, f)),
                    _linear(layer + "mlp.up_proj.weight", "blocks/mlp/w_up", (d, f)),
                    _linear(layer + "mlp.down_proj.weight", "blocks/mlp/w_down", (f, d))]
    if not cfg.tie_embeddings:
        out.append(_linear("lm_head.weight", "lm_head", (e, v)))
    return out


# ---------------------------------------------------------------- safetensors -> params


def load_hf(
    directory: str | os.PathLike,
    *,
    mesh: Mesh | None = None,
    rules_table: sharding.Rules = sharding.DEFAULT_RULES,
    param_dtype: str = "float32",
    allow_unknown_fields: bool = False,
    model: Model | None = None,
) -> tuple[dict[str, Any], Params]:
    """Reads an HF model directory as ``(model overrides, params)``.

    The overrides are maxlm ``model`` config values (``config.model.update(overrides)``); the params are
    placed on ``mesh`` (default: every device, the default FSDP layout) with the model's shardings, in
    ``param_dtype``. Memory: one HF tensor plus the shards being built. ``model``: the already built
    maxlm model of these overrides (``build_model`` cannot run inside ``jax.set_mesh``), else built here;
    a given model's ``cfg.param_dtype`` wins over ``param_dtype``.
    """
    hf = read_hf_config(directory)
    overrides = model_overrides(hf, allow_unknown_fields=allow_unknown_fields)
    mesh = mesh if mesh is not None else sharding.make_mesh(1, -1, 1)
    model = model or build_model(model_config(overrides, param_dtype=param_dtype), rules_table)
    cfg, param_dtype = model.cfg, model.cfg.param_dtype
    abstract = model.abstract_params()
    specs = model.param_specs()
    files = _weight_files(Path(directory))
    with ExitStack() as stack:
        handles = {name: stack.enter_context(safe_open(str(path), framework="numpy")) for name, path in files.items()}
        tensors = {key: name for name, handle in handles.items() for key in handle.keys()}
        params: dict[str, Any] = {}
        used: set[str] = set()
        for rule in rules(cfg, hf["model_type"]):
            layers = range(cfg.num_layers) if rule.stacked else [None]
            names = [_resolve(rule.hf.format(i=i), tensors) for i in layers]
            used.update(names)
            for index, path in enumerate(rule.paths):
                target = _get(abstract, path)
                spec = sharding.fit_spec(_get(specs, path), target.shape, mesh)
                read = _reader(rule, index, names, lambda n: handles[tensors[n]].get_tensor(n), target,
                               DTYPES[param_dtype])
                _set(params, path, jax.make_array_from_callback(target.shape, NamedSharding(mesh, spec), read))
    extra = sorted(n for n in set(tensors) - used if not _IGNORED_TENSORS.search(n)
                   and not (cfg.tie_embeddings and n.endswith("lm_head.weight")))
    if extra:
        raise UnsupportedHFError(f"{directory}: tensor {extra[0]!r} has no place in the maxlm model"
                                 f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}")
    return overrides, params


def _weight_files(directory: Path) -> dict[str, Path]:
    """{file name: path} of the safetensors weights; refuses pickled ``.bin`` checkpoints."""
    index = directory / INDEX_FILE
    if index.is_file():
        with open(index) as f:
            names = sorted(set(json.load(f)["weight_map"].values()))
        return {n: directory / n for n in names}
    if (directory / SINGLE_FILE).is_file():
        return {SINGLE_FILE: directory / SINGLE_FILE}
    if list(directory.glob("*.bin")) or list(directory.glob("*.pt")) or list(directory.glob("*.pth")):
        raise UnsupportedHFError(f"{directory} has only pickled weights (.bin/.pt); maxlm reads safetensors only, "
                                 "because unpickling can run arbitrary code. Convert them with a trusted tool "
                                 "(e.g. transformers' save_pretrained) first")
    raise FileNotFoundError(f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}")


def _resolve(name: str, tensors: dict[str, str]) -> str:
    """The stored name of a tensor; old checkpoints lack the 'model.' / 'transformer.' prefix."""
    if name in tensors:
        return name
    head, _, rest = name.partition(".")
    if head in ("model", "transformer") and rest in tensors:
        return rest
    raise UnsupportedHFError(f"the checkpoint has no tensor {name!r}, which this config.json needs")


def _reader(rule: Rule, index: int, names: list[str], get_tensor: Callable[[str], np.ndarray], target,
            dtype) -> Callable:
    """A ``make_array_from_callback`` callback: builds one device's shard, one HF tensor at a time."""

    want = tuple(target.shape[1:] if rule.stacked else target.shape)

    def one(name: str) -> np.ndarray:
        tensor = get_tensor(name)
        try:
            out = rule.to_maxlm(tensor)[index]
        except ValueError:
            out = None
        if out is None or out.shape != want:
            raise UnsupportedHFError(f"tensor {name!r} has shape {tensor.shape}, which does not fit maxlm's "
                                     f"{rule.paths[index]} {want} under this config.json")
        return out

    def read(idx: tuple[slice, ...]) -> np.ndarray:
        if not rule.stacked:
            return np.asarray(one(names[0])[idx], dtype)
        layers = range(len(names))[idx[0]]
        return np.stack([np.asarray(one(names[i])[idx[1:]], dtype) for i in layers])

    return read


def _get(tree: dict[str, Any], path: str) -> Any:
    for key in path.split("/"):
        tree = tree[key]
    return tree


def _set(tree: dict[str, Any], path: str, value: Any) -> None:
    *parents, last = path.split("/")
    for key in parents:
        tree = tree.setdefault(key, {})
    tree[last] = value


# ---------------------------------------------------------------- params -> safetensors


def save_hf(
    params: Params,
    cfg: ModelConfig,
    directory: str | os.PathLike,
    *,
    arch: str | None = None,
    base_config: dict[str, Any] | None = None,
    max_shard_bytes: int = 5 * 2**30,
    dtype: str | None = None,
) -> list[str]:
    """Writes ``config.json`` and safetensors that ``transformers`` loads; returns the weight file names.

    Tensors are fetched one layer at a time and written in shards of at most ``max_shard_bytes`` (a tensor
    larger than that gets a shard of its own), with ``model.safetensors.index.json`` when there are several.
    ``dtype`` (float32, bfloat16, float16; default: the params' own) is the stored dtype; ``base_config`` is an HF config.json whose
    other fields (token ids ...) are kept.
    """
    arch = arch or (base_config or {}).get("model_type") or architecture(cfg)
    config = hf_config(cfg, arch, base_config)
    config["dtype"] = dtype or str(np.dtype(params["embed"].dtype))
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in [*directory.glob("model*.safetensors"), directory / INDEX_FILE]:
        stale.unlink(missing_ok=True)
    shard: dict[str, np.ndarray] = {}
    written: list[tuple[str, list[str]]] = []  # (temporary file name, its tensor names)
    size = total = 0

    def flush() -> None:
        nonlocal shard, size
        if shard:
            tmp = f"model-{len(written) + 1:05d}.tmp.safetensors"
            save_file(shard, str(directory / tmp), metadata={"format": "pt"})
            written.append((tmp, sorted(shard)))
            shard, size = {}, 0

    for rule in rules(cfg, arch):
        for i in range(cfg.num_layers) if rule.stacked else [None]:
            arrays = [np.asarray(jax.device_get(_get(params, p) if i is None else _get(params, p)[i]))
                      for p in rule.paths]
            tensor = rule.to_hf(*arrays)
            tensor = np.ascontiguousarray(tensor.astype(DTYPES[dtype]) if dtype else tensor)
            if size and size + tensor.nbytes > max_shard_bytes:
                flush()
            shard[rule.hf.format(i=i)] = tensor
            size += tensor.nbytes
            total += tensor.nbytes
    flush()
    names = [SINGLE_FILE] if len(written) == 1 else [
        f"model-{n + 1:05d}-of-{len(written):05d}.safetensors" for n in range(len(written))]
    for (tmp, _), name in zip(written, names):
        os.replace(directory / tmp, directory / name)
    if len(written) > 1:
        weight_map = {key: name for (_, keys), name in zip(written, names) for key in keys}
        with open(directory / INDEX_FILE, "w") as f:
            json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
    with open(directory / "config.json", "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    return names


def param_shardings(cfg: ModelConfig, mesh: Mesh, rules_table: sharding.Rules = sharding.DEFAULT_RULES):
    """Abstract params (``jax.ShapeDtypeStruct`` with their mesh sharding) of ``cfg``, e.g. for ``load_params``."""
    model = build_model(cfg, rules_table)
    abstract = model.abstract_params()
    return jax.tree.map(
        lambda spec, a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=NamedSharding(
            mesh, sharding.fit_spec(spec, a.shape, mesh))),
        model.param_specs(), abstract, is_leaf=lambda x: isinstance(x, P))
