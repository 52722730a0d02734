"""Checkpoint conversion to and from other frameworks (Hugging Face: ``maxlm.convert.hf``)."""
