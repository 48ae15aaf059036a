"""Pallas kernels, each beside a plain-jnp reference and a dispatch by backend."""
from .flash_attention import BlockSizes, flash_attention, flash_attention_sharded

__all__ = ["BlockSizes", "flash_attention", "flash_attention_sharded"]
