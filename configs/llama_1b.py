"""A Llama-3.2-1B-shaped model: RMSNorm, RoPE (theta 500k), SwiGLU, GQA 32/8, tied embeddings."""

from maxlm.config import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=128_256, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, d_ff=8192,
                   max_seq_len=8192, norm="rmsnorm", norm_eps=1e-5, position="rope", rope_theta=500_000.0,
                   mlp="swiglu", tie_embeddings=True, compute_dtype="bfloat16", remat="dots")
    c.data.tokenizer = ""  # must be given: a sentencepiece .model matching vocab_size
    c.train.update(steps=100_000, batch_size=512, seq_len=4096, lr=3e-4, warmup_steps=2000, b2=0.95)
    return c
