"""Decoding with a KV cache: the per-layer weights and cache a sampler's loop uses, and one
decode step. On XLA:CPU a one-token step can run as one fused kernel call per layer
(jaxllm.kernels.cpu_decode); fused_decode_weights says whether it applies."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm import sharding
from jaxllm.models.config import ModelConfig
from jaxllm.models.llama import Block, Decoder, attention_mask, rope_inv_freq


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
    layer = dict(layer)
    for module, (fused, parts, axis) in _FUSABLE.items():
        sub = layer[module]
        kinds = {frozenset(sub[p]) for p in parts}  # the param names each projection holds
        # Adapters (lora_a differs per projection) and a split output axis stay unfused.
        if len(kinds) > 1 or not set(sub[parts[0]]) <= {"kernel", "bias", "kernel_scale"} \
                or sharding.shards(axis) > 1:
            continue
        joined = {k: jnp.concatenate([sub[p][k] for p in parts], -1) for k in sub[parts[0]]}
        layer[module] = {k: v for k, v in sub.items() if k not in parts} | {fused: joined}
    return layer


def decode_step(params, layers: list, tokens, cfg: ModelConfig, *, positions, segment_ids,
                cache: dict, fused: dict | None = None, stats: bool = False,
                prefill: bool = False):
    """forward() with a KV cache for a sampler's loop: `layers` comes from unstack_layers(params)
    and the cache holds per-layer lists (cache_per_layer), both made once outside the loop, so
    a step neither slices the stacked weights nor re-stacks the cache (on XLA:CPU those copies
    took 35% of a decode step). Returns the logits of the last position only, [B, V] (a prefill
    need not project every prompt token onto the vocabulary), equal to forward()'s there.
    With `fused` (fused_decode_weights), a one-token step runs on the fused CPU kernels.
    With stats=True, returns (logits, (argmax, logsumexp) of each row's logits, cache): what a
    sampler needs besides the logits, which the fused kernels take while the logits are hot.
    prefill=True promises an empty cache (index 0): the tokens then attend over their own keys
    only, not the whole masked cache (the same result). With the last layer's output taken at
    the last position only, bench-7m's prefill went 27 -> 19 ms."""
    if "soft_prompt" in params:
        raise NotImplementedError("a soft prompt with a KV cache: prefill it as tokens")
    if fused is not None and tokens.shape[1] == 1 and cache["k"][0].dtype in _CACHE_DTYPES:
        logits, row_stats, cache = _fused_step(params, fused, tokens, cfg, positions,
                                               segment_ids, cache)
        return (logits, row_stats, cache) if stats else (logits, cache)
    top = {k: v for k, v in params.items() if k != "layers"}
    decoder, block = Decoder(cfg), Block(cfg)
    x = decoder.apply({"params": top}, tokens, method=Decoder.embed)
    start = cache["index"]
    if prefill and not isinstance(start, jax.core.Tracer) and int(start) != 0:
        raise ValueError(f"decode_step(prefill=True) needs an empty cache; its index is "
                         f"{int(start)}")
    seg = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, start, 1)
    ks, vs = [], []
    for i, (layer, k, v) in enumerate(zip(layers, cache["k"], cache["v"])):
        # The last layer's keys and values are needed at every position, its output only at
        # the last one (the logits'): a prefill skips the rest of its attention and its MLP.
        x, kv = block.apply({"params": layer}, x, positions, segment_ids, {"k": k, "v": v},
                            (0 if prefill else start, seg), last_only=i == len(layers) - 1)
        ks.append(kv["k"])
        vs.append(kv["v"])
    logits = decoder.apply({"params": top}, x[:, -1:], method=Decoder.head)[:, 0]
    cache = {"k": ks, "v": vs, "segment_ids": seg, "index": start + tokens.shape[1]}
    return (logits, logit_stats(logits), cache) if stats else (logits, cache)


def logit_stats(logits):
    """Each row's first argmax and log-sum-exp (float32). The argmax is two plain reductions:
    XLA:CPU runs jnp.argmax's (value, index) reduction unvectorised. A row with NaN logits
    (nothing equals its max) yields the last vocabulary id."""
    logits = logits.astype(jnp.float32)
    v = logits.shape[-1]
    iota = jnp.arange(v, dtype=jnp.int32)
    first = jnp.min(jnp.where(logits == jnp.max(logits, -1, keepdims=True), iota, v), -1)
    return jnp.minimum(first, v - 1), jax.nn.logsumexp(logits, axis=-1)


_CACHE_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))  # the fused layer's


def fused_decode_weights(params, layers: list, cfg: ModelConfig) -> dict | None:
    """Weights for the fused CPU kernels (jaxllm.kernels.cpu_decode): `layers` (unstack_layers)
    with each projection's kernel packed ("kernel_packed", which the Flax layers also read, so
    a prefill multiplies with the same kernel), the norms and biases as float32, and the final
    norm and packed output projection.
    - A float32 model's kernels keep their dtype, float32 or bfloat16 (half the bytes to
      stream; widened exactly, the math float32's).
    - A bfloat16 model's (compute_dtype) are packed for bfloat16 products, as its Flax layers
      compute them: activations rounded to bfloat16, products summed in float32 (twice the
      multiply-adds per instruction where the CPU has AVX512-BF16). Norms, attention and the
      residual stream stay float32 within a step, finer than the Flax layers' bfloat16.
    None where they do not apply: not on CPU, on a mesh, weights neither float32 nor bfloat16,
    projections that are not one plain kernel each (int8, LoRA adapters), or no compiler. They
    are a second copy of the weights; generate() makes them once per set of params."""
    from jaxllm.kernels import cpu_decode
    mesh, _ = sharding.current()
    f32 = jnp.dtype(jnp.float32)
    if (jax.default_backend() != "cpu" or (mesh is not None and mesh.size > 1)
            or "soft_prompt" in params
            or any(leaf.dtype not in (f32, jnp.bfloat16) for leaf in jax.tree.leaves(params))
            or ("lm_head" in params and set(params["lm_head"]) != {"kernel"})
            or not cpu_decode.available()):
        return None
    if any(set(layer[m]) != set(parts) or not {"kernel"} <= set(layer[m][p]) <= names
           for layer in layers for m, parts in _PLAIN.items() for p, names in parts.items()):
        return None

    bf16_products = jnp.dtype(cfg.compute_dtype) == jnp.bfloat16

    def packed(projection: dict) -> dict:  # the kernel packed, a bias in float32
        rest = {k: v.astype(f32) for k, v in projection.items() if k != "kernel"}
        return {"kernel_packed": cpu_decode.pack(projection["kernel"], bf16_products), **rest}
    layers = [{k: {p: packed(v[p]) for p in _PLAIN[k]} if k in _PLAIN  # the rest: norms
               else jax.tree.map(lambda a: a.astype(f32), v) for k, v in layer.items()}
              for layer in layers]
    head = (params["embed_tokens"]["embedding"].T if cfg.tie_embeddings
            else params["lm_head"]["kernel"])
    return {"layers": layers, "norm": params["norm"]["scale"].astype(f32),
            "head": cpu_decode.pack(head, bf16_products)}


# The projections the fused layer kernel takes, and the params each may hold.
_PLAIN = {"self_attn": {"qkv_proj": {"kernel", "bias"}, "o_proj": {"kernel"}},
          "mlp": {"gate_up_proj": {"kernel"}, "down_proj": {"kernel"}}}


def _fused_step(params, fused: dict, tokens, cfg: ModelConfig, positions, segment_ids, cache):
    """decode_step for one token per row, one kernel call per layer -> (logits, (argmax,
    logsumexp), cache); the same masks and RoPE angles as the Flax path, computed here once for
    all layers."""
    from jaxllm.kernels import cpu_decode
    top = {k: v for k, v in params.items() if k != "layers"}
    decoder = Decoder(cfg)
    x = decoder.apply({"params": top}, tokens, method=Decoder.embed)[:, 0].astype(jnp.float32)
    start = cache["index"]
    seg = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, start, 1)
    b, s = seg.shape
    mask = attention_mask(jnp.full((b, 1), start), jnp.broadcast_to(jnp.arange(s), (b, s)),
                          segment_ids, seg, cfg.sliding_window)[:, 0]
    angles = positions[:, 0, None].astype(jnp.float32) * rope_inv_freq(cfg)
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    no_bias = jnp.zeros((cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.dim_per_head)
    ks, vs = [], []
    for layer, k, v in zip(fused["layers"], cache["k"], cache["v"]):
        attn, mlp = layer["self_attn"], layer["mlp"]
        qkv = attn["qkv_proj"]
        weights = (layer["input_layernorm"]["scale"], qkv["kernel_packed"],
                   qkv.get("bias", no_bias), attn["o_proj"]["kernel_packed"],
                   layer["post_attention_layernorm"]["scale"],
                   mlp["gate_up_proj"]["kernel_packed"], mlp["down_proj"]["kernel_packed"])
        x, k, v = cpu_decode.layer(x, weights, k, v, cos, sin, mask, start, heads=cfg.num_heads,
                                   kv_heads=cfg.num_kv_heads, mlp=cfg.intermediate_size,
                                   eps=cfg.rms_norm_eps)
        ks.append(k)
        vs.append(v)
    logits, argmax, lse = cpu_decode.head(x, fused["norm"], fused["head"], cfg.vocab_size,
                                          eps=cfg.rms_norm_eps)
    return logits, (argmax, lse), {"k": ks, "v": vs, "segment_ids": seg, "index": start + 1}


def cache_per_layer(cache: dict) -> dict:
    """A stacked cache (init_cache, forward) as per-layer k/v lists (decode_step)."""
    n = cache["k"].shape[0]
    return cache | {"k": [cache["k"][i] for i in range(n)], "v": [cache["v"][i] for i in range(n)]}
