"""A tiny Llama-style model for tests and smoke runs (seconds on a laptop CPU)."""

from maxlm.config import base_config


def get_config():
    c = base_config()
    c.model.update(d_model=64, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=128, max_seq_len=64,
                   norm="rmsnorm", position="rope", mlp="swiglu")
    c.train.update(steps=20, batch_size=8, seq_len=32, lr=3e-3, warmup_steps=2, log_every=5, eval_every=10,
                   eval_batches=4)
    c.checkpoint.update(every_steps=10)
    c.sample.num_tokens = 32
    return c
