"""Plain-jnp attention with the kernels' signature and residuals: the CPU path and the oracle."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .common import MASK_VALUE


def mask(t: int, s: int, segment_ids, *, causal: bool, sliding_window: int | None):
    """Boolean [B or 1, T, S]: which keys each query sees (queries end-aligned with keys)."""
    qi = jnp.arange(t)[:, None] + (s - t)
    ki = jnp.arange(s)[None, :]
    m = jnp.ones((t, s), bool)
    if causal:
        m &= ki <= qi
    if sliding_window:
        m &= qi - ki < sliding_window
    m = m[None]
    if segment_ids is not None:
        q_seg, k_seg = segment_ids if isinstance(segment_ids, tuple) else (segment_ids, segment_ids)
        m = m & (q_seg[:, :, None] == k_seg[:, None, :])
    return m


def attention(q, k, v, segment_ids=None, *, causal=True, sm_scale=None, sliding_window=None):
    """q [B,T,H,D], k/v [B,S,KV,D] -> (out [B,T,H,D], lse [B,H,T] float32).

    Rows that see no key give out 0 and lse -inf (no NaN, in values or gradients)."""
    b, t, h, d = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = h // kv
    scale = d ** -0.5 if sm_scale is None else sm_scale
    qg = q.reshape(b, t, kv, g, d)
    logits = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    visible = mask(t, s, segment_ids, causal=causal, sliding_window=sliding_window)[:, None, None]
    logits = jnp.where(visible, logits, MASK_VALUE)
    m = jnp.max(logits, axis=-1, keepdims=True)
    p = jnp.where(visible, jnp.exp(logits - m), 0.0)
    l = jnp.sum(p, axis=-1, keepdims=True)
    probs = p / jnp.where(l == 0, 1.0, l)
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    lse = jnp.where(l == 0, -jnp.inf, m + jnp.log(l))[..., 0].reshape(b, h, t)
    return out.reshape(b, t, h, d).astype(q.dtype), lse
