"""`flash_attention`: validation, dispatch by backend, padding, the custom VJP, and shard_map."""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from . import reference, tpu, triton
from .common import BlockSizes, Options

BACKENDS = ("tpu", "gpu", "reference")
# Defaults per backend: TPUs want large tiles (128-wide ones reach a few % of peak), Triton
# on GPUs wants tiles that fit shared memory next to a head_dim-128 accumulator.
DEFAULT_BLOCKS = {"tpu": BlockSizes(512, 512), "gpu": BlockSizes(64, 64)}
# Smallest legal tile per backend: the lane width on TPU (segment ids and lse travel as rows),
# the smallest tensor-core dot on GPU.
MIN_BLOCK = {"tpu": 128, "gpu": 16}
PAD_SEGMENT = jnp.iinfo(jnp.int32).min  # padded positions: a segment no real token has


class AttentionShapeError(ValueError):
    """Arguments the kernels cannot take (raised before anything is traced into a kernel)."""


def flash_attention(q, k, v, segment_ids=None, *, causal=True, sm_scale=None, block_sizes=None,
                    backend=None, interpret=None, sliding_window=None):
    """Memory-efficient exact attention. q [B,T,H,D], k/v [B,S,KV,D] with KV dividing H.

    segment_ids [B,T] (queries and keys share them) keep packed documents apart; causal masks
    future keys; sliding_window (optional) hides keys that many positions back or more.
    backend: None picks by jax.default_backend() (CPU runs the jnp reference, or the TPU kernel
    in interpret mode when `interpret` is asked for), or one of "tpu", "gpu", "reference".
    interpret: True runs the Pallas kernel in interpret mode on CPU; for "tpu" a
    `pltpu.InterpretParams` may be given instead (e.g. to detect races). Sequence lengths need
    not be multiples of the blocks: inputs are padded with a segment no token attends to."""
    backend, opts = _prepare(q, k, v, segment_ids, causal, sm_scale, block_sizes, backend,
                             interpret, sliding_window)
    if backend == "reference":
        return reference.attention(q, k, v, segment_ids, causal=causal, sm_scale=opts.sm_scale,
                                   sliding_window=sliding_window)[0]
    blocks = opts.blocks
    t = q.shape[1]
    step = math.lcm(blocks.block_q, blocks.block_kv)
    padded = -(-t // step) * step
    if padded != t:
        if segment_ids is None:
            segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
        pad = ((0, 0), (0, padded - t), (0, 0), (0, 0))
        q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
        segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, padded - t)),
                              constant_values=PAD_SEGMENT)
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    return _attend(q, k, v, seg, backend, opts)[:, :t]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(q, k, v, seg, backend, opts):
    return _forward(q, k, v, seg, backend, opts)[0]


def _forward(q, k, v, seg, backend, opts):
    if backend == "tpu":
        qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
        seg_rows = None if seg is None else seg[:, None, :]
        o, lse = tpu.forward(qt, kt, vt, seg_rows, opts)
        return o.transpose(0, 2, 1, 3), (qt, kt, vt, seg_rows, o, lse)
    o, lse = triton.forward(q, k, v, seg, opts)
    return o, (q, k, v, seg, o, lse)


def _attend_fwd(q, k, v, seg, backend, opts):
    return _forward(q, k, v, seg, backend, opts)


def _attend_bwd(backend, opts, residuals, do):
    q, k, v, seg, o, lse = residuals
    if backend == "tpu":
        dq, dk, dv = tpu.backward(q, k, v, seg, o, lse, do.transpose(0, 2, 1, 3), opts)
        dq, dk, dv = (x.transpose(0, 2, 1, 3) for x in (dq, dk, dv))
    else:
        dq, dk, dv = triton.backward(q, k, v, seg, o, lse, do, opts)
    return dq, dk, dv, None


_attend.defvjp(_attend_fwd, _attend_bwd)


def forward_with_lse(q, k, v, segment_ids=None, *, causal=True, sm_scale=None, block_sizes=None,
                     backend=None, interpret=None, sliding_window=None):
    """(out [B,T,H,D], lse [B,H,T] float32) from the chosen implementation; not differentiable.

    For tests and for research code that needs the log-normaliser (e.g. to merge attention
    over chunks). Sequence lengths must be multiples of the blocks here."""
    backend, opts = _prepare(q, k, v, segment_ids, causal, sm_scale, block_sizes, backend,
                             interpret, sliding_window)
    if backend == "reference":
        return reference.attention(q, k, v, segment_ids, causal=causal, sm_scale=opts.sm_scale,
                                   sliding_window=sliding_window)
    if q.shape[1] % math.lcm(opts.blocks.block_q, opts.blocks.block_kv):
        raise AttentionShapeError(f"sequence length {q.shape[1]} is not a multiple of the "
                                  f"blocks {opts.blocks}")
    seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    o, res = _forward(q, k, v, seg, backend, opts)
    lse = res[-1]
    return o, lse[:, :, 0, :] if backend == "tpu" else lse


def flash_attention_sharded(q, k, v, segment_ids, mesh, *, rules, **kwargs):
    """flash_attention inside shard_map: batch over the rules' act_batch axes, heads over
    act_heads (Pallas kernels cannot be partitioned by XLA). Each device attends over whole
    sequences of its batch and head shard: when activations are split along the sequence
    (act_length), the heads are split over those axes too, so entering the kernel is an
    all-to-all from sequence to head shards and leaving it one back (as DeepSpeed-Ulysses),
    and no device repeats another's work; when the heads do not divide, the sequence is
    gathered."""
    if mesh is not None and kwargs.get("backend") is None:
        # The mesh's devices decide, not the host: an AOT compile for a TPU topology on a CPU
        # host must trace the TPU kernel.
        kwargs["backend"] = _PLATFORM_BACKEND.get(mesh.devices.flat[0].platform)
    if mesh is None or mesh.size == 1:
        return flash_attention(q, k, v, segment_ids, **kwargs)
    from jaxllm.sharding import logical_to_spec, spec_axes as _axes

    b, t, h, _ = q.shape
    batch = logical_to_spec(("act_batch",), rules, mesh, (b,))[0]
    heads = _axes(logical_to_spec(("act_heads",), rules, mesh, (h,))[0])
    length = _axes(logical_to_spec(("act_length",), rules, mesh, (t,))[0])
    length = tuple(a for a in length if a not in heads + _axes(batch) and mesh.shape[a] > 1)
    if length and h % math.prod(mesh.shape[a] for a in heads + length) == 0:
        heads += length
    kvh = k.shape[2]
    head_shards = math.prod(mesh.shape[a] for a in heads)
    if kvh % head_shards:  # e.g. MQA on 4-way tensor parallelism: give each shard its kv heads
        k, v = (jnp.repeat(x, h // kvh, axis=2) for x in (k, v))
    x_spec = P(batch, None, heads or None, None)
    seg_spec = P(batch, None)
    if segment_ids is None:
        segment_ids = jnp.zeros(q.shape[:2], jnp.int32)
    fn = functools.partial(flash_attention, **kwargs)
    return jax.shard_map(fn, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, seg_spec),
                         out_specs=x_spec, check_vma=False)(q, k, v, segment_ids)


# ----------------------------------------------------------------------------- checks

def _prepare(q, k, v, segment_ids, causal, sm_scale, block_sizes, backend, interpret,
             sliding_window) -> tuple[str, Options]:
    """Validate everything up front; the backend and the static options of the call."""
    _check_shapes(q, k, v, segment_ids, causal)
    d = q.shape[-1]
    sm_scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    backend = _pick_backend(backend, interpret)
    if sliding_window is not None and sliding_window < 1:
        raise AttentionShapeError(f"sliding_window must be >= 1, got {sliding_window}")
    blocks = None if backend == "reference" else _blocks(backend, block_sizes, q.shape[1], d)
    return backend, Options(causal=causal, sm_scale=sm_scale, sliding_window=sliding_window,
                            blocks=blocks, interpret=_interpret_arg(backend, interpret))


_PLATFORM_BACKEND = {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}


def _pick_backend(backend, interpret):
    if backend is None:
        backend = _PLATFORM_BACKEND.get(jax.default_backend())
        if backend is None:  # CPU: the jnp reference, or a kernel interpreted when asked
            backend = "tpu" if interpret else "reference"
    if backend not in BACKENDS:
        raise AttentionShapeError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def _interpret_arg(backend, interpret):
    if not interpret:
        return False
    if backend == "tpu":
        from jax.experimental.pallas import tpu as pltpu
        return interpret if isinstance(interpret, pltpu.InterpretParams) else pltpu.InterpretParams()
    return True


def _check_shapes(q, k, v, segment_ids, causal):
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise AttentionShapeError(
            f"q, k, v must be [batch, seq, heads, head_dim]; got {q.shape}, {k.shape}, {v.shape}")
    if k.shape != v.shape:
        raise AttentionShapeError(f"k {k.shape} and v {v.shape} must have the same shape")
    b, t, h, d = q.shape
    if k.shape[0] != b or k.shape[3] != d:
        raise AttentionShapeError(f"q {q.shape} and k {k.shape} differ in batch or head_dim")
    if h % k.shape[2]:
        raise AttentionShapeError(f"kv heads ({k.shape[2]}) must divide query heads ({h})")
    if (causal or segment_ids is not None) and k.shape[1] != t:
        raise AttentionShapeError(
            f"causal or segmented attention needs equal query and key lengths; got {t} and "
            f"{k.shape[1]} (use the reference attention over a KV cache for decoding)")
    if segment_ids is not None and segment_ids.shape != (b, t):
        raise AttentionShapeError(f"segment_ids must be [batch, seq] = {(b, t)}, got "
                                  f"{segment_ids.shape}")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionShapeError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")


def _blocks(backend, block_sizes, t, d) -> BlockSizes:
    """The block sizes to use: given ones validated, defaults shrunk to short sequences."""
    low = MIN_BLOCK[backend]
    if block_sizes is None:
        fit = max(low, 1 << max(0, (t - 1).bit_length()))  # next power of two >= t
        default = DEFAULT_BLOCKS[backend]
        block_sizes = BlockSizes(min(default.block_q, fit), min(default.block_kv, fit))
    elif isinstance(block_sizes, (tuple, list)):
        block_sizes = BlockSizes(*block_sizes)
    for name in ("block_q", "block_kv"):
        n = getattr(block_sizes, name)
        if backend == "tpu" and n % low:
            raise AttentionShapeError(f"{name}={n}: TPU blocks must be multiples of {low} "
                                      "(the lane width; segment ids and lse are stored as rows)")
        if backend == "gpu" and (n < low or n & (n - 1)):
            raise AttentionShapeError(f"{name}={n}: Triton blocks must be powers of two >= {low}")
    if backend == "gpu" and (d < 16 or d & (d - 1)):
        raise AttentionShapeError(f"head_dim={d}: the Triton kernel needs a power of two >= 16")
    if backend == "tpu" and d % 64:
        raise AttentionShapeError(f"head_dim={d}: the TPU kernel needs a multiple of 64")
    return block_sizes
