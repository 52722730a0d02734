"""OPT-125M: pre-LayerNorm, learned positions with offset 2, ReLU, biases, tied embeddings, OPT's recipe.

OPT's init: normal std 0.006 with output projections scaled by 1/sqrt(2L); AdamW b2 0.95, wd 0.1,
linear decay to 10% of the peak lr, clip 1.0.
"""

from maxlm.config import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=50_272, d_model=768, num_layers=12, num_heads=12, d_ff=3072, max_seq_len=2048, norm="layernorm",
                   position="learned", position_offset=2, mlp="relu", use_bias=True, tie_embeddings=True,
                   init_std=0.006, scale_residual_init=True, dropout=0.1, compute_dtype="bfloat16")
    c.data.tokenizer = ""  # must be given: a sentencepiece .model matching vocab_size
    c.train.update(steps=572_000, batch_size=256, seq_len=2048, lr=6e-4, schedule="linear", warmup_steps=2000,
                   min_lr_ratio=0.1, b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0)
    return c
