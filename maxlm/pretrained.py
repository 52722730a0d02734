"""A trained model ready for generation and evaluation: model, params and tokenizer of a maxlm run.

``load_workdir(WORKDIR)`` reads what ``train`` wrote: ``WORKDIR/config.json`` (the model shape and
tokenizer), the tokenizer (a ``.model`` path, or the cached character model under the data cache
dir) and the params of the latest (or a given) checkpoint, on one device. A LoRA run's checkpoint
holds only adapters: they are folded into the base the run trained on (``init_from``, ``init_from_hf``,
else the seeded random base). ``lora_workdir`` folds the adapters of another LoRA run into the loaded params.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections

from maxlm import sharding
from maxlm.checkpoint import load_params
from maxlm.data.tokenizer import Tokenizer
from maxlm.models import Model, build_model
from maxlm.models import lora as lora_lib
from maxlm.models.transformer import ModelConfig
from maxlm.train.data import get_tokenizer


@dataclasses.dataclass(frozen=True)
class Pretrained:
    model: Model
    params: Any
    tokenizer: Tokenizer
    config: ml_collections.ConfigDict  # the run's resolved config
    checkpoint: str  # the checkpoint directory the params came from


def read_run_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{workdir!r} is not a maxlm workdir: no config.json")
    with open(path) as f:
        return ml_collections.ConfigDict(json.load(f))


def checkpoint_dir(workdir: str, step: int | None = None) -> str:
    """``WORKDIR/checkpoints/<step>``: the given step, or the latest complete one."""
    root = os.path.join(workdir, "checkpoints")
    steps = sorted(int(p) for p in os.listdir(root) if p.isdigit()) if os.path.isdir(root) else []
    if not steps:
        raise FileNotFoundError(f"no checkpoints in {root}")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"no checkpoint for step {step} in {root} (steps: {steps})")
    return os.path.join(root, str(steps[-1] if step is None else step))


def _merge_adapters(params, config, checkpoint: str):
    """``params`` with the adapters of a LoRA run's checkpoint folded in."""
    cfg = lora_lib.LoraConfig.from_config(config.lora)
    if cfg.quantize_base:  # the base the adapters were trained on: int8-rounded
        params = lora_lib.dequantize(lora_lib.quantize_int8(params, cfg))
    abstract = jax.eval_shape(lambda rng: lora_lib.init_lora(rng, params, cfg), jax.random.key(0))
    return lora_lib.merge(params, load_params(checkpoint, sharding.on_device(abstract)), cfg)


def _lora_base(model: Model, config: ml_collections.ConfigDict, abstract):
    """The frozen base of a LoRA run as train/loop.py made it: init_from, init_from_hf, else the seeded init."""
    if config.init_from:
        return load_params(config.init_from, abstract)
    if config.init_from_hf:
        from maxlm.convert import hf  # needs the optional safetensors
        one_device = sharding.make_mesh(1, 1, 1, jax.devices()[:1])
        return hf.load_hf(config.init_from_hf, mesh=one_device, model=model)[1]
    return jax.jit(model.init)(jax.random.split(jax.random.key(config.seed))[0])  # as step.init_frozen


def load_workdir(workdir: str, *, step: int | None = None, lora_workdir: str | None = None) -> Pretrained:
    """The model, params and tokenizer of a maxlm run (see the module docstring)."""
    config = read_run_config(workdir)
    tokenizer = get_tokenizer(config, workdir)
    rules = tuple(tuple(r) for r in config.mesh.rules)
    model = build_model(ModelConfig.from_config(config.model, tokenizer.vocab_size), rules)
    checkpoint = checkpoint_dir(workdir, step)
    abstract = sharding.on_device(model.abstract_params())
    if config.lora.rank:
        params = _merge_adapters(_lora_base(model, config, abstract), config, checkpoint)
    else:
        params = load_params(checkpoint, abstract)
    if lora_workdir:
        lora_config = read_run_config(lora_workdir)
        if not lora_config.lora.rank:
            raise ValueError(f"{lora_workdir!r} is not a LoRA run (lora.rank=0)")
        params = _merge_adapters(params, lora_config, checkpoint_dir(lora_workdir))
    return Pretrained(model, params, tokenizer, config, checkpoint)
