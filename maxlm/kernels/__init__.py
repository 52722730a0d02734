"""Pallas kernels."""

from maxlm.kernels.flash_attention import (
    KernelParams,
    Tuning,
    default_tuning,
    flash_attention,
    flash_attention_supported,
)
from maxlm.kernels.reference import reference_attention

__all__ = [
    "KernelParams",
    "Tuning",
    "default_tuning",
    "flash_attention",
    "flash_attention_supported",
    "reference_attention",
]
