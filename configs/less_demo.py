"""LESS data selection on CPU over the synthetic task mixture of ``benchmarks/less_experiment.py``.

    python benchmarks/less_experiment.py --write_data=runs/less_data
    python launch/select_data.py --config=configs/less_demo.py:runs/less_data --config.workdir=runs/less_demo

The pool (``DATA/pool.jsonl``) mixes arithmetic, string reversal, uppercase copying and HH dialogues as
``{"messages": [...]}`` records; the validation set (``DATA/val.jsonl``) is a handful of reversals. The
warmup model is a small random-init transformer trained with LoRA on a random 5% of the pool.
"""

from maxlm.select.less import select_config


def get_config(data_dir: str = ""):
    c = select_config()
    if data_dir:
        c.pool = f"jsonl:{data_dir}/pool.jsonl"
        c.validation = {"reverse": f"jsonl:{data_dir}/val.jsonl"}
    c.update(percentage=0.05, dim=2048, seed=0, batch_size=32, shard_size=256)
    c.warmup.update(fraction=0.05, epochs=4)
    t = c.train
    t.model.update(d_model=64, num_layers=2, num_heads=4, d_ff=256, max_seq_len=128, attention="xla")
    t.data.update(sft_format="chat", chat_template="hh", tokenizer_text="builtin:tinyshakespeare", truncate=True,
                  val_fraction=0.1)
    t.train.update(batch_size=4, seq_len=128, lr=3e-3, log_every=1)
    t.mesh.update(data=-1, fsdp=1, tensor=1, cpu_devices=2)
    t.lora.update(rank=8, alpha=16.0)
    return c
