"""The decoder family: Llama 2/3/3.1/3.2, Qwen2/2.5 and Mistral, selected by ModelConfig flags.

Flax linen modules, used functionally through jaxllm.models.{init, forward, hidden_states}.
Parameter names follow Hugging Face's (embed_tokens, layers.self_attn.q_proj, ...), with Dense
kernels stored [in, out] (HF stores [out, in]) and the layers stacked on a leading axis.
Every parameter carries logical axis names; activations are constrained at block boundaries.
"""
from __future__ import annotations

import contextlib
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from jaxllm.models.config import ModelConfig
from jaxllm.sharding import constrain, sequence_sharded

NEG_INF = -1e30  # finite, so fully masked rows stay NaN-free


# ----------------------------------------------------------------------------- RoPE

def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [head_dim/2], with Llama-3 scaling when cfg.rope_scaling is set."""
    hd = cfg.dim_per_head
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, hd, 2, dtype=jnp.float32) / hd))
    rs = cfg.rope_scaling
    if rs is None:
        return inv_freq
    # Long wavelengths are divided by `factor`, short ones kept, the band between interpolated.
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > low_wavelen, inv_freq / rs.factor, inv_freq)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(medium, smoothed, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate halves (HF's non-interleaved layout). x [B,T,H,D], positions [B,T]."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B,T,D/2]
    cos = jnp.cos(angles)[:, :, None, :]
    sin = jnp.sin(angles)[:, :, None, :]
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)


# ----------------------------------------------------------------------------- attention

def attention_mask(q_index, k_index, q_segment, k_segment, sliding_window=None):
    """Boolean [B,T,S]: causal by index, same segment, optional sliding window."""
    mask = k_index[:, None, :] <= q_index[:, :, None]
    mask &= q_segment[:, :, None] == k_segment[:, None, :]
    if sliding_window is not None:
        mask &= q_index[:, :, None] - k_index[:, None, :] < sliding_window
    return mask


def reference_attention(q, k, v, mask, scale):
    """Plain jnp GQA attention. q [B,T,H,D], k/v [B,S,KV,D], mask [B,T,S] -> [B,T,H,D]."""
    return attend(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), mask, scale)


def attend(q, kh, vh, mask, scale):
    """GQA attention over head-major keys and values (the KV cache's layout): q [B,T,H,D],
    kh/vh [B,KV,S,D], mask [B,T,S] -> [B,T,H,D].

    Each kv head's query group is folded into the query axis, so both products are plain
    batched matmuls (2x faster on XLA:CPU than a 5-d einsum) and keys need no transpose."""
    b, t, h, d = q.shape
    kv = kh.shape[1]
    g = h // kv
    qh = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4).reshape(b, kv, g * t, d)
    logits = jnp.einsum("bkqd,bksd->bkqs", qh, kh, preferred_element_type=jnp.float32)
    logits = logits.reshape(b, kv, g, t, -1) * scale
    logits = jnp.where(mask[:, None, None], logits, NEG_INF)
    probs = jax.nn.softmax(logits, axis=-1).astype(vh.dtype).reshape(b, kv, g * t, -1)
    out = jnp.einsum("bkqs,bksd->bkqd", probs, vh)
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


_ADAPTER_DROPOUT: list = []


@contextlib.contextmanager
def adapter_dropout(rate: float, key):
    """Within: the low-rank adapters in the layers see their input through dropout(rate), with
    masks drawn from `key` (PEFT's lora_dropout). Training steps set this; evaluation, reference
    models and sampling do not. Read when the forward pass is traced."""
    _ADAPTER_DROPOUT.append((rate, key) if rate > 0 else None)
    try:
        yield
    finally:
        _ADAPTER_DROPOUT.pop()


def active_dropout():
    """(rate, key) inside adapter_dropout with a rate > 0, else None."""
    return _ADAPTER_DROPOUT[-1] if _ADAPTER_DROPOUT else None


def adapter_dropout_rngs():
    active = active_dropout()
    return None if active is None else {"dropout": active[1]}


class _TokenDense(nn.Dense):
    """nn.Dense over [tokens, features]: [B, S, D] is flattened to [B*S, D] around the matmul.
    Same params and math; XLA:CPU runs the 2-d product and its weight gradient up to 2x faster
    than the [B, S, D] x [D, F] form (measured: the vocab projection's grad 350 -> 160 ms).

    Params given beside the kernel (jaxllm.lora.attach) are used inside the layer, so no
    full-size weight is ever materialised for them: "kernel_scale" [1, out] for an int8 kernel
    (per-output-channel, applied to the product) and "lora_a" [in, r] / "lora_b" [r, out] (the
    latter pre-scaled) for a low-rank update x A B added to x W (its input through dropout
    inside `adapter_dropout`). A kernel packed for the CPU decode kernels ("kernel_packed",
    models.fused_decode_weights) is multiplied by their packed product."""

    def __call__(self, x):
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if self.has_variable("params", "kernel_packed"):
            from jaxllm.kernels import cpu_decode
            y = cpu_decode.matmul(x.astype(jnp.float32),
                                  self.get_variable("params", "kernel_packed"), self.features)
            if self.use_bias:
                y = y + self.get_variable("params", "bias")
            return y.astype(self.dtype or y.dtype).reshape(*lead, self.features)
        quantized, adapted = (self.has_variable("params", n) for n in ("kernel_scale", "lora_a"))
        if not (quantized or adapted):
            return super().__call__(x).reshape(*lead, self.features)
        get = lambda name: self.get_variable("params", name).astype(self.dtype)  # noqa: E731
        x = x.astype(self.dtype)
        y = x @ get("kernel")
        if quantized:
            y = y * get("kernel_scale")
        if adapted:
            xa = x
            active = active_dropout()
            if active is not None:
                keep = jax.random.bernoulli(self.make_rng("dropout"), 1 - active[0], x.shape)
                xa = jnp.where(keep, x / (1 - active[0]), 0).astype(x.dtype)
            y = y + (xa @ get("lora_a")) @ get("lora_b")
        if self.use_bias:
            y = y + get("bias")
        return y.reshape(*lead, self.features)


def causal_attention(q, k, v, segment_ids, scale, sliding_window=None):
    """Causal self-attention over whole rows with the plain jnp kernel, the queries taken in up
    to 8 blocks of at least 64 that each attend only to the keys up to their own end: the fully
    masked blocks above the diagonal are never computed (5/8 of the work at 4 blocks; 1.5-2x
    faster fwd+bwd on XLA:CPU at 256 tokens). One block when the sequence is sharded."""
    b, t = q.shape[:2]
    chunks = 1
    if not sequence_sharded():
        while chunks < 8 and t % (2 * chunks) == 0 and t // (2 * chunks) >= 64:
            chunks *= 2
    c = t // chunks
    idx = jnp.broadcast_to(jnp.arange(t), (b, t))
    outs = []
    for i in range(chunks):
        lo, hi = i * c, (i + 1) * c
        mask = attention_mask(idx[:, lo:hi], idx[:, :hi], segment_ids[:, lo:hi],
                              segment_ids[:, :hi], sliding_window)
        outs.append(reference_attention(q[:, lo:hi], k[:, :hi], v[:, :hi], mask, scale))
    return outs[0] if chunks == 1 else jnp.concatenate(outs, axis=1)


def _dense(features, names, cfg: ModelConfig, use_bias=False, name=None):
    return _TokenDense(
        features, use_bias=use_bias, name=name,
        dtype=jnp.dtype(cfg.compute_dtype), param_dtype=jnp.dtype(cfg.param_dtype),
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std), names),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, names[-1:]))


class RMSNorm(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
                           (x.shape[-1],), jnp.dtype(self.cfg.param_dtype))
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.cfg.rms_norm_eps)
        return (y * scale.astype(jnp.float32)).astype(jnp.dtype(self.cfg.compute_dtype))


class Attention(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, kv, cache_meta, last_only=False):
        """last_only (with a cache): the keys and values of every token go into the cache, the
        output is the last token's only, [B, 1, D]."""
        cfg = self.cfg
        b, t, _ = x.shape
        h, kvh, hd = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head
        if self.has_variable("params", "qkv_proj"):  # fused by models.unstack_layers
            qkv = _dense((h + 2 * kvh) * hd, ("embed", "heads"), cfg, cfg.qkv_bias, "qkv_proj")(x)
            q, k, v = jnp.split(qkv, [h * hd, (h + kvh) * hd], axis=-1)
        else:
            q = _dense(h * hd, ("embed", "heads"), cfg, cfg.qkv_bias, "q_proj")(x)
            k = _dense(kvh * hd, ("embed", "kv_heads"), cfg, cfg.qkv_bias, "k_proj")(x)
            v = _dense(kvh * hd, ("embed", "kv_heads"), cfg, cfg.qkv_bias, "v_proj")(x)
        q, k, v = q.reshape(b, t, h, hd), k.reshape(b, t, kvh, hd), v.reshape(b, t, kvh, hd)
        inv_freq = rope_inv_freq(cfg)
        q, k = apply_rope(q, positions, inv_freq), apply_rope(k, positions, inv_freq)
        q = checkpoint_name(q, "qkv")
        k = checkpoint_name(k, "qkv")
        v = checkpoint_name(v, "qkv")
        q = constrain(q, ("act_batch", "act_length", "act_heads", None))
        scale = 1.0 / math.sqrt(hd)

        if kv is None:
            if cfg.attention_impl == "reference":
                out = causal_attention(q, k, v, segment_ids, scale, cfg.sliding_window)
            else:
                out = _fused_attention(cfg, q, k, v, segment_ids, scale)
            new_kv = None
        else:
            # Write this chunk at `start`, then attend over the whole (masked) buffer. The
            # cache is head-major [B,KV,S,D], so a step transposes only its own new keys (a
            # [B,S,KV,D] cache cost two whole-cache copies per layer and step).
            start, cseg = cache_meta
            write = lambda buf, new: jax.lax.dynamic_update_slice_in_dim(  # noqa: E731
                buf, new.transpose(0, 2, 1, 3).astype(buf.dtype), start, 2)
            ck, cv = write(kv["k"], k), write(kv["v"], v)
            # A prefill into an empty cache (models.decode_step(prefill=True)) sees only its own
            # keys, so it attends over those, not the whole masked buffer.
            fresh = isinstance(start, int) and start == 0
            if fresh and not last_only:
                out = causal_attention(q, k, v, segment_ids, scale, cfg.sliding_window)
            else:
                kh, vh, kseg = ((k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), segment_ids)
                                if fresh else (ck, cv, cseg))
                q_idx, qseg = jnp.broadcast_to(start + jnp.arange(t), (b, t)), segment_ids
                if last_only:
                    q, q_idx, qseg = q[:, -1:], q_idx[:, -1:], qseg[:, -1:]
                k_idx = jnp.broadcast_to(jnp.arange(kh.shape[2]), (b, kh.shape[2]))
                mask = attention_mask(q_idx, k_idx, qseg, kseg, cfg.sliding_window)
                out = attend(q, kh.astype(q.dtype), vh.astype(q.dtype), mask, scale)
            new_kv = {"k": ck, "v": cv}

        out = out.reshape(b, q.shape[1], h * hd)
        return _dense(cfg.hidden_size, ("heads", "embed"), cfg, False, "o_proj")(out), new_kv


def _fused_attention(cfg: ModelConfig, q, k, v, segment_ids, scale):
    if cfg.attention_impl == "cudnn":
        if cfg.sliding_window is not None:
            raise NotImplementedError("model.attention_impl='cudnn' does not support "
                                      "sliding_window; use attention_impl=flash or reference")
        mask = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True,
                                            implementation="cudnn")
    from jaxllm.kernels import flash_attention_sharded
    from jaxllm.sharding import current
    mesh, rules = current()
    return flash_attention_sharded(q, k, v, segment_ids, mesh, rules=rules, causal=True,
                                   sm_scale=scale, sliding_window=cfg.sliding_window,
                                   interpret=cfg.flash_interpret or None)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.cfg
        if self.has_variable("params", "gate_up_proj"):  # fused by models.unstack_layers
            gate_up = _dense(2 * cfg.intermediate_size, ("embed", "mlp"), cfg, name="gate_up_proj")(x)
            gate, up = jnp.split(gate_up, 2, axis=-1)
        else:
            gate = _dense(cfg.intermediate_size, ("embed", "mlp"), cfg, name="gate_proj")(x)
            up = _dense(cfg.intermediate_size, ("embed", "mlp"), cfg, name="up_proj")(x)
        hidden = constrain(nn.silu(gate) * up, ("act_batch", "act_length", "act_mlp"))
        return _dense(cfg.hidden_size, ("mlp", "embed"), cfg, name="down_proj")(hidden)


class Block(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, positions, segment_ids, kv, cache_meta, last_only=False):
        attn, kv = Attention(self.cfg, name="self_attn")(
            RMSNorm(self.cfg, name="input_layernorm")(x), positions, segment_ids, kv, cache_meta,
            last_only)
        x = (x[:, -1:] if last_only else x) + attn
        x = x + MLP(self.cfg, name="mlp")(RMSNorm(self.cfg, name="post_attention_layernorm")(x))
        return constrain(x, ("act_batch", "act_length", "act_embed")), kv


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_qkv": jax.checkpoint_policies.save_only_these_names("qkv"),
}


class Decoder(nn.Module):
    cfg: ModelConfig

    def setup(self):
        cfg = self.cfg
        self.embed_tokens = nn.Embed(
            cfg.vocab_size, cfg.hidden_size, dtype=jnp.dtype(cfg.compute_dtype),
            param_dtype=jnp.dtype(cfg.param_dtype),
            embedding_init=nn.with_logical_partitioning(nn.initializers.normal(cfg.init_std),
                                                        ("vocab", "embed")))
        block = Block
        if cfg.remat != "none":
            block = nn.remat(Block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=False)
        # Layers are always stacked on a leading axis (one param tree, HF-mappable); unrolling
        # the scan trades compile time for speed where the per-iteration overhead shows (CPU).
        self.layers = nn.scan(
            block, variable_axes={"params": 0}, split_rngs={"params": True, "dropout": True},
            in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast), length=cfg.num_layers,
            unroll=1 if cfg.scan_layers else cfg.num_layers,
            metadata_params={nn.PARTITION_NAME: "layers"})(cfg)
        self.norm = RMSNorm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = _dense(cfg.vocab_size, ("embed", "vocab"), cfg, name="lm_head")

    def embed(self, tokens):
        return constrain(self.embed_tokens(tokens), ("act_batch", "act_length", "act_embed"))

    def head(self, x):
        """Final norm and logits."""
        return self.logits(self.norm(x))

    def hidden(self, tokens, positions, segment_ids, cache, prefix=None):
        x = self.embed_tokens(tokens)
        if prefix is not None:  # soft prompt: N learned vectors before each row's first token
            if cache is not None:
                raise NotImplementedError("a soft prompt with a KV cache: prefill it as tokens")
            b, n = x.shape[0], prefix.shape[0]
            x = jnp.concatenate([jnp.broadcast_to(prefix.astype(x.dtype), (b, n, x.shape[2])), x], 1)
            positions = jnp.concatenate(
                [jnp.broadcast_to(jnp.arange(n, dtype=positions.dtype), (b, n)), positions + n], 1)
            segment_ids = jnp.concatenate([jnp.repeat(segment_ids[:, :1], n, 1), segment_ids], 1)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        kv, meta = None, None
        if cache is not None:
            # Segment ids of the whole buffer and the write offset are shared by all layers.
            start = cache["index"]
            cseg = jax.lax.dynamic_update_slice_in_dim(cache["segment_ids"], segment_ids, start, 1)
            kv, meta = {"k": cache["k"], "v": cache["v"]}, (start, cseg)
        x, kv = self.layers(x, positions, segment_ids, kv, meta)
        if cache is not None:
            cache = {**kv, "segment_ids": meta[1], "index": meta[0] + tokens.shape[1]}
        if prefix is not None:
            x = x[:, prefix.shape[0]:]
        return self.norm(x), cache

    def logits(self, hidden):
        if self.cfg.tie_embeddings:
            out = self.embed_tokens.attend(hidden)
        else:
            out = self.lm_head(hidden)
        return constrain(out, ("act_batch", "act_length", "act_vocab"))

    def __call__(self, tokens, positions, segment_ids, cache, return_hidden=False, prefix=None):
        hidden, cache = self.hidden(tokens, positions, segment_ids, cache, prefix)
        if return_hidden:
            return hidden, cache
        return self.logits(hidden), cache
