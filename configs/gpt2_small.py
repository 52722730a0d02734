"""GPT-2 small (124M): pre-LayerNorm, learned positions, GELU(tanh), biases, tied embeddings.

Give a sentencepiece model with --config.data.tokenizer=PATH (its vocab must equal model.vocab_size).
"""

from maxlm.config import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=50_257, d_model=768, num_layers=12, num_heads=12, max_seq_len=1024, norm="layernorm",
                   position="learned", mlp="gelu", use_bias=True, tie_embeddings=True, init_std=0.02)
    c.data.tokenizer = ""  # must be given
    c.train.update(steps=600_000, batch_size=480, seq_len=1024, lr=6e-4, warmup_steps=2000, min_lr_ratio=0.1,
                   b1=0.9, b2=0.95, weight_decay=0.1, clip_norm=1.0, log_every=10, eval_every=1000)
    c.model.compute_dtype = "bfloat16"
    return c
