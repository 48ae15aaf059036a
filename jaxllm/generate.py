"""Batched sampling with a preallocated KV cache: one prefill, then a jitted decode loop.

Prompts of different lengths are left-padded (segment id 0 on padding, positions counted from
each prompt's first real token), so every row decodes in lock-step into the same cache slot."""
from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import models


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0):
    """Left-pad token lists -> (tokens [B,P], segment_ids [B,P], positions [B,P]) numpy."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    width = max(len(p) for p in prompts)
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    seg = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        seg[i, width - len(p):] = 1
    positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    return tokens, seg, positions


def filter_logits(logits, temperature: float, top_k: int, top_p: float):
    """Temperature, then top-k and nucleus (top-p) filtering; filtered entries become -inf."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it
        # is still below top_p (so the most likely token always stays).
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _choose(logits, key, temperature, top_k, top_p):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, temperature, top_k, top_p)).astype(jnp.int32)


@functools.partial(jax.jit, static_argnames=("cfg", "max_new_tokens", "temperature", "top_k",
                                             "top_p", "stop_tokens", "pad_id"))
def _generate(params, tokens, segment_ids, positions, max_lens, key, *, cfg, max_new_tokens,
              temperature, top_k, top_p, stop_tokens, pad_id):
    b, p = tokens.shape
    # Decoding runs the layer loop once per token: unrolling it avoids the scan's per-iteration
    # overhead (same params either way).
    cfg = cfg.replace(scan_layers=False)
    cache = models.init_cache(cfg, b, p + max_new_tokens)
    logits, cache = models.forward(params, tokens, cfg, positions=positions,
                                   segment_ids=segment_ids, cache=cache)
    next_pos = positions[:, -1] + 1
    stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)

    def emit(i, logits, key, done, out, logps, lengths):
        key, sub = jax.random.split(key)
        tok = _choose(logits, sub, temperature, top_k, top_p)
        logp = jnp.take_along_axis(jax.nn.log_softmax(logits.astype(jnp.float32)),
                                   tok[:, None], axis=-1)[:, 0]
        tok = jnp.where(done, pad_id, tok)
        out = out.at[:, i].set(tok)
        logps = logps.at[:, i].set(jnp.where(done, 0.0, logp))
        lengths = lengths + (~done)
        done = done | jnp.isin(tok, stops) | (lengths >= max_lens)
        return tok, key, done, out, logps, lengths

    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    logps = jnp.zeros((b, max_new_tokens), jnp.float32)
    lengths = jnp.zeros((b,), jnp.int32)
    done = max_lens <= 0
    tok, key, done, out, logps, lengths = emit(0, logits[:, -1], key, done, out, logps, lengths)

    def cond(state):
        i, _, _, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, cache, key, done, out, logps, lengths = state
        pos = (next_pos + i - 1)[:, None]
        logits, cache = models.forward(params, tok[:, None], cfg, positions=pos,
                                       segment_ids=jnp.ones_like(tok[:, None]), cache=cache)
        tok, key, done, out, logps, lengths = emit(i, logits[:, -1], key, done, out, logps, lengths)
        return i + 1, tok, cache, key, done, out, logps, lengths

    state = (jnp.int32(1), tok, cache, key, done, out, logps, lengths)
    _, _, _, _, _, out, logps, lengths = jax.lax.while_loop(cond, body, state)
    return out, logps, lengths


def generate(params, cfg: models.ModelConfig, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, key=None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_tokens: Sequence[int] = (), max_lengths=None,
             pad_id: int = 0) -> dict:
    """Sample continuations of token-id prompts.

    Returns numpy {tokens [B, max_new_tokens] (pad_id after a sequence ends), logprobs (model
    log-probabilities of the chosen tokens, 0 after the end), lengths [B] (tokens generated,
    the stop token included)}. temperature 0 is greedy; a fixed key gives fixed samples."""
    tokens, seg, pos = pad_prompts(prompts, pad_id)
    if tokens.shape[1] + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"generate: prompt ({tokens.shape[1]}) + max_new_tokens "
                         f"({max_new_tokens}) exceeds model.max_seq_len={cfg.max_seq_len}")
    max_lens = np.full((len(prompts),), max_new_tokens, np.int32) if max_lengths is None else \
        np.minimum(np.asarray(max_lengths, np.int32), max_new_tokens)
    key = jax.random.key(0) if key is None else key
    out, logps, lengths = _generate(
        params, tokens, seg, pos, max_lens, key, cfg=cfg, max_new_tokens=max_new_tokens,
        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
        stop_tokens=tuple(int(t) for t in stop_tokens), pad_id=int(pad_id))
    return {"tokens": np.asarray(out), "logprobs": np.asarray(logps), "lengths": np.asarray(lengths)}
