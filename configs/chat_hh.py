"""The SFT demo chain on CPU: pretrain a character-level model on Tiny Shakespeare, then fine-tune it on the
vendored HH-RLHF dialogues (loss on the assistant turns only), fully or with LoRA.
One file, three stages (``--config=configs/chat_hh.py:STAGE``):

    python launch/train.py --config=configs/chat_hh.py:pretrain --workdir=runs/chat_pretrain
    python launch/train.py --config=configs/chat_hh.py:sft --workdir=runs/chat_sft --config.init_from=runs/chat_pretrain
    python launch/train.py --config=configs/chat_hh.py:sft_lora --workdir=runs/chat_lora \\
        --config.init_from=runs/chat_pretrain

Every stage trains its char tokenizer on Tiny Shakespeare (``data.tokenizer_text``), so all three share one
vocabulary; characters Shakespeare never uses fall back to byte pieces. The last 10% of the dialogues are
held out: ``val_loss`` is the SFT loss (assistant tokens) on dialogues the model never trained on. Each
stage ends with a sample that continues a Human turn.
"""

from maxlm.config import base_config

STAGES = ("pretrain", "sft", "sft_lora")


def get_config(stage: str = "sft"):
    if stage not in STAGES:
        raise ValueError(f"configs/chat_hh.py:{stage}: the stage is one of {', '.join(STAGES)}")
    c = base_config()
    c.model.update(d_model=128, num_layers=4, num_heads=4, d_ff=512, max_seq_len=128, norm="layernorm",
                   position="learned", mlp="gelu", use_bias=True, tie_embeddings=True, attention="auto",
                   scan_layers=False)
    c.data.update(tokenizer="char", tokenizer_text="builtin:tinyshakespeare", val_fraction=0.1)
    c.mesh.update(data=-1, fsdp=1, tensor=1, cpu_devices=2)
    c.checkpoint.update(every_steps=500, keep_last=1)
    c.sample.update(prompt="\n\nHuman: How can I learn to cook?\n\nAssistant:", num_tokens=200)
    if stage == "pretrain":
        c.data.source = "builtin:tinyshakespeare"
        c.sample.prompt = "\n"
        c.train.update(steps=1500, batch_size=12, seq_len=128, lr=1e-3, schedule="cosine", warmup_steps=100,
                       min_lr_ratio=0.1, b2=0.99, weight_decay=0.1, log_every=50, eval_every=500,
                       eval_batches=50, steps_per_call=10)
        return c
    c.data.update(source="builtin:hh_rlhf_harmless_test", sft_format="hh", chat_template="hh", truncate=True)
    c.train.update(objective="sft", steps=400, batch_size=16, seq_len=128, lr=1e-3, schedule="cosine",
                   warmup_steps=20, min_lr_ratio=0.1, b2=0.99, weight_decay=0.1, log_every=20, eval_every=50,
                   eval_batches=14, steps_per_call=10)
    if stage == "sft_lora":
        c.lora.update(rank=8, alpha=16.0, dropout=0.05)
        c.train.lr = 3e-3
    return c
