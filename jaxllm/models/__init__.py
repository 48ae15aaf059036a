"""Public model API: plain-dict params and pure functions around the Flax decoder.

    params = init(cfg, key)
    logits, cache = forward(params, tokens, cfg, positions=None, segment_ids=None, cache=None)
    hidden, cache = hidden_states(params, tokens, cfg, ...)   # final-normed states, for heads
"""
from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxllm.models.config import ModelConfig, RopeScaling
from jaxllm.models.counting import count_params, flops_per_token, memory_estimate
from jaxllm.models.llama import Decoder, adapter_dropout, adapter_dropout_rngs
from jaxllm.models.presets import PRESETS, preset
from jaxllm.models.decode import (cache_per_layer, decode_step, fused_decode_weights, logit_stats,
                                 unstack_layers)

__all__ = ["ModelConfig", "RopeScaling", "PRESETS", "preset", "init", "forward", "hidden_states",
           "init_cache", "logical_axes", "abstract_params", "init_sharded", "count_params",
           "flops_per_token", "memory_estimate", "positions_from_segments", "adapter_dropout",
           "decode_step", "unstack_layers", "cache_per_layer", "fused_decode_weights",
           "logit_stats"]


def _dummy(cfg: ModelConfig):
    tokens = jnp.zeros((1, 1), jnp.int32)
    return tokens, tokens, jnp.ones((1, 1), jnp.int32), None


def _boxed_init(cfg: ModelConfig, key):
    return Decoder(cfg).init(key, *_dummy(cfg))["params"]


@functools.partial(jax.jit, static_argnums=0)
def init(cfg: ModelConfig, key: jax.Array) -> dict:
    """Fresh params as a plain nested dict (HF-aligned names, layers stacked on axis 0)."""
    return nn.unbox(_boxed_init(cfg, key))


def abstract_params(cfg: ModelConfig) -> dict:
    """ShapeDtypeStructs of the params, without allocating them."""
    return nn.unbox(jax.eval_shape(functools.partial(_boxed_init, cfg), jax.random.key(0)))


def logical_axes(cfg: ModelConfig) -> dict:
    """Same tree as the params, each leaf a tuple of logical axis names."""
    boxed = jax.eval_shape(functools.partial(_boxed_init, cfg), jax.random.key(0))
    return jax.tree.map(lambda b: tuple(b.names), boxed,
                        is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))


def init_sharded(cfg: ModelConfig, key: jax.Array, mesh, rules) -> dict:
    """Params created directly in their shards (never whole on one host)."""
    from jaxllm.sharding import tree_shardings
    shardings = tree_shardings(logical_axes(cfg), abstract_params(cfg), mesh, rules)
    return jax.jit(functools.partial(init, cfg), out_shardings=shardings)(key)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
    """Positions that restart at 0 wherever the segment id changes along the row."""
    t = segment_ids.shape[1]
    idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool),
                              segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def _inputs(tokens, positions, segment_ids, cache):
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
        if cache is not None:
            positions = jnp.broadcast_to(cache["index"] + jnp.arange(tokens.shape[1]), tokens.shape)
        else:
            positions = positions_from_segments(segment_ids)
    return tokens, positions.astype(jnp.int32), segment_ids.astype(jnp.int32), cache


def _split_soft_prompt(params):
    """Params may carry a soft prompt ("soft_prompt": [N, D], prompt tuning) beside the
    model's own: it is prepended to every row's embeddings."""
    if "soft_prompt" not in params:
        return params, None
    return {k: v for k, v in params.items() if k != "soft_prompt"}, params["soft_prompt"]


def forward(params, tokens, cfg: ModelConfig, *, positions=None, segment_ids=None, cache=None):
    """Logits [B,T,V] (compute dtype) and the updated cache (None when none was given)."""
    params, prefix = _split_soft_prompt(params)
    return Decoder(cfg).apply({"params": params}, *_inputs(tokens, positions, segment_ids, cache),
                              prefix=prefix, rngs=adapter_dropout_rngs())


def hidden_states(params, tokens, cfg: ModelConfig, *, positions=None, segment_ids=None,
                  cache=None):
    """Final hidden states [B,T,D] after the last norm (for reward/value heads)."""
    params, prefix = _split_soft_prompt(params)
    return Decoder(cfg).apply({"params": params}, *_inputs(tokens, positions, segment_ids, cache),
                              return_hidden=True, prefix=prefix, rngs=adapter_dropout_rngs())


def unembed(params, hidden, cfg: ModelConfig):
    """Logits from hidden states (applies the tied embedding or lm_head)."""
    return Decoder(cfg).apply({"params": params}, hidden, method=Decoder.logits,
                              rngs=adapter_dropout_rngs())


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache for `max_len` positions: k/v [L,B,KV,S,D] (head-major: attention reads
    it without a transpose), segment ids [B,S], write index."""
    dtype = jnp.dtype(dtype or cfg.compute_dtype)
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.dim_per_head)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
            "index": jnp.zeros((), jnp.int32)}
