"""Plain PyTorch CPU reference for the ``shakespeare_char`` baseline.

Same model and recipe as maxlm's shakespeare_char config, so that wall time and
tokens/s can be compared like for like:

* GPT-2 style char-level decoder: 4 layers, 4 heads, d_model 128, context 64,
  pre-LayerNorm with bias, learned positions, GELU(tanh) 4x MLP, tied embeddings,
  no dropout, N(0, 0.02) init with residual projections scaled by 1/sqrt(2 L).
* AdamW(1e-3, betas (0.9, 0.99), eps 1e-8, wd 0.1 on 2D weights only), 100 warmup
  steps then cosine decay to 1e-4, grad clip 1.0, batch 12, 2000 steps.
* 90/10 train/val split of the char stream, uniformly sampled random windows.
* Like maxlm's job: every ``eval_every`` steps and at the end, the loss on the same 100 held-out val batches
  (drawn once); every ``checkpoint_every`` steps and at the end, a checkpoint (model + optimizer); at the end, a
  200-character sample (temperature 0.8, a sliding 64-character window). ``shakespeare_vs_torch.py`` passes the
  schedule of ``configs/shakespeare_char.py``, so both sides do the same work.

Usage::

    python benchmarks/torch_shakespeare.py --steps 2000 [--eval_every 500 --checkpoint_every 500]
"""

from __future__ import annotations

import argparse
import importlib.resources
import json
import math
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

N_LAYERS, N_HEADS, D_MODEL = 4, 4, 128
PEAK_LR, MIN_LR, WARMUP_STEPS = 1e-3, 1e-4, 100
BETAS, EPS, WEIGHT_DECAY, GRAD_CLIP = (0.9, 0.99), 1e-8, 0.1, 1.0


def load_corpus() -> str:
    """Return the Tiny Shakespeare text (repo-relative path, else package resource)."""
    path = Path(__file__).resolve().parents[1] / "maxlm/data/assets/tinyshakespeare.txt"
    if path.exists():
        return path.read_text(encoding="utf-8")
    res = importlib.resources.files("maxlm.data") / "assets/tinyshakespeare.txt"
    return res.read_text(encoding="utf-8")


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x))."""

    def __init__(self, d: int, n_heads: int) -> None:
        super().__init__()
        self.n_heads = n_heads
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.attn_out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc, self.mlp_out = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).split(d, dim=-1)
        q, k, v = (z.view(b, t, self.n_heads, d // self.n_heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_out(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp_out(F.gelu(self.fc(self.ln2(x)), approximate="tanh"))


class GPT(nn.Module):
    """Character-level GPT-2 style decoder with tied input/output embeddings."""

    def __init__(self, vocab: int, seq_len: int, d: int = D_MODEL,
                 n_layers: int = N_LAYERS, n_heads: int = N_HEADS) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, d)
        self.pos = nn.Embedding(seq_len, d)
        self.blocks = nn.ModuleList(Block(d, n_heads) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d)
        for name, m in self.named_modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                resid = name.endswith(("attn_out", "mlp_out"))
                nn.init.normal_(m.weight, std=0.02 / math.sqrt(2 * n_layers) if resid else 0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)

    def logits(self, idx: torch.Tensor) -> torch.Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
        for block in self.blocks:
            x = block(x)
        return self.ln_f(x) @ self.tok.weight.T

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Return the mean next-token cross-entropy."""
        logits = self.logits(idx)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def sample(model: GPT, prompt: list[int], num_tokens: int, seq_len: int, temperature: float,
           gen: torch.Generator) -> list[int]:
    """``num_tokens`` tokens after ``prompt``, the context a window of the last ``seq_len`` tokens (as maxlm's job)."""
    ids = list(prompt)
    for _ in range(num_tokens):
        logits = model.logits(torch.tensor([ids[-seq_len:]]))[0, -1] / temperature
        ids.append(int(torch.multinomial(F.softmax(logits, -1), 1, generator=gen)))
    return ids[len(prompt):]


def lr_at(step: int, total: int) -> float:
    """Linear warmup to PEAK_LR, then cosine decay to MIN_LR at ``total``."""
    if step < WARMUP_STEPS:
        return PEAK_LR * (step + 1) / WARMUP_STEPS
    frac = min(1.0, (step - WARMUP_STEPS) / max(1, total - WARMUP_STEPS))
    return MIN_LR + 0.5 * (PEAK_LR - MIN_LR) * (1 + math.cos(math.pi * frac))


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int,
              gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``batch_size`` uniformly random windows (inputs, shifted targets)."""
    starts = torch.randint(len(data) - seq_len, (batch_size,), generator=gen)
    idx = starts[:, None] + torch.arange(seq_len + 1)
    win = data[idx]
    return win[:, :-1], win[:, 1:]


def build(vocab: int, seq_len: int) -> tuple[GPT, torch.optim.AdamW]:
    """The model and its AdamW (weight decay on 2-D weights only)."""
    model = GPT(vocab, seq_len)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() != 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=PEAK_LR, betas=BETAS, eps=EPS)
    return model, opt


def train_step(model: GPT, opt: torch.optim.AdamW, x: torch.Tensor, y: torch.Tensor, lr: float) -> float:
    """One AdamW step at learning rate ``lr`` with gradient clipping; returns the loss."""
    for group in opt.param_groups:
        group["lr"] = lr
    loss = model(x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    opt.step()
    return loss.item()


@torch.no_grad()
def evaluate(model: GPT, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """The mean loss over ``batches``."""
    model.eval()
    loss = sum(model(x, y).item() for x, y in batches) / max(1, len(batches))
    model.train()
    return loss


def run(steps: int = 2000, batch_size: int = 12, seq_len: int = 64, eval_batches: int = 100,
        eval_every: int = 0, checkpoint_every: int = 0, seed: int = 0, threads: int | None = None) -> dict:
    """Train the baseline on CPU and return timing and loss metrics.

    ``eval_every``/``checkpoint_every`` (0: only at the end): the periodic eval and checkpoint of maxlm's job.
    """
    t0 = time.perf_counter()
    torch.set_num_threads(threads or os.cpu_count() or 1)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)

    text = load_corpus()
    chars = sorted(set(text))
    lut = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([lut[c] for c in text], dtype=torch.long)
    split = int(0.9 * len(data))
    train_data, val_data = data[:split], data[split:]

    model, opt = build(len(chars), seq_len)
    val_gen = torch.Generator().manual_seed(seed + 1)  # its own stream: the train batches don't depend on evals
    val_batches = [get_batch(val_data, batch_size, seq_len, val_gen) for _ in range(eval_batches)]

    step_times: list[float] = []
    val_losses: dict[int, float] = {}
    loss_val = float("nan")
    t_train = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        for step in range(steps):
            ts = time.perf_counter()
            loss_val = train_step(model, opt, *get_batch(train_data, batch_size, seq_len, gen), lr_at(step, steps))
            step_times.append(time.perf_counter() - ts)
            done = step + 1
            if eval_batches and ((eval_every and done % eval_every == 0) or done == steps):
                val_losses[done] = evaluate(model, val_batches)
            if (checkpoint_every and done % checkpoint_every == 0) or done == steps:
                torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(), "step": done},
                           os.path.join(workdir, "checkpoint.pt"))
    train_s = time.perf_counter() - t_train  # the steps, evals and checkpoints
    model.eval()
    text = "".join(chars[i] for i in sample(model, [lut["\n"]], 200, seq_len, 0.8, gen))
    print(f"--- sample ---\n{text}\n--------------", flush=True)

    step_time = statistics.median(step_times) if step_times else float("nan")
    return {
        "wall_s": time.perf_counter() - t0,
        "train_s": train_s,
        "step_time_s": step_time,
        "tokens_per_sec": batch_size * seq_len / step_time,  # as maxlm's side: from the median step
        "val_loss": val_losses.get(steps, float("nan")),
        "val_losses": val_losses,
        "final_train_loss": loss_val,
        "torch_version": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch_size", type=int, default=12)
    parser.add_argument("--eval_batches", type=int, default=100)
    parser.add_argument("--eval_every", type=int, default=0, help="steps between evals (0: only at the end)")
    parser.add_argument("--checkpoint_every", type=int, default=0, help="steps between checkpoints (0: only at the end)")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    res = run(steps=args.steps, batch_size=args.batch_size, eval_batches=args.eval_batches,
              eval_every=args.eval_every, checkpoint_every=args.checkpoint_every, threads=args.threads)
    print(json.dumps(res))
    for k, v in res.items():
        print(f"{k:>16}  {v:.4g}" if isinstance(v, float) else f"{k:>16}  {v}")


if __name__ == "__main__":
    main()
