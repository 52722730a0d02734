"""Experiment configuration: the schema with its defaults, and validation.

Configs are ``ml_collections.ConfigDict`` files in ``configs/`` (the absl
``config_flags`` style). Each preset starts from :func:`base_config` and
overrides what it needs; the command line overrides any key with
``--config.a.b=value``. :func:`validate` checks the resolved config once, at
start-up, and raises :class:`ConfigError` with one line naming the key.
"""

from __future__ import annotations

import difflib
import importlib.util
import json
import os
import sys
from collections.abc import Sequence

import jax
import ml_collections
from absl import flags

from maxlm.models.attention import IMPLEMENTATIONS as ATTENTION_IMPLEMENTATIONS
from maxlm.sharding import DEFAULT_RULES, resolve_mesh_shape

ConfigDict = ml_collections.ConfigDict


class ConfigError(ValueError):
    """A bad config value; the message names the key."""


def base_config() -> ConfigDict:
    """Every key maxlm reads, with its default. Presets override a subset."""
    c = ConfigDict()
    c.seed = 0
    # XLA's persistent compilation cache: a rerun (or resume) skips compiling what it compiled before. "": off.
    c.compile_cache_dir = "~/.cache/maxlm/xla"
    c.init_from = ""  # a maxlm workdir or checkpoint dir: load params only (fine-tuning)
    # A Hugging Face model directory (config.json + safetensors; needs the hf extra): its architecture sets
    # the model section, its weights the initial params, and its tokenizer replaces data.tokenizer=char.
    c.init_from_hf = ""

    c.model = ConfigDict(dict(
        vocab_size=0,  # 0: taken from the tokenizer
        d_model=128,
        num_layers=4,
        num_heads=4,
        num_kv_heads=0,  # 0: = num_heads (MHA); 1: MQA; in between: GQA
        head_dim=0,  # 0: d_model // num_heads
        d_ff=0,  # 0: 4 * d_model
        max_seq_len=1024,  # size of the learned position table; a bound for RoPE models too
        norm="rmsnorm",  # rmsnorm | layernorm
        norm_eps=1e-5,
        norm_position="pre",  # pre | post (OPT-350m)
        position="rope",  # rope | learned | none
        rope_theta=10000.0,
        rope_scaling="none",  # none | linear | llama3 (Llama-3.1's frequency-dependent scaling)
        rope_factor=1.0,  # linear/llama3: how much longer the context becomes
        rope_low_freq_factor=1.0,  # llama3 only
        rope_high_freq_factor=4.0,  # llama3 only
        rope_original_max_len=8192,  # llama3 only: the pretraining context
        position_offset=0,  # learned positions: OPT uses 2
        mlp="swiglu",  # swiglu | gelu | relu
        use_bias=False,
        qkv_bias=False,  # biases on q/k/v only (Qwen2); use_bias puts them on every projection
        embed_dim=0,  # 0: d_model; else token embeddings of this width with in/out projections (OPT-350m)
        tie_embeddings=False,
        dropout=0.0,
        param_dtype="float32",
        compute_dtype="float32",  # float32 | bfloat16 | float16 (float16: dynamic loss scaling)
        init_std=0.02,
        scale_residual_init=True,  # output projections: std / sqrt(2 * num_layers)
        attention="auto",  # xla | cudnn | pallas | auto
        sliding_window=0,  # 0: off; W: each query sees its last W keys
        remat="none",  # none | full | dots
        scan_layers=True,
        value_head=False,  # a scalar head per position (train.objective=reward)
    ))

    # cpu_devices (CPU backend only): split the host into this many JAX devices, set before JAX starts.
    # One device per core with data parallelism beats XLA:CPU's own threading for small models.
    c.mesh = ConfigDict(dict(data=1, fsdp=-1, tensor=1, rules=DEFAULT_RULES, cpu_devices=0,
                             # hybrid mesh across slices / nodes: how many of each axis's devices sit in different
                             # slices (TPU) or processes (GPU, CPU); each must divide its axis
                             dcn_data=1, dcn_fsdp=1, dcn_tensor=1))
    # Multi-process runs (maxlm/distributed.py): "" = the cluster's environment (SLURM, Cloud TPU pod, Open MPI) or
    # a single process; else the coordinator's host:port, with num_processes and this process's process_id.
    c.distributed = ConfigDict(dict(coordinator_address="", num_processes=0, process_id=-1, cpu_collectives="gloo"))

    c.data = ConfigDict(dict(
        source="builtin:tinyshakespeare",
        tokenizer="char",  # char: a sentencepiece char model trained on the source; or a .model path
        tokenizer_text="",  # what a char tokenizer is trained on (a source spec); "": the source's text. Give
        # stages that share a model (pretrain, then SFT from init_from) the same one, so they share a vocabulary
        val_fraction=0.1,
        on_bad_record="error",  # error | skip
        cache_dir="",  # tokenizer cache; "": WORKDIR/cache
        # SFT (train.objective=sft): records in data.source rendered with a chat template.
        sft_format="hh",  # hh | chat | instruction
        sft_field="chosen",  # the dialogue field of hh records
        chat_template="hh",  # hh | chatml | hf (SFT: the template of the HF tokenizer directory in data.tokenizer)
        train_on_prompt=False,  # also put loss on the user/system turns
        truncate=False,  # cut examples longer than seq_len+1 (logged) instead of an error
        # Preference pairs (train.objective=dpo|reward), rendered with data.chat_template.
        preference_format="hh",  # hh: HH-RLHF chosen/rejected dialogues | pairs: {prompt, chosen, rejected}
        max_prompt_len=0,  # a pair longer than seq_len+1 keeps the end of its prompt, cut no shorter than
        # this (0: half the row), then caps the completions at what is left
    ))

    c.train = ConfigDict(dict(
        objective="pretrain",
        steps=1000,
        batch_size=32,  # global, in sequences
        seq_len=256,
        grad_accum=1,  # micro-batches per step; batch_size must divide by it
        steps_per_call=1,  # train steps per jitted call, a lax.scan over that many batches: less host work per
        # step for small models; eval_every and checkpoint.every_steps must be multiples of it
        lr=3e-4,
        schedule="cosine",  # cosine | linear | constant
        warmup_steps=100,
        min_lr_ratio=0.1,  # decay floor as a fraction of lr (OPT: 0.1)
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        weight_decay=0.1,
        decay_embeddings=False,  # weight decay on embedding tables too
        clip_norm=1.0,  # 0: off
        z_loss=0.0,
        log_every=10,
        eval_every=500,  # 0: only at the end
        eval_batches=20,  # 0: no evaluation (then data.val_fraction may be 0: every record trains)
        # DPO (train.objective=dpo): the reference is init_from (a frozen copy), or under LoRA the base
        # with the adapters off.
        dpo=ConfigDict(dict(
            beta=0.1,
            loss="sigmoid",  # sigmoid (DPO) | ipo | hinge
            label_smoothing=0.0,  # conservative DPO (sigmoid only): assumed probability of a flipped label
            reference_free=False,  # no reference model (its log-probs are 0)
            precompute_reference=False,  # reference log-probs in one pass before training (cached in
            # data.cache_dir), after which no reference params are kept
        )),
        # Divergence guard: on a non-finite loss, a loss spike or a grad-norm blow-up, roll back to
        # the last good checkpoint, skip the data since then, scale lr/clip, continue.
        divergence=ConfigDict(dict(
            enabled=True,
            window=50,  # healthy steps in the rolling loss / grad-norm statistics
            spike_sigma=6.0,  # a spike: loss > rolling mean + spike_sigma * rolling std ...
            spike_patience=3,  # ... for this many consecutive steps
            grad_norm_factor=10.0,  # a blow-up: grad norm > factor * rolling mean
            min_loss_scale=1.0,  # float16 loss scale at or below this: collapsed
            lr_factor=0.5,  # the lr is multiplied by this at every rollback
            clip_factor=1.0,  # the clip threshold too (OPT went 1.0 -> 0.3)
            max_rollbacks=3,
        )),
    ))

    # Test hooks for the fault-tolerance machinery.
    c.debug = ConfigDict(dict(
        # poison the loss mask with NaN at these 0-based steps (s: the batch of the step logged as s + 1), once
        # per step per process; not for train.objective=reward, whose loss reads no loss mask
        nan_at_steps=(),
    ))

    c.checkpoint = ConfigDict(dict(
        every_steps=1000,  # 0: off
        every_minutes=0.0,  # 0: off
        keep_last=3,
        keep_every=0,  # keep every P-th step permanently; 0: none
        async_save=True,
    ))

    # LoRA: train low-rank adapters on a frozen base (init_from, else a random base); 0 = full fine-tuning.
    # quantize_base (QLoRA-style): the frozen targeted weights are stored as int8 with per-channel scales.
    c.lora = ConfigDict(dict(rank=0, alpha=16.0, targets=r"attn/w[qkvo]|mlp/w_(gate|up|down)", quantize_base=False,
                             dropout=0.0))  # dropout: on the input of the adapter branches, in training

    # The text sampled at the end of training: num_tokens 0: none; temperature 0: greedy; top_k 0: off.
    c.sample = ConfigDict(dict(prompt="\n", num_tokens=200, temperature=0.8, top_k=0))
    return c


_CHOICES = {
    "model.norm": ("rmsnorm", "layernorm"),
    "model.norm_position": ("pre", "post"),
    "model.position": ("rope", "learned", "none"),
    "model.rope_scaling": ("none", "linear", "llama3"),
    "model.mlp": ("swiglu", "gelu", "relu"),
    "model.param_dtype": ("float32", "bfloat16"),
    "model.compute_dtype": ("float32", "bfloat16", "float16"),
    "model.attention": ATTENTION_IMPLEMENTATIONS,
    "model.remat": ("none", "full", "dots"),
    "train.objective": ("pretrain", "sft", "dpo", "reward"),
    "train.dpo.loss": ("sigmoid", "ipo", "hinge"),
    "data.preference_format": ("hh", "pairs"),
    "data.sft_format": ("hh", "chat", "instruction"),
    "data.chat_template": ("hh", "chatml", "hf"),
    "train.schedule": ("cosine", "linear", "constant"),
    "data.on_bad_record": ("error", "skip"),
}


def _get(config: ConfigDict, key: str):
    node = config
    for part in key.split("."):
        node = node[part]
    return node


def check_distributed(config: ConfigDict) -> None:
    """The ``distributed`` section, checked before JAX starts (it connects the processes)."""
    d = config.distributed
    if d.coordinator_address and not (d.num_processes > 0 and 0 <= d.process_id < d.num_processes):
        raise ConfigError(f"distributed.coordinator_address={d.coordinator_address!r} needs distributed.num_processes "
                          f"> 0 and 0 <= distributed.process_id < num_processes (got {d.num_processes}, {d.process_id})")
    if not d.coordinator_address and (d.num_processes or d.process_id != -1):
        raise ConfigError("distributed.num_processes / process_id need distributed.coordinator_address")
    if d.cpu_collectives not in ("gloo", "mpi"):
        raise ConfigError(f"distributed.cpu_collectives={d.cpu_collectives!r} is not one of gloo, mpi")


def validate(config: ConfigDict, num_devices: int) -> None:
    """Checks choices, positivity and cross-field constraints. Raises ConfigError."""
    for key, choices in _CHOICES.items():
        if _get(config, key) not in choices:
            raise ConfigError(f"{key}={_get(config, key)!r} is not one of {', '.join(choices)}")
    m, t = config.model, config.train
    for key in ("model.d_model", "model.num_layers", "model.num_heads", "train.steps",
                "train.batch_size", "train.seq_len", "train.grad_accum", "train.steps_per_call", "train.log_every"):
        if _get(config, key) <= 0:
            raise ConfigError(f"{key}={_get(config, key)} must be positive")
    if m.num_kv_heads < 0 or m.head_dim < 0 or m.d_ff < 0 or m.vocab_size < 0:
        raise ConfigError("model.num_kv_heads, model.head_dim, model.d_ff and model.vocab_size must be >= 0")
    if not m.head_dim and m.d_model % m.num_heads:
        raise ConfigError(f"model.num_heads={m.num_heads} does not divide model.d_model={m.d_model} "
                          "(or set model.head_dim)")
    kv = m.num_kv_heads or m.num_heads
    if m.num_heads % kv:
        raise ConfigError(f"model.num_kv_heads={kv} does not divide model.num_heads={m.num_heads}")
    if m.position == "rope" and (m.head_dim or m.d_model // m.num_heads) % 2:
        raise ConfigError("model.position=rope needs an even head dimension")
    if not 0.0 <= m.dropout < 1.0:
        raise ConfigError(f"model.dropout={m.dropout} must be in [0, 1)")
    if m.sliding_window < 0:
        raise ConfigError(f"model.sliding_window={m.sliding_window} must be >= 0")
    if m.embed_dim < 0:
        raise ConfigError(f"model.embed_dim={m.embed_dim} must be >= 0 (0: d_model)")
    if m.rope_scaling != "none" and (m.position != "rope" or m.rope_factor <= 0):
        raise ConfigError(f"model.rope_scaling={m.rope_scaling} needs model.position=rope and model.rope_factor > 0")
    if m.rope_scaling == "llama3" and not 0 < m.rope_low_freq_factor < m.rope_high_freq_factor:
        raise ConfigError(f"model.rope_scaling=llama3 needs 0 < model.rope_low_freq_factor ({m.rope_low_freq_factor})"
                          f" < model.rope_high_freq_factor ({m.rope_high_freq_factor})")
    if m.attention == "cudnn" and jax.default_backend() != "gpu":
        raise ConfigError(f"model.attention=cudnn needs a GPU (backend here: {jax.default_backend()}); "
                          "use auto, xla or pallas")
    if t.seq_len > m.max_seq_len:
        raise ConfigError(f"train.seq_len={t.seq_len} exceeds model.max_seq_len={m.max_seq_len}")
    if t.batch_size % t.grad_accum:
        raise ConfigError(f"train.grad_accum={t.grad_accum} does not divide train.batch_size={t.batch_size}")
    if not 0 <= t.warmup_steps < t.steps:
        raise ConfigError(f"train.warmup_steps={t.warmup_steps} must be in [0, train.steps={t.steps})")
    if not 0.0 <= t.min_lr_ratio <= 1.0:
        raise ConfigError(f"train.min_lr_ratio={t.min_lr_ratio} must be in [0, 1]")
    if t.eval_every < 0 or t.clip_norm < 0 or t.z_loss < 0:
        raise ConfigError("train.eval_every, train.clip_norm and train.z_loss must be >= 0")
    for key in ("train.eval_every", "checkpoint.every_steps"):
        if _get(config, key) % t.steps_per_call:
            raise ConfigError(f"{key}={_get(config, key)} is not a multiple of train.steps_per_call={t.steps_per_call} "
                              "(evals and checkpoints happen between calls)")
    if not config.data.tokenizer:
        raise ConfigError("data.tokenizer is empty: give 'char' or the path of a sentencepiece .model")
    if config.data.chat_template == "hf" and not (t.objective == "sft" and os.path.isdir(config.data.tokenizer)):
        raise ConfigError("data.chat_template=hf renders SFT dialogues with the chat template of a Hugging Face "
                          f"tokenizer directory: it needs train.objective=sft and data.tokenizer (or init_from_hf) "
                          f"naming that directory (data.tokenizer={config.data.tokenizer!r})")
    if t.eval_batches < 0:
        raise ConfigError(f"train.eval_batches={t.eval_batches} must be >= 0 (0: no evaluation)")
    if not 0.0 <= config.data.val_fraction < 1.0 or (config.data.val_fraction == 0 and t.eval_batches):
        raise ConfigError(f"data.val_fraction={config.data.val_fraction} must be in (0, 1), or 0 with "
                          "train.eval_batches=0 (no evaluation)")
    if config.init_from and config.init_from_hf:
        raise ConfigError("set init_from (a maxlm checkpoint) or init_from_hf (a Hugging Face directory), not both")
    if config.mesh.cpu_devices < 0:
        raise ConfigError(f"mesh.cpu_devices={config.mesh.cpu_devices} must be >= 0 (0: JAX's default)")
    try:
        shape = resolve_mesh_shape(config.mesh.data, config.mesh.fsdp, config.mesh.tensor, num_devices)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    data, fsdp, tensor = shape
    for name, size in zip(("data", "fsdp", "tensor"), shape):
        dcn = config.mesh[f"dcn_{name}"]
        if dcn < 1 or size % dcn:
            raise ConfigError(f"mesh.dcn_{name}={dcn} must be >= 1 and divide mesh.{name}={size}")
    micro = t.batch_size // t.grad_accum
    if micro % (data * fsdp):
        raise ConfigError(f"train.batch_size/train.grad_accum={micro} is not divisible by the "
                          f"mesh's data*fsdp={data * fsdp}")
    if m.num_heads % tensor or kv % tensor:
        raise ConfigError(f"mesh.tensor={tensor} must divide model.num_heads={m.num_heads} "
                          f"and model.num_kv_heads={kv}")
    if config.lora.rank < 0 or (config.lora.rank and config.lora.alpha <= 0):
        raise ConfigError(f"lora.rank={config.lora.rank} must be >= 0 and lora.alpha > 0")
    if not 0.0 <= config.lora.dropout < 1.0:
        raise ConfigError(f"lora.dropout={config.lora.dropout} must be in [0, 1)")
    if config.lora.quantize_base and not config.lora.rank:
        raise ConfigError("lora.quantize_base stores the frozen LoRA base in int8: it needs lora.rank > 0")
    _validate_preference(config)
    for key in ("sample.num_tokens", "sample.temperature", "sample.top_k"):
        if _get(config, key) < 0:
            raise ConfigError(f"{key}={_get(config, key)} must be >= 0")
    if config.debug.nan_at_steps and t.objective == "reward":
        raise ConfigError("debug.nan_at_steps poisons the loss mask, which train.objective=reward does not read: "
                          "it would do nothing")
    c = config.checkpoint
    if c.every_steps < 0 or c.every_minutes < 0 or c.keep_last < 1 or c.keep_every < 0:
        raise ConfigError("checkpoint.every_steps/every_minutes/keep_every must be >= 0 and keep_last >= 1")


def _validate_preference(config: ConfigDict) -> None:
    t, d = config.train, config.train.dpo
    if not 0 <= config.data.max_prompt_len < t.seq_len:
        raise ConfigError(f"data.max_prompt_len={config.data.max_prompt_len} must be in [0, train.seq_len={t.seq_len})")
    if t.objective == "reward":
        if not config.model.value_head:
            raise ConfigError("train.objective=reward needs model.value_head=True (the scalar reward head)")
        if config.lora.rank:
            raise ConfigError("train.objective=reward trains the whole model and its value head; set lora.rank=0")
    if t.objective != "dpo":
        return
    if d.beta <= 0:
        raise ConfigError(f"train.dpo.beta={d.beta} must be positive")
    if not 0.0 <= d.label_smoothing < 0.5:
        raise ConfigError(f"train.dpo.label_smoothing={d.label_smoothing} must be in [0, 0.5)")
    if d.label_smoothing and d.loss != "sigmoid":
        raise ConfigError(f"train.dpo.label_smoothing applies to train.dpo.loss=sigmoid, not {d.loss!r}")
    if d.reference_free and d.precompute_reference:
        raise ConfigError("train.dpo.precompute_reference has no reference to run with train.dpo.reference_free=True")
    if not (d.reference_free or config.init_from or config.init_from_hf or config.lora.rank):
        raise ConfigError("train.objective=dpo needs a reference model: set init_from (the SFT checkpoint, also the "
                          "policy's start), or lora.rank > 0 (the base with adapters off), or "
                          "train.dpo.reference_free=True")


def to_json(config: ConfigDict) -> str:
    return json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str)


def parse_flags_or_exit(argv: Sequence[str]) -> list[str]:
    """absl flag parser that turns config override errors into one clear line.

    ml_collections raises an AttributeError with a traceback for a misspelled
    key; researchers should see the key and the closest valid name instead.
    """
    try:
        return flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, TypeError, ValueError) as e:
        message = str(e).strip("'\"").replace("\\n", " ").replace("\\'", "'").replace("\n", " ")
        config = _config_from_argv(argv)
        for arg in argv[1:]:
            key = arg.split("=")[0][len("--config."):]
            if arg.startswith("--config.") and config is not None and _unknown(config, key):
                message = _unknown_key_message(config, key)
                break
        print(f"config error: {message}", file=sys.stderr)
        sys.exit(2)


def _config_from_argv(argv: Sequence[str]) -> ConfigDict | None:
    """Loads the ``--config=FILE`` named on the command line (for error messages)."""
    path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
    if path is None or not os.path.isfile(path.split(":")[0]):
        return None
    spec = importlib.util.spec_from_file_location("_maxlm_config", path.split(":")[0])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _unknown(config: ConfigDict | None, key: str) -> bool:
    if config is None:
        return False
    try:
        _get(config, key)
        return False
    except (KeyError, AttributeError):
        return True


def _unknown_key_message(config: ConfigDict, key: str) -> str:
    parts = key.split(".")
    node, prefix = config, []
    for part in parts:
        if not isinstance(node, ConfigDict) or part not in node:
            options = list(node.keys()) if isinstance(node, ConfigDict) else []
            close = difflib.get_close_matches(part, options, n=1)
            hint = f" (did you mean {'.'.join(prefix + close)!r}?)" if close else ""
            return f"unknown config key {key!r}{hint}"
        node, prefix = node[part], prefix + [part]
    return f"bad value for config key {key!r}"
