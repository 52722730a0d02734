"""The preference-tuning demo on the vendored HH-RLHF harmless split, CPU-sized (char tokenizer,
4 layers, d_model 128, rows of 128 characters). One file, four stages (``--config=configs/dpo_hh.py:STAGE``):

  sft       supervised fine-tuning on the chosen dialogues: the start and the reference for DPO
  dpo       full DPO from the SFT checkpoint; the reference is a frozen copy of it
  dpo_lora  LoRA DPO on the SFT checkpoint; the reference is the base with the adapters off, its
            log-probs precomputed once (cached in the workdir's cache/)
  reward    a Bradley-Terry reward model (value head) from the SFT checkpoint

    python launch/train.py --config=configs/dpo_hh.py:sft --workdir=runs/hh_sft
    python launch/train.py --config=configs/dpo_hh.py:dpo --workdir=runs/hh_dpo --config.init_from=runs/hh_sft

The last 10% of the records are held out in every stage, so the DPO and reward evals are on pairs
the SFT model never saw. Eval logs ``val_rewards/accuracies`` and ``val_rewards/margins``
(on the 2-core CPU: sft about 5 min, dpo 5 min, dpo_lora 6 min, reward 4 min).
"""

from maxlm.config import base_config

STAGES = ("sft", "dpo", "dpo_lora", "reward")


def get_config(stage: str = "dpo"):
    if stage not in STAGES:
        raise ValueError(f"configs/dpo_hh.py:{stage}: the stage is one of {', '.join(STAGES)}")
    c = base_config()
    c.model.update(d_model=128, num_layers=4, num_heads=4, d_ff=512, max_seq_len=128, attention="auto",
                   scan_layers=False, value_head=stage == "reward")
    c.data.update(source="builtin:hh_rlhf_harmless_test", tokenizer="char", val_fraction=0.1, truncate=True,
                  chat_template="hh", preference_format="hh",
                  max_prompt_len=32)  # long pairs keep the prompt's last 32 characters, the rest is completion
    c.train.update(objective=stage.removesuffix("_lora"), steps=250, batch_size=8, seq_len=128, lr=3e-4,
                   schedule="cosine", warmup_steps=10, min_lr_ratio=0.1, weight_decay=0.0, log_every=10,
                   eval_every=50, eval_batches=28)
    c.train.dpo.update(beta=0.1, loss="sigmoid")
    if stage == "sft":
        c.train.update(steps=400, batch_size=16, lr=2e-3, warmup_steps=50, weight_decay=0.1, eval_every=200,
                       eval_batches=14)
    if stage == "dpo_lora":  # two epochs of the train pairs; the reference log-probs are computed once
        c.lora.update(rank=8, alpha=16.0)
        c.train.update(lr=1e-3, steps=520, eval_every=65)
        c.train.dpo.precompute_reference = True
    if stage == "reward":
        c.train.lr = 3e-4
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.checkpoint.update(every_steps=200, keep_last=1)
    c.sample.num_tokens = 0
    return c
