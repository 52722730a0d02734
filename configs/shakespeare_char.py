"""The embedded main job: a character-level GPT on Tiny Shakespeare (the classic small CPU baseline).

4 layers, 4 heads, d_model 128, context 64, batch 12, 2000 steps, lr 1e-3 cosine to 1e-4
after 100 warmup steps, AdamW b2=0.99, no dropout, 90/10 train/val split.
"""

from maxlm.config import base_config


def get_config():
    c = base_config()
    c.model.update(
        d_model=128, num_layers=4, num_heads=4, max_seq_len=64,
        norm="layernorm", position="learned", mlp="gelu", use_bias=True, tie_embeddings=True,
        attention="auto", scan_layers=False,  # unrolled is faster for 4 small layers on CPU
    )
    c.data.update(source="builtin:tinyshakespeare", tokenizer="char", val_fraction=0.1)
    c.train.update(
        steps=2000, batch_size=12, seq_len=64, lr=1e-3, schedule="cosine", warmup_steps=100,
        min_lr_ratio=0.1, b1=0.9, b2=0.99, weight_decay=0.1, clip_norm=1.0,
        log_every=50, eval_every=500, eval_batches=100,
        steps_per_call=10,  # ten steps per jitted call: the host's per-step work is ~8% of a step this small
    )
    # On a CPU, one JAX device per core with data parallelism (2 cores here): XLA:CPU runs each op on
    # one thread, so this is what keeps both cores busy. GPUs and TPUs ignore cpu_devices.
    c.mesh.update(data=-1, fsdp=1, tensor=1, cpu_devices=2)
    c.checkpoint.update(every_steps=500, keep_last=2)
    return c
