"""Metrics: metrics.jsonl, TensorBoard events, a console progress bar, and MFU.

MFU counts model FLOPs per token as ``6N + 12·L·H·Q·T`` (PaLM appendix B):
N = non-embedding parameters plus the LM head, L layers, H heads, Q head dim,
T sequence length. Peaks are dense bf16 datasheet numbers per chip; on a
device not in the table (e.g. CPUs) ``mfu`` is ``null``.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time

import jax
from absl import logging as absl_logging
from tqdm import tqdm

from maxlm.models.transformer import ModelConfig


def _import_tensorboardx():
    """tensorboardX imports torch when it is installed (over a second at start-up) only to accept torch
    tensors; we log Python floats, so it is imported with torch hidden unless torch is already loaded."""
    if "torch" in sys.modules:
        import tensorboardX
        return tensorboardX
    sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX handles
    try:
        import tensorboardX
    finally:
        del sys.modules["torch"]
    return tensorboardX


SummaryWriter = _import_tensorboardx().SummaryWriter

# device_kind words -> peak dense bf16 FLOP/s per chip.
PEAK_FLOPS = {
    "H200": 989e12,
    "GH200": 989e12,
    "H100": 989e12,
    "A100": 312e12,
    "L4": 121e12,
    "TPU v6": 918e12,
    "TPU v5p": 459e12,
    "TPU v5": 197e12,  # v5e ("TPU v5 lite")
    "TPU v4": 275e12,
}


_TENSORBOARD_FILES = itertools.count()

_CHATTY_LIBRARIES = ("orbax", "grain", "etils", "jax/_src")


def quiet_library_logs() -> None:
    """Keeps the console to maxlm's own INFO lines: libraries' INFO records are dropped, warnings kept."""
    def keep(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or not any(n in record.pathname for n in _CHATTY_LIBRARIES)
    absl_logging.get_absl_handler().addFilter(keep)


def peak_flops(device: jax.Device) -> float | None:
    """The table's peak for the device's kind, matched on whole words ("L4" is not "L40S")."""
    words = getattr(device, "device_kind", "").replace("-", " ").split()
    return next((v for k, v in PEAK_FLOPS.items() if _contains_words(words, k.split())), None)


def _contains_words(words: list[str], key: list[str]) -> bool:
    return any(words[i:i + len(key)] == key for i in range(len(words) - len(key) + 1))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    n = cfg.num_params(include_embeddings=False) + cfg.vocab_size * cfg.d_model
    return 6 * n + 12 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq_len


def _step_of(line: str) -> int | None:
    """The step of one metrics line; None for a torn line (a crash mid-write)."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return None


def _drop_lines_after(path: str, step: int) -> None:
    """On resume, forget metrics of steps after the checkpoint: they are about to be redone."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if (line_step := _step_of(line)) is not None and line_step <= step]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


class MetricsWriter:
    """Writes one JSON line per log/eval step, TensorBoard scalars, and a tqdm progress line."""

    def __init__(self, workdir: str, total_steps: int, start_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        path = os.path.join(workdir, "metrics.jsonl")
        if enabled:
            _drop_lines_after(path, start_step)
        self._jsonl = open(path, "a") if enabled else None
        self._tb_dir = os.path.join(workdir, "tensorboard")
        self._tb = self._tensorboard(start_step) if enabled else None
        self._bar = tqdm(total=total_steps, initial=start_step, disable=not enabled, dynamic_ncols=True,
                         file=sys.stderr, mininterval=1.0, desc="train")

    def _tensorboard(self, step: int) -> SummaryWriter:
        """A TensorBoard writer whose first event tells TensorBoard to drop the events after ``step`` (a resume
        or a rollback redoes them)."""
        # a unique file name: tensorboardX truncates a same-named file made in the same second
        return SummaryWriter(self._tb_dir, purge_step=step + 1 if step else None,
                             filename_suffix=f".{os.getpid()}.{next(_TENSORBOARD_FILES)}")

    def write(self, step: int, metrics: dict[str, float | None]) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": time.time(), **metrics}
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self._tb.add_scalar(key, value, step)
        shown = {k: f"{v:.4g}" for k, v in metrics.items()
                 if k in ("loss", "val_loss", "lr", "grad_norm", "tokens_per_sec") and v is not None}
        self._bar.set_postfix(shown, refresh=False)
        self._bar.n = step
        self._bar.refresh()

    def rewind(self, step: int) -> None:
        """After a divergence rollback: forget the metrics of the steps that are about to be redone."""
        if self.enabled:
            self._jsonl.close()
            _drop_lines_after(self._jsonl.name, step)
            self._jsonl = open(self._jsonl.name, "a")
            self._tb.close()
            self._tb = self._tensorboard(step)

    def message(self, text: str) -> None:
        if self.enabled:
            self._bar.write(text, file=sys.stderr)

    def close(self) -> None:
        if self.enabled:
            self._bar.close()
            self._jsonl.close()
            self._tb.close()
