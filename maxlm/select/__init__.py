"""Data selection: LESS (``less.py``, the pipeline; ``features.py``, per-example LoRA gradient features)."""
