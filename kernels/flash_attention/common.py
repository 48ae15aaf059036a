"""What every flash-attention implementation shares: block sizes, masks, the kv range."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# Finite stand-in for -inf inside kernels: exp(MASK - m) underflows to 0 without inf - inf NaNs.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes along the query and key/value sequence, for forward and backward alike."""
    block_q: int
    block_kv: int


@dataclasses.dataclass(frozen=True)
class Options:
    """The static (hashable) arguments of one attention call."""
    causal: bool
    sm_scale: float
    sliding_window: int | None
    blocks: BlockSizes
    interpret: bool


def block_mask(q_start, k_start, shape, opts: Options, q_seg=None, k_seg=None, kv_major=False):
    """Boolean mask of one [bq, bk] tile ([bk, bq] when kv_major), or None when all visible.

    q_seg/k_seg broadcast against the tile (a column and a row, in the tile's orientation)."""
    q_axis, k_axis = (1, 0) if kv_major else (0, 1)
    mask = None
    if opts.causal or opts.sliding_window:
        qi = q_start + jax.lax.broadcasted_iota(jnp.int32, shape, q_axis)
        ki = k_start + jax.lax.broadcasted_iota(jnp.int32, shape, k_axis)
        if opts.causal:
            mask = ki <= qi
        if opts.sliding_window:
            near = qi - ki < opts.sliding_window
            mask = near if mask is None else mask & near
    if q_seg is not None:
        same = q_seg == k_seg
        mask = same if mask is None else mask & same
    return mask


def kv_block_range(i, opts: Options, num_kv_blocks: int):
    """First and last kv block that query block i can see: the others are never fetched."""
    bq, bk = opts.blocks.block_q, opts.blocks.block_kv
    last = num_kv_blocks - 1
    if opts.causal:
        last = jnp.minimum(last, ((i + 1) * bq - 1) // bk)
    first = 0
    if opts.sliding_window:
        first = jnp.maximum(0, (i * bq - opts.sliding_window + 1) // bk)
    return first, last


def q_block_range(j, opts: Options, num_q_blocks: int):
    """First and last query block that sees kv block j."""
    bq, bk = opts.blocks.block_q, opts.blocks.block_kv
    first = 0
    if opts.causal:
        first = (j * bk) // bq
    last = num_q_blocks - 1
    if opts.sliding_window:
        last = jnp.minimum(last, ((j + 1) * bk - 1 + opts.sliding_window - 1) // bq)
    return first, last
