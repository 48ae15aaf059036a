"""Batched sampling with a preallocated KV cache: one prefill, then a jitted decode loop.

Prompts of different lengths are left-padded (segment id 0 on padding, positions counted from
each prompt's first real token), so every row decodes in lock-step into the same cache slot.
The padded width is rounded up (pad_multiple) so that prompts of similar lengths share one
compilation; so do all temperatures and top-p values (greedy vs sampling, top_k, and whether
top-p filters at all are compiled in).

On a mesh (inside `sharding.use(mesh, rules)`, or with params sharded on a mesh), the batch
and the KV cache are sharded by the logical rules (batch over data/fsdp, kv heads over
tensor), and the results are replicated, so every process of a multi-host run has them all."""
from __future__ import annotations

import functools
import weakref
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import models, sharding


def pad_prompts(prompts: Sequence[Sequence[int]], pad_id: int = 0, multiple: int = 1):
    """Left-pad token lists to a multiple of `multiple` -> (tokens [B,P], segment_ids [B,P],
    positions [B,P]) numpy."""
    if len(prompts) == 0 or any(len(p) == 0 for p in prompts):
        raise ValueError("generate: every prompt needs at least one token")
    width = -(-max(len(p) for p in prompts) // multiple) * multiple
    tokens = np.full((len(prompts), width), pad_id, np.int32)
    seg = np.zeros((len(prompts), width), np.int32)
    for i, p in enumerate(prompts):
        tokens[i, width - len(p):] = p
        seg[i, width - len(p):] = 1
    positions = np.maximum(np.cumsum(seg, axis=1) - 1, 0).astype(np.int32)
    return tokens, seg, positions


def filter_logits(logits, temperature, top_k: int, top_p, use_top_p: bool | None = None):
    """Temperature, then top-k and nucleus (top-p) filtering; filtered entries become -inf.
    temperature and top_p may be traced; use_top_p (default: top_p < 1) says whether to filter."""
    logits = logits.astype(jnp.float32) / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if top_p < 1.0 if use_top_p is None else use_top_p:
        sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep the smallest prefix whose mass reaches top_p: a token stays if the mass before it
        # is still below top_p (so the most likely token always stays).
        before = jnp.cumsum(probs, axis=-1) - probs
        cutoff = jnp.min(jnp.where(before < top_p, sorted_logits, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


# The on_token callbacks of generate() calls in progress. The compiled loop always calls the
# same function (_stream), so a new callback does not mean a new compilation.
_LISTENERS: list[Callable] = []


def _stream(step, tokens, emitted):
    if _LISTENERS:
        _LISTENERS[-1](int(step), np.asarray(tokens), np.asarray(emitted))


class _InOrder:
    """Passes steps on in order: callbacks are unordered (jax allows ordered effects on one
    device only), so a step that arrives early waits for the ones before it."""

    def __init__(self, fn):
        self.fn, self.next, self.waiting = fn, 0, {}

    def __call__(self, step, tokens, emitted):
        self.waiting[step] = (tokens, emitted)
        while self.next in self.waiting:
            self.fn(*self.waiting.pop(self.next))
            self.next += 1


def _constrain_cache(cache):
    """Per-layer k/v lists (models.cache_per_layer) sharded by batch and kv heads."""
    kv = ("act_batch", "act_kv_heads", None, None)
    return {"k": [sharding.constrain(x, kv) for x in cache["k"]],
            "v": [sharding.constrain(x, kv) for x in cache["v"]],
            "segment_ids": sharding.constrain(cache["segment_ids"], ("act_batch", None)),
            "index": cache["index"]}


def _decode(params, fused, tokens, segment_ids, positions, max_lens, key, temperature, top_p, *,
            cfg, max_new_tokens, greedy, top_k, use_top_p, stop_tokens, pad_id, stream):
    b, p = tokens.shape
    tokens, segment_ids, positions = (sharding.constrain(x, ("act_batch", None))
                                      for x in (tokens, segment_ids, positions))
    # Layers and cache are split per layer once, here, for the loop's decode_step.
    layers = models.unstack_layers(params) if fused is None else fused["layers"]
    cache = _constrain_cache(models.cache_per_layer(models.init_cache(cfg, b, p + max_new_tokens)))
    # With the fused kernels, a bfloat16 model's prefill keeps float32 activations, as its
    # decode steps do (bfloat16 products from the packed kernels, a bfloat16 cache): XLA:CPU
    # spent more converting bfloat16 activations than it saved (bench-7m: 14.7 -> 12.8 ms).
    prefill_cfg = cfg if fused is None else cfg.replace(compute_dtype="float32")
    logits, stats, cache = models.decode_step(params, layers, tokens, prefill_cfg,
                                              positions=positions, segment_ids=segment_ids,
                                              cache=cache, stats=True, prefill=True)
    cache = _constrain_cache(cache)
    next_pos = positions[:, -1] + 1
    stops = jnp.asarray(stop_tokens or (-1,), jnp.int32)

    def emit(i, logits, stats, key, done, out, logps, lengths):
        key, sub = jax.random.split(key)
        logits = logits.astype(jnp.float32)
        argmax, logsumexp = stats
        if greedy:
            tok = argmax
        else:
            filtered = filter_logits(logits, temperature, top_k, top_p, use_top_p)
            tok = jax.random.categorical(sub, filtered).astype(jnp.int32)
        logp = jnp.take_along_axis(logits, tok[:, None], -1)[:, 0] - logsumexp
        tok = jnp.where(done, pad_id, tok)
        if stream:
            jax.debug.callback(_stream, i, tok, ~done)
        out = out.at[:, i].set(tok)
        logps = logps.at[:, i].set(jnp.where(done, 0.0, logp))
        lengths = lengths + (~done)
        done = done | jnp.isin(tok, stops) | (lengths >= max_lens)
        return tok, key, done, out, logps, lengths

    out = jnp.full((b, max_new_tokens), pad_id, jnp.int32)
    logps = jnp.zeros((b, max_new_tokens), jnp.float32)
    lengths = jnp.zeros((b,), jnp.int32)
    done = max_lens <= 0
    tok, key, done, out, logps, lengths = emit(0, logits, stats, key, done, out, logps, lengths)

    def cond(state):
        i, _, _, _, done, *_ = state
        return (i < max_new_tokens) & ~jnp.all(done)

    def body(state):
        i, tok, cache, key, done, out, logps, lengths = state
        pos = (next_pos + i - 1)[:, None]
        logits, stats, cache = models.decode_step(
            params, layers, tok[:, None], cfg, positions=pos,
            segment_ids=jnp.ones_like(tok[:, None]), cache=cache, fused=fused, stats=True)
        cache = _constrain_cache(cache)
        tok, key, done, out, logps, lengths = emit(i, logits, stats, key, done, out, logps,
                                                   lengths)
        return i + 1, tok, cache, key, done, out, logps, lengths

    state = (jnp.int32(1), tok, cache, key, done, out, logps, lengths)
    _, _, _, _, _, out, logps, lengths = jax.lax.while_loop(cond, body, state)
    return out, logps, lengths


@functools.partial(jax.jit, static_argnames=(
    "cfg", "max_new_tokens", "greedy", "top_k", "use_top_p", "stop_tokens", "pad_id", "stream",
    "mesh", "rules"))
def _generate(params, fused, tokens, segment_ids, positions, max_lens, key, temperature, top_p, *,
              cfg, max_new_tokens, greedy, top_k, use_top_p, stop_tokens, pad_id, stream, mesh,
              rules):
    static = dict(cfg=cfg, max_new_tokens=max_new_tokens, greedy=greedy, top_k=top_k,
                  use_top_p=use_top_p, stop_tokens=stop_tokens, pad_id=pad_id, stream=stream)
    args = (params, fused, tokens, segment_ids, positions, max_lens, key, temperature, top_p)
    if mesh is None:
        return _decode(*args, **static)
    # The mesh is a static argument (not only the context at trace time), so the same call
    # inside and outside `sharding.use` never shares a compilation.
    with sharding.use(mesh, rules):
        out = _decode(*args, **static)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return jax.lax.with_sharding_constraint(out, replicated)


@functools.partial(jax.jit, static_argnames="cfg")
def _fused_weights(params, cfg):
    return models.fused_decode_weights(params, models.unstack_layers(params), cfg)


# (cfg, weak references to the params' leaves, their fused decode weights) for the params
# sampled from last: packing costs about as much as a prefill (bench-7m: 19 ms), and samplers
# are called again and again with the same weights. The entry goes when those params do.
_FUSED: list = []


def _fused_for(params, cfg):
    """models.fused_decode_weights for params (None where they do not apply), made once per
    set of weights."""
    from jaxllm.kernels import cpu_decode
    if not cpu_decode.available():
        return None
    leaves = jax.tree.leaves(params)
    for c, refs, fused in _FUSED:
        if c == cfg and len(refs) == len(leaves) and all(r() is x for r, x in zip(refs, leaves)):
            return fused
    fused = _fused_weights(params, cfg)
    entry: tuple = ()

    def drop(_):  # one of these params was freed: free their fused weights too
        if _FUSED and _FUSED[0] is entry:
            _FUSED.clear()
    try:
        entry = (cfg, [weakref.ref(x, drop) for x in leaves], fused)
    except TypeError:  # a leaf that cannot be weakly referenced: no caching
        return fused
    _FUSED[:] = [entry]
    return fused


def _params_mesh(params):
    """The active mesh and rules, else the mesh the params are sharded on (default rules)."""
    mesh, rules = sharding.current()
    if mesh is not None:
        return (mesh, rules) if mesh.size > 1 else (None, None)
    leaf = jax.tree.leaves(params)[0]
    placed = getattr(leaf, "sharding", None)
    if isinstance(placed, jax.sharding.NamedSharding) and placed.mesh.size > 1:
        from jaxllm.config import ShardingRules
        return placed.mesh, ShardingRules()
    return None, None


def generate(params, cfg: models.ModelConfig, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, key=None, temperature: float = 0.0, top_k: int = 0,
             top_p: float = 1.0, stop_tokens: Sequence[int] = (), max_lengths=None,
             pad_id: int = 0, pad_multiple: int = 16,
             on_token: Callable[[np.ndarray, np.ndarray], None] | None = None) -> dict:
    """Sample continuations of token-id prompts.

    Returns numpy {tokens [B, max_new_tokens] (pad_id after a sequence ends), logprobs (model
    log-probabilities of the chosen tokens, 0 after the end), lengths [B] (tokens generated,
    the stop token included)}. temperature 0 is greedy; a fixed key gives fixed samples.
    on_token(tokens [B], emitted [B]) is called as each step's tokens come out (streaming);
    emitted is False for rows that had already ended."""
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"generate: need temperature >= 0, 0 < top_p <= 1, top_k >= 0 (got "
                         f"{temperature}, {top_p}, {top_k})")
    longest = max((len(p) for p in prompts), default=0)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise ValueError(f"generate: prompt ({longest}) + max_new_tokens "
                         f"({max_new_tokens}) exceeds model.max_seq_len={cfg.max_seq_len}")
    tokens, seg, pos = pad_prompts(prompts, pad_id, pad_multiple)
    max_lens = np.full((len(prompts),), max_new_tokens, np.int32) if max_lengths is None else \
        np.minimum(np.asarray(max_lengths, np.int32), max_new_tokens)
    key = jax.random.key(0) if key is None else key
    mesh, rules = _params_mesh(params)
    if on_token is not None:
        _LISTENERS.append(_InOrder(on_token))
    try:
        fused = None if mesh is not None else _fused_for(params, cfg)
        out, logps, lengths = _generate(
            params, fused, tokens, seg, pos, max_lens, key, np.float32(temperature or 1.0),
            np.float32(top_p), cfg=cfg, max_new_tokens=max_new_tokens,
            greedy=temperature == 0.0, top_k=int(top_k), use_top_p=top_p < 1.0,
            stop_tokens=tuple(int(t) for t in stop_tokens), pad_id=int(pad_id),
            stream=on_token is not None, mesh=mesh, rules=rules)
        if on_token is not None:
            jax.effects_barrier()  # every callback has run before we return
    finally:
        if on_token is not None:
            _LISTENERS.pop()
    return {"tokens": np.asarray(out), "logprobs": np.asarray(logps), "lengths": np.asarray(lengths)}
