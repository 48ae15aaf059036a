"""Flash attention in Pallas: TPU (Mosaic) and GPU (Triton) kernels, forward and backward,
beside a plain-jnp reference with the same signature."""
from .api import (AttentionShapeError, flash_attention, flash_attention_sharded,
                  forward_with_lse)
from .common import BlockSizes
from .reference import attention as reference_attention

__all__ = ["AttentionShapeError", "BlockSizes", "flash_attention", "flash_attention_sharded",
           "forward_with_lse", "reference_attention"]
