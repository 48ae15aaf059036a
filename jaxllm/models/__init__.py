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
from jaxllm.models.llama import Block, Decoder, adapter_dropout, adapter_dropout_rngs
from jaxllm.models.presets import PRESETS, preset

__all__ = ["ModelConfig", "RopeScaling", "PRESETS", "preset", "init", "forward", "hidden_states",
           "init_cache", "logical_axes", "abstract_params", "init_sharded", "count_params",
           "flops_per_token", "memory_estimate", "positions_from_segments", "adapter_dropout",
           "decode_step", "unstack_layers", "cache_per_layer"]


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


def unstack_layers(params) -> list:
    """The stacked layer params as one tree per layer, for decode_step. The q/k/v and the
    gate/up kernels become one wider kernel each (qkv_proj, gate_up_proj) where they are plain
    or int8 and their output axis is not split over the mesh: a decode step is bound by reading
    weights, and XLA:CPU streams one wide kernel faster than two or three narrow ones
    (bench-7m's MLP with its weights out of cache: 350 -> 220 us per layer)."""
    n = jax.tree.leaves(params["layers"])[0].shape[0]
    return [_fuse_projections(jax.tree.map(lambda a, i=i: a[i], params["layers"]))
            for i in range(n)]


# module -> (fused name, parts in output order, logical axis of their outputs)
_FUSABLE = {"self_attn": ("qkv_proj", ("q_proj", "k_proj", "v_proj"), "heads"),
            "mlp": ("gate_up_proj", ("gate_proj", "up_proj"), "mlp")}


def _fuse_projections(layer: dict) -> dict:
    from jaxllm.sharding import shards
    layer = dict(layer)
    for module, (fused, parts, axis) in _FUSABLE.items():
        sub = layer[module]
        kinds = {frozenset(sub[p]) for p in parts}  # the param names each projection holds
        # Adapters (lora_a differs per projection) and a split output axis stay unfused.
        if len(kinds) > 1 or not set(sub[parts[0]]) <= {"kernel", "bias", "kernel_scale"} \
                or shards(axis) > 1:
            continue
        joined = {k: jnp.concatenate([sub[p][k] for p in parts], -1) for k in sub[parts[0]]}
        layer[module] = {k: v for k, v in sub.items() if k not in parts} | {fused: joined}
    return layer


def decode_step(params, layers: list, tokens, cfg: ModelConfig, *, positions, segment_ids,
                cache: dict):
    """forward() with a KV cache for a sampler's loop: `layers` comes from unstack_layers(params)
    and the cache holds per-layer lists (cache_per_layer), both made once outside the loop, so
    a step neither slices the stacked weights nor re-stacks the cache (on XLA:CPU those copies
    took 35% of a decode step). Returns the logits of the last position only, [B, V] (a prefill
    need not project every prompt token onto the vocabulary), equal to forward()'s there."""
    if "soft_prompt" in params:
        raise NotImplementedError("a soft prompt with a KV cache: prefill it as tokens")
    top = {k: v for k, v in params.items() if k != "layers"}
    decoder, block = Decoder(cfg), Block(cfg)
    x = decoder.apply({"params": top}, tokens, method=Decoder.embed)
    start = cache["index"]
    seg = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, start, 1)
    ks, vs = [], []
    for layer, k, v in zip(layers, cache["k"], cache["v"]):
        x, kv = block.apply({"params": layer}, x, positions, segment_ids, {"k": k, "v": v},
                            (start, seg))
        ks.append(kv["k"])
        vs.append(kv["v"])
    logits = decoder.apply({"params": top}, x[:, -1:], method=Decoder.head)[:, 0]
    return logits, {"k": ks, "v": vs, "segment_ids": seg, "index": start + tokens.shape[1]}


def cache_per_layer(cache: dict) -> dict:
    """A stacked cache (init_cache, forward) as per-layer k/v lists (decode_step)."""
    n = cache["k"].shape[0]
    return cache | {"k": [cache["k"][i] for i in range(n)], "v": [cache["v"][i] for i in range(n)]}


def init_cache(cfg: ModelConfig, batch: int, max_len: int, dtype=None) -> dict:
    """An empty KV cache for `max_len` positions: k/v [L,B,KV,S,D] (head-major: attention reads
    it without a transpose), segment ids [B,S], write index."""
    dtype = jnp.dtype(dtype or cfg.compute_dtype)
    shape = (cfg.num_layers, batch, cfg.num_kv_heads, max_len, cfg.dim_per_head)
    return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
            "segment_ids": jnp.zeros((batch, max_len), jnp.int32),
            "index": jnp.zeros((), jnp.int32)}
