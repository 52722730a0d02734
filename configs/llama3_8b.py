"""Llama-3-8B shapes (not meant to be trained here): 32 layers, d 4096, GQA 32/8, SwiGLU 14336, RoPE 500k."""

from maxlm.config import base_config


def get_config():
    c = base_config()
    c.model.update(vocab_size=128_256, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, d_ff=14_336,
                   max_seq_len=8192, norm="rmsnorm", norm_eps=1e-5, position="rope", rope_theta=500_000.0,
                   mlp="swiglu", tie_embeddings=False, compute_dtype="bfloat16", remat="full")
    c.data.tokenizer = ""  # must be given: a sentencepiece .model matching vocab_size
    c.mesh.update(data=1, fsdp=-1, tensor=1)
    c.train.update(steps=100_000, batch_size=1024, seq_len=8192, lr=3e-4, warmup_steps=2000, b2=0.95)
    return c
