"""LESS (Xia et al. 2024, "Selecting Influential Data for Targeted Instruction Tuning"): the pipeline.

1. Warmup: LoRA SFT with maxlm's trainer on a random ``warmup.fraction`` of the pool for
   ``warmup.epochs`` epochs, a checkpoint (adapters + Adam moments) after each epoch.
2. Features: for each checkpoint, every pool example's Adam-preconditioned LoRA gradient and every
   validation example's plain LoRA gradient, projected and normalised (``maxlm/select/features.py``).
3. Scores: per checkpoint the cosine similarities pool x validation, weighted by the checkpoint's
   average learning rate over its epoch (weights normalised to sum to 1, as the reference does),
   summed; averaged over each subtask's validation examples; the max over subtasks. The top
   ``percentage`` of the pool is written as SFT-ready JSONL with a ``less_score`` field.

Every stage resumes: the warmup run is the trainer's own (it resumes from its checkpoints and is
skipped once the last one exists), and features are stored in shards that are never recomputed.

Layout of ``workdir``: ``warmup/`` (the warmup run: ``data.jsonl``, ``checkpoints/``, ...),
``features/<step>/{pool,val_<subtask>}/shard_*.npy``, ``scores.npy`` (pool order), ``selected.jsonl``.
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np
import optax
from tqdm import tqdm

from maxlm import config as config_lib
from maxlm import sharding
from maxlm.checkpoint import load_params, read_state
from maxlm.data import pipeline
from maxlm.models import build_model
from maxlm.models.lora import LoraConfig
from maxlm.models.transformer import ModelConfig
from maxlm.pretrained import read_run_config
from maxlm.select import features as feats
from maxlm.train import data as train_data
from maxlm.train.loop import train
from maxlm.train.optimizer import lr_schedule, make_optimizer
from maxlm.train.step import init_frozen, state_layout

ConfigDict = ml_collections.ConfigDict
ConfigError = config_lib.ConfigError


def select_config() -> ConfigDict:
    """Every key of a LESS selection run, with its default. ``train`` is a maxlm training config: the warmup
    model, tokenizer, LoRA, optimizer, SFT format and mesh (its data.source and steps are set here)."""
    c = ConfigDict()
    c.workdir = ""
    c.pool = ""  # the candidate SFT records: jsonl:PATH or builtin:hh_rlhf_harmless_test (train.data.sft_format)
    c.validation = ConfigDict()  # subtask name -> source spec of its few validation records
    c.percentage = 0.05  # the fraction of the pool selected
    c.dim = 8192  # projection dimension
    c.seed = 0  # the warmup sample and the projection
    c.warmup = ConfigDict(dict(fraction=0.05, epochs=4))
    c.batch_size = 16  # examples per per-example-gradient call (a multiple of the mesh's data*fsdp)
    c.shard_size = 1024  # examples per stored feature shard
    t = config_lib.base_config()
    t.train.update(objective="sft", lr=2e-5, warmup_steps=0, schedule="linear", min_lr_ratio=0.0, eval_every=0)
    t.lora.update(rank=8, alpha=16.0)
    t.sample.num_tokens = 0
    c.train = t
    return c


def validate_select_config(config: ConfigDict) -> None:
    """The selection keys (the warmup's maxlm keys are checked by ``maxlm.config.validate``). Raises ConfigError."""
    if not config.workdir:
        raise ConfigError("workdir is empty: give the directory for the warmup run, features and selection")
    if not config.pool:
        raise ConfigError("pool is empty: give the candidate records (jsonl:PATH or builtin:NAME)")
    if not config.validation or not all(config.validation.values()):
        raise ConfigError("validation needs at least one subtask: {name: source spec} of its validation records")
    for key, value in (("percentage", config.percentage), ("warmup.fraction", config.warmup.fraction)):
        if not 0.0 < value <= 1.0:
            raise ConfigError(f"{key}={value} must be in (0, 1]")
    for key, value in (("dim", config.dim), ("warmup.epochs", config.warmup.epochs),
                       ("batch_size", config.batch_size), ("shard_size", config.shard_size)):
        if value < 1:
            raise ConfigError(f"{key}={value} must be positive")
    if config.train.lora.rank < 1:
        raise ConfigError(f"train.lora.rank={config.train.lora.rank}: LESS takes gradients of LoRA adapters; "
                          "set it > 0")
    if config.train.init_from_hf:
        raise ConfigError("train.init_from_hf is not supported here: convert the model once with "
                          "launch/convert.py and give train.init_from")


def _write_jsonl(path: str, records: list[dict]) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(record) + "\n" for record in records)
    os.replace(tmp, path)


def warmup_indices(pool_size: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted pool indices of the warmup sample: ``ceil(fraction * pool_size)`` drawn without replacement."""
    count = min(pool_size, max(1, math.ceil(fraction * pool_size)))
    return np.sort(np.random.default_rng(seed).choice(pool_size, count, replace=False))


def packed_batches(examples: list[dict[str, np.ndarray]], t: ConfigDict, d: ConfigDict, seed: int) -> int:
    """Batches of one pass over ``examples`` as the trainer packs them (``train.seq_len`` x ``train.batch_size``)."""
    batches = pipeline.packed_dataset(examples, seq_len=t.seq_len, batch_size=t.batch_size, seed=seed, num_epochs=1,
                                      truncate=d.truncate, on_bad_record=d.on_bad_record)
    return sum(1 for _ in batches)


def warmup_train_config(config: ConfigDict, data_path: str, epoch_steps: int) -> ConfigDict:
    """``config.train`` as the warmup run: SFT on all of ``data_path`` (no held-out part, no evaluation), a
    checkpoint (kept) after every epoch."""
    warm = copy.deepcopy(config.train)
    epochs = config.warmup.epochs
    warm.data.update(source=f"jsonl:{data_path}", val_fraction=0.0)
    warm.train.eval_batches = 0
    warm.train.objective = "sft"
    warm.train.steps = epochs * epoch_steps
    warm.train.warmup_steps = min(warm.train.warmup_steps, warm.train.steps - 1)
    warm.checkpoint.update(every_steps=epoch_steps, every_minutes=0.0, keep_last=epochs, keep_every=0)
    warm.sample.num_tokens = 0
    return warm


def checkpoint_weights(t: ConfigDict, checkpoint_steps: list[int]) -> np.ndarray:
    """The average learning rate of the updates of each checkpoint's epoch (``lr_schedule`` of update i is the
    lr the i-th update used), normalised to sum to 1."""
    schedule, starts = lr_schedule(t), [0, *checkpoint_steps[:-1]]
    lrs = np.array([float(np.mean(schedule(np.arange(a, b)))) for a, b in zip(starts, checkpoint_steps)])
    if lrs.sum() <= 0:
        raise ConfigError("the warmup's learning rate is 0 over every epoch (train.train.lr, warmup_steps, "
                          "schedule): nothing to weight the checkpoints by")
    return lrs / lrs.sum()


def less_scores(pool: list[np.ndarray], validation: list[np.ndarray], weights: np.ndarray,
                subtasks: np.ndarray) -> np.ndarray:
    """``[N]`` scores from per-checkpoint unit features ``pool[k]: [N, d]`` and ``validation[k]: [M, d]``:
    ``max over subtasks of mean over its validation examples of sum_k weights[k] * cos(pool, val)``.
    ``subtasks[j]`` labels validation example j."""
    similarity = sum(w * p @ v.T for w, p, v in zip(weights, pool, validation))
    return np.max(np.stack([similarity[:, subtasks == s].mean(1) for s in np.unique(subtasks)]), 0)


def top_indices(scores: np.ndarray, percentage: float) -> np.ndarray:
    """The ``max(1, round(percentage * N))`` best-scoring indices, best first (ties: lower index first)."""
    count = max(1, round(percentage * len(scores)))
    return np.argsort(-scores, kind="stable")[:count]


def adam_moments(opt_state: Any) -> tuple[Any, Any] | None:
    """``(mu, nu)`` of the Adam state inside a saved optimizer state (as ``read_state`` returns it), or None."""
    mu, nu = optax.tree.get(opt_state, "mu"), optax.tree.get(opt_state, "nu")
    return None if mu is None or nu is None else (mu, nu)


def run_selection(config: ConfigDict) -> str:
    """Runs (or resumes) the whole pipeline; returns the path of the selected JSONL."""
    validate_select_config(config)
    try:
        sharding.use_cpu_devices(config.train.mesh.cpu_devices)
    except ValueError as e:
        raise ConfigError(f"train.{e}") from None
    workdir = os.path.abspath(config.workdir)
    warm_dir = os.path.join(workdir, "warmup")
    os.makedirs(warm_dir, exist_ok=True)
    d = config.train.data
    template = train_data.chat_template(d)
    pool = train_data.read_sft_records(config.pool, d)
    validation = {name: train_data.read_sft_records(spec, d) for name, spec in sorted(config.validation.items())}

    # 1. warmup
    data_path = os.path.join(warm_dir, "data.jsonl")
    sample = [pool[i] for i in warmup_indices(len(pool), config.warmup.fraction, config.seed)]
    _write_jsonl(data_path, sample)
    tokenizer = train_data.get_tokenizer(warmup_train_config(config, data_path, 1), warm_dir)
    t, seed = config.train.train, config.train.seed
    sample_examples = train_data.sft_examples(sample, tokenizer, template, d)
    epoch_steps = max(1, packed_batches(sample_examples, t, d, seed))
    epoch_steps = -(-epoch_steps // t.steps_per_call) * t.steps_per_call
    warm = warmup_train_config(config, data_path, epoch_steps)
    try:
        config_lib.validate(warm, jax.device_count())
    except ConfigError as e:
        raise ConfigError(f"train.{e}") from None
    checkpoint_steps = [epoch_steps * (e + 1) for e in range(config.warmup.epochs)]
    if not os.path.isdir(os.path.join(warm_dir, "checkpoints", str(checkpoint_steps[-1]))):
        train(warm, warm_dir)
    weights = checkpoint_weights(warm.train, checkpoint_steps)

    # 2. features
    run = read_run_config(warm_dir)
    rules = tuple(tuple(r) for r in run.mesh.rules)
    model = build_model(ModelConfig.from_config(run.model, tokenizer.vocab_size), rules)
    lora = LoraConfig.from_config(run.lora)
    mesh = sharding.make_mesh(run.mesh.data, run.mesh.fsdp, run.mesh.tensor)
    if config.batch_size % (mesh.shape["data"] * mesh.shape["fsdp"]):
        raise ConfigError(f"batch_size={config.batch_size} is not divisible by the mesh's "
                          f"data*fsdp={mesh.shape['data'] * mesh.shape['fsdp']}")
    layout = state_layout(model, make_optimizer(run.train), mesh, lora)
    base_shardings = jax.tree.map(lambda a: a.sharding, layout.frozen_abstract)
    with jax.set_mesh(mesh):
        base = load_params(run.init_from, layout.frozen_abstract) if run.init_from else init_frozen(model, layout,
                                                                                                     run.seed)
        base = layout.reference_params(layout.store_frozen(base))  # the int8-rounded base under quantize_base
    projection = feats.Projection(config.dim, config.seed)
    common = dict(mesh=mesh, rules=rules, param_shardings=layout.param_shardings, base_shardings=base_shardings)
    adam = feats.AdamMoments(run.train.b1, run.train.b2, run.train.eps)
    pool_fn = feats.make_feature_fn(model, lora, projection, adam, **common)
    val_fn = feats.make_feature_fn(model, lora, projection, None, **common)
    pool_rows = feats.pad_examples(train_data.sft_examples(pool, tokenizer, template, d), run.train.seq_len)
    val_rows = {name: feats.pad_examples(train_data.sft_examples(records, tokenizer, template, d), run.train.seq_len)
                for name, records in validation.items()}
    extract = dict(batch_size=config.batch_size, shard_size=config.shard_size)
    pool_features, val_features = [], []
    for step in tqdm(checkpoint_steps, desc="checkpoints", unit="ckpt"):
        state = read_state(warm_dir, step)
        moments = adam_moments(state["opt_state"])
        if moments is None:
            raise ValueError(f"the warmup checkpoint of step {step} has no Adam moments (mu, nu) in its opt_state")
        out = os.path.join(workdir, "features", str(step))
        with jax.set_mesh(mesh):
            pool_features.append(feats.extract_features(
                pool_fn, (state["params"], base, moments), pool_rows, os.path.join(out, "pool"),
                key=feats.fingerprint(pool_rows, projection, f"pool/{step}"), desc=f"pool @{step}", **extract))
            val_features.append(np.concatenate([feats.extract_features(
                val_fn, (state["params"], base, None), rows, os.path.join(out, f"val_{name}"),
                key=feats.fingerprint(rows, projection, f"val/{step}"), desc=f"{name} @{step}", **extract)
                for name, rows in val_rows.items()]))

    # 3. scores and selection
    subtasks = np.concatenate([np.full(len(rows["tokens"]), name) for name, rows in val_rows.items()])
    scores = less_scores(pool_features, val_features, weights, subtasks)
    np.save(os.path.join(workdir, "scores.npy"), scores)
    selected = os.path.join(workdir, "selected.jsonl")
    _write_jsonl(selected, [dict(pool[i], less_score=float(scores[i])) for i in top_indices(scores, config.percentage)])
    return selected
