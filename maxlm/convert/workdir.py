"""HF model directory <-> maxlm workdir (an Orbax checkpoint that ``init_from`` reads, and ``config.json``).

``hf_to_workdir`` writes ``WORKDIR/checkpoints/0/`` (state = ``{"params": ...}``), ``WORKDIR/config.json``
(``base_config()`` with the imported model section) and ``WORKDIR/hf/`` (the HF config.json and tokenizer
files, so an export keeps the token ids and tokenizer). ``workdir_to_hf`` exports the latest checkpoint of
such a workdir, or of a training run started from it (found through its ``init_from``, a workdir or one of
its checkpoints) or from an HF directory (its ``init_from_hf``).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import jax

from maxlm import sharding
from maxlm.checkpoint import Checkpointer, load_params
from maxlm.config import base_config, to_json
from maxlm.convert import hf
from maxlm.models.transformer import ModelConfig

HF_DIR = "hf"  # WORKDIR/hf: the imported HF config.json and tokenizer files
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "generation_config.json")


def hf_to_workdir(hf_dir: str | os.PathLike, workdir: str | os.PathLike, *, param_dtype: str = "float32",
                  allow_unknown_fields: bool = False) -> dict[str, Any]:
    """Converts an HF model directory into a maxlm workdir; returns the resolved maxlm config dict."""
    hf_dir, workdir = Path(hf_dir), Path(workdir).absolute()
    if (workdir / "checkpoints").exists() and any((workdir / "checkpoints").iterdir()):
        raise FileExistsError(f"{workdir} already has checkpoints; convert into a new directory")
    overrides, params = hf.load_hf(hf_dir, param_dtype=param_dtype, allow_unknown_fields=allow_unknown_fields)
    (workdir / HF_DIR).mkdir(parents=True, exist_ok=True)
    for name in ("config.json", *TOKENIZER_FILES):
        if (hf_dir / name).is_file():
            shutil.copyfile(hf_dir / name, workdir / HF_DIR / name)
    config = base_config()
    config.model.update(dict(overrides, param_dtype=param_dtype))
    tokenizer = next((workdir / HF_DIR / n for n in ("tokenizer.model", "tokenizer.json")
                      if (workdir / HF_DIR / n).is_file()), None)
    if tokenizer is not None:
        config.data.tokenizer = str(tokenizer)
    config_json = to_json(config)
    with open(workdir / "config.json", "w") as f:
        f.write(config_json)
    ckpt = Checkpointer(workdir, async_save=False)
    try:
        ckpt.save(0, {"params": params}, config_json=config_json, force=True)
        ckpt.wait()
    finally:
        ckpt.close()
    return json.loads(config_json)


def read_model_config(workdir: str | os.PathLike) -> tuple[dict[str, Any], ModelConfig]:
    """The workdir's ``config.json`` and its resolved ``ModelConfig``."""
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: not a maxlm workdir")
    with open(path) as f:
        config = json.load(f)
    return config, ModelConfig.from_config(config["model"])


def workdir_to_hf(workdir: str | os.PathLike, hf_dir: str | os.PathLike, *, hf_base: str | os.PathLike | None = None,
                  max_shard_bytes: int = 5 * 2**30, dtype: str | None = None) -> list[str]:
    """Exports a workdir's latest params as an HF model directory; returns the weight file names.

    ``hf_base`` is an HF directory whose config.json fields (token ids ...) and tokenizer files are kept;
    by default ``WORKDIR/hf``, else the run's ``init_from_hf``, else that of the workdir its ``init_from`` names.
    """
    workdir = Path(workdir).absolute()
    config, cfg = read_model_config(workdir)
    if config.get("lora", {}).get("rank"):
        raise ValueError(f"{workdir} is a LoRA run (lora.rank={config['lora']['rank']}): its checkpoints hold only "
                         "the adapters; merge them into the base (maxlm.models.lora.merge) before exporting")
    base = Path(hf_base) if hf_base else _find_hf_base(workdir, config)
    mesh = sharding.make_mesh(1, -1, 1)
    abstract = hf.param_shardings(cfg, mesh)
    with jax.set_mesh(mesh):
        params = load_params(workdir, abstract)
    base_config = hf.read_hf_config(base) if base else None
    names = hf.save_hf(params, cfg, hf_dir, base_config=base_config, max_shard_bytes=max_shard_bytes, dtype=dtype)
    for name in TOKENIZER_FILES if base else ():
        if (base / name).is_file():
            shutil.copyfile(base / name, Path(hf_dir) / name)
    return names


def _find_hf_base(workdir: Path, config: dict[str, Any]) -> Path | None:
    """``WORKDIR/hf``, else the HF directory the run started from: its ``init_from_hf``, or (following the
    chain) that of the workdir its ``init_from`` names."""
    seen: set[Path] = set()
    while workdir not in seen:
        seen.add(workdir)
        hf_dirs = [workdir / HF_DIR, *([Path(config["init_from_hf"])] if config.get("init_from_hf") else [])]
        found = next((d for d in hf_dirs if (d / "config.json").is_file()), None)
        if found or not config.get("init_from"):
            return found
        workdir = _run_dir(Path(config["init_from"]).absolute())
        path = workdir / "config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
    return None


def _run_dir(path: Path) -> Path:
    """The workdir of an ``init_from``: the workdir itself, its ``checkpoints`` or a ``checkpoints/<step>``."""
    if path.name.isdigit() and path.parent.name == "checkpoints":
        path = path.parent
    return path.parent if path.name == "checkpoints" else path
