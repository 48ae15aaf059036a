"""Per-sequence quantities every post-training loss builds on."""
from __future__ import annotations

import jax.numpy as jnp

from jaxllm.data.posttrain import ROW_KEYS
from jaxllm.tasks.pretrain import rows_cross_entropy


def token_logps(params, cfg, rows: dict, prefix: str = ""):
    """log p(target) per position [B, S] (fp32) for rows with tokens/targets/segments/positions."""
    return -rows_cross_entropy(params, rows, cfg, prefix)[0]


def sequence_logps(params, cfg, rows: dict, prefix: str = ""):
    """(sum of log p over the loss_mask tokens, their count) per row."""
    mask = rows[prefix + "loss_mask"].astype(jnp.float32)
    return (token_logps(params, cfg, rows, prefix) * mask).sum(-1), mask.sum(-1)


def pair_rows(batch: dict) -> dict:
    """Chosen and rejected rows stacked along the batch: one forward pass for both."""
    return {k: jnp.concatenate([batch["chosen_" + k], batch["rejected_" + k]]) for k in ROW_KEYS}


def last_index(segment_ids):
    """Index of each row's last real (non-pad) token."""
    return jnp.maximum((segment_ids > 0).sum(-1) - 1, 0)
