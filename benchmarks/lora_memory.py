"""Train-state bytes of full fine-tuning vs LoRA for a preset's model shape (abstract shapes: no memory used).

    python benchmarks/lora_memory.py [--config=gpt2_small] [--ranks=4,8,16]
"""

from __future__ import annotations

import argparse

import jax

from maxlm import sharding
from maxlm.models import build_model
from maxlm.models.lora import LoraConfig
from maxlm.models.transformer import ModelConfig
from maxlm.train.optimizer import make_optimizer
from maxlm.train.step import state_layout
from train_step import load_preset  # benchmarks/train_step.py


def nbytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", default="gpt2_small")
    parser.add_argument("--ranks", type=lambda s: [int(r) for r in s.split(",")], default=[4, 8, 16])
    parser.add_argument("--targets", default=r"attn/w[qkvo]|mlp/w_(gate|up|down)")
    args = parser.parse_args()
    config = load_preset(args.config)
    model = build_model(ModelConfig.from_config(config.model, vocab_size=50_257))
    tx = make_optimizer(config.train)
    mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    full = state_layout(model, tx, mesh)
    base = nbytes(full.abstract["params"])
    print(f"{args.config}: {model.cfg.num_params() / 1e6:.1f}M params, targets {args.targets!r}\n")
    print("| setup | base weights MiB | trained params MiB | optimizer state MiB | optimizer shrink |")
    print("| --- | ---: | ---: | ---: | ---: |")
    full_opt = nbytes(full.abstract["opt_state"])
    print(f"| full fine-tuning | {base / 2**20:.1f} | {base / 2**20:.1f} | {full_opt / 2**20:.1f} | 1x |")
    for rank in args.ranks:
        low = state_layout(model, tx, mesh, LoraConfig(rank, 2.0 * rank, args.targets))
        opt = nbytes(low.abstract["opt_state"])
        print(f"| LoRA rank {rank} | {base / 2**20:.1f} (frozen, one copy) | {nbytes(low.abstract['params']) / 2**20:.2f} | "
              f"{opt / 2**20:.2f} | {full_opt / opt:.0f}x |")


if __name__ == "__main__":
    main()
