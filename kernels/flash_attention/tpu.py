"""Flash attention for TPU (Pallas/Mosaic): forward, dK/dV and dQ kernels.

Layout inside: [B, heads, seq, head_dim], so every tile's two minor dims are (seq, head_dim)
and respect Mosaic's (8, 128) tiling. Per-row statistics (lse, delta, segment ids) travel as
rows [.., 1, seq]: a [.., seq, 1] column would be padded 128-fold in HBM. The kv grid axis is
the innermost, "arbitrary" one; blocks a query block cannot see are neither computed (pl.when)
nor fetched (the index map repeats the last visible block, and Pallas skips a repeated fetch).
Grouped-query heads index their kv head in the index map: k and v are never repeated."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from .common import MASK_VALUE, Options, block_mask, kv_block_range, q_block_range

LANES = 128
NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _column(row_ref):
    """A [1, n] row block as an [n, 1] column."""
    return jnp.expand_dims(row_ref[0], -1)


def _fwd_kernel(*refs, opts: Options, nk: int, segmented: bool):
    if segmented:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_sc, l_sc, acc_sc = refs
    bq, bk = opts.blocks.block_q, opts.blocks.block_kv
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, MASK_VALUE, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    first, last = kv_block_range(i, opts, nk)

    @pl.when((j >= first) & (j <= last))
    def _body():
        s = jax.lax.dot_general(q_ref[...], k_ref[...], NT, preferred_element_type=jnp.float32)
        s = s * opts.sm_scale
        segs = (_column(qs_ref), ks_ref[...]) if segmented else (None, None)
        mask = block_mask(i * bq, j * bk, (bq, bk), opts, *segs)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_sc[...][:, :1]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)  # rows with nothing visible yet stay exactly 0
        alpha = jnp.exp(m_prev - m_new)
        l_new = alpha * l_sc[...][:, :1] + jnp.sum(p, axis=1, keepdims=True)
        pv = jnp.dot(p.astype(v_ref.dtype), v_ref[...], preferred_element_type=jnp.float32)
        acc_sc[...] = alpha * acc_sc[...] + pv
        m_sc[...] = jnp.broadcast_to(m_new, m_sc.shape)
        l_sc[...] = jnp.broadcast_to(l_new, l_sc.shape)

    @pl.when(j == nk - 1)
    def _finish():
        l = l_sc[...]
        o_ref[...] = (acc_sc[...] / jnp.where(l[:, :1] == 0, 1.0, l[:, :1])).astype(o_ref.dtype)
        lse = jnp.where(l == 0, -jnp.inf, m_sc[...] + jnp.log(l))  # [bq, LANES], lanes equal
        lse_ref[...] = jnp.transpose(lse)[:1]


def _specs(opts: Options, nq: int, nk: int, heads_per_kv: int, d: int):
    """BlockSpecs for the q-major grid (b, h, i, j) with j innermost."""
    bq, bk = opts.blocks.block_q, opts.blocks.block_kv

    def kv_index(i, j):
        first, last = kv_block_range(i, opts, nk)
        return jnp.clip(j, first, last)

    q = pl.BlockSpec((None, None, bq, d), lambda b, h, i, j: (b, h, i, 0))
    kv = pl.BlockSpec((None, None, bk, d), lambda b, h, i, j: (b, h // heads_per_kv, kv_index(i, j), 0))
    q_row = pl.BlockSpec((None, None, 1, bq), lambda b, h, i, j: (b, h, 0, i))
    q_seg = pl.BlockSpec((None, 1, bq), lambda b, h, i, j: (b, 0, i))
    kv_seg = pl.BlockSpec((None, 1, bk), lambda b, h, i, j: (b, 0, kv_index(i, j)))
    return q, kv, q_row, q_seg, kv_seg


def _params():
    return pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary"))


def forward(q, k, v, seg, opts: Options):
    """q [B,H,T,D], k/v [B,KV,S,D], seg [B,1,T] int32 or None -> (o [B,H,T,D], lse [B,H,1,T])."""
    b, h, t, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    bq, bk = opts.blocks.block_q, opts.blocks.block_kv
    nq, nk = t // bq, s // bk
    q_spec, kv_spec, row_spec, qs_spec, ks_spec = _specs(opts, nq, nk, h // kvh, d)
    segmented = seg is not None
    kernel = functools.partial(_fwd_kernel, opts=opts, nk=nk, segmented=segmented)
    in_specs = [q_spec, kv_spec, kv_spec] + ([qs_spec, ks_spec] if segmented else [])
    args = (q, k, v) + ((seg, seg) if segmented else ())
    return pl.pallas_call(
        kernel,
        grid=(b, h, nq, nk),
        in_specs=in_specs,
        out_specs=[q_spec, row_spec],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, 1, t), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=_params(),
        interpret=opts.interpret,
        name="flash_attention_fwd",
    )(*args)


def _dq_kernel(*refs, opts: Options, nk: int, segmented: bool):
    if segmented:
        q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qs_ref, ks_ref, dq_ref, dq_sc = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dq_ref, dq_sc = refs
    bq, bk = opts.blocks.block_q, opts.blocks.block_kv
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        dq_sc[...] = jnp.zeros(dq_sc.shape, jnp.float32)

    first, last = kv_block_range(i, opts, nk)

    @pl.when((j >= first) & (j <= last))
    def _body():
        k = k_ref[...]
        s = jax.lax.dot_general(q_ref[...], k, NT, preferred_element_type=jnp.float32)
        p = jnp.exp(s * opts.sm_scale - _column(lse_ref))
        segs = (_column(qs_ref), ks_ref[...]) if segmented else (None, None)
        mask = block_mask(i * bq, j * bk, (bq, bk), opts, *segs)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = jax.lax.dot_general(do_ref[...], v_ref[...], NT, preferred_element_type=jnp.float32)
        ds = p * (dp - _column(di_ref))
        dq_sc[...] += jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    @pl.when(j == nk - 1)
    def _finish():
        dq_ref[...] = (dq_sc[...] * opts.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, opts: Options, nq: int, heads_per_kv: int, segmented: bool):
    """Grid (b, kv_head, j, t): t runs over the group's heads and the query blocks, so dK/dV of a
    kv head accumulate over its whole query group in VMEM. Tiles are kv-major ([bk, bq]), so
    lse, delta and the query segment ids are used as rows, as they are stored."""
    if segmented:
        q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qs_ref, ks_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, dk_ref, dv_ref, dk_sc, dv_sc = refs
    bq, bk = opts.blocks.block_q, opts.blocks.block_kv
    j, t = pl.program_id(2), pl.program_id(3)
    i = t % nq

    @pl.when(t == 0)
    def _init():
        dk_sc[...] = jnp.zeros(dk_sc.shape, jnp.float32)
        dv_sc[...] = jnp.zeros(dv_sc.shape, jnp.float32)

    first, last = q_block_range(j, opts, nq)

    @pl.when((i >= first) & (i <= last))
    def _body():
        q, do = q_ref[...], do_ref[...]
        s_t = jax.lax.dot_general(k_ref[...], q, NT, preferred_element_type=jnp.float32)
        p_t = jnp.exp(s_t * opts.sm_scale - lse_ref[...])  # [bk, bq]
        segs = (qs_ref[...], _column(ks_ref)) if segmented else (None, None)
        mask = block_mask(i * bq, j * bk, (bk, bq), opts, *segs, kv_major=True)
        if mask is not None:
            p_t = jnp.where(mask, p_t, 0.0)
        dv_sc[...] += jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp_t = jax.lax.dot_general(v_ref[...], do, NT, preferred_element_type=jnp.float32)
        ds_t = p_t * (dp_t - di_ref[...])
        dk_sc[...] += jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32)

    @pl.when(t == heads_per_kv * nq - 1)
    def _finish():
        dk_ref[...] = (dk_sc[...] * opts.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_sc[...].astype(dv_ref.dtype)


def backward(q, k, v, seg, o, lse, do, opts: Options):
    """Gradients (dq, dk, dv) in the layouts of q, k, v."""
    b, h, t, d = q.shape
    kvh, s = k.shape[1], k.shape[2]
    g = h // kvh
    bq, bk = opts.blocks.block_q, opts.blocks.block_kv
    nq, nk = t // bq, s // bk
    segmented = seg is not None
    delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)[:, :, None, :]

    q_spec, kv_spec, row_spec, qs_spec, ks_spec = _specs(opts, nq, nk, g, d)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, opts=opts, nk=nk, segmented=segmented),
        grid=(b, h, nq, nk),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
        + ([qs_spec, ks_spec] if segmented else []),
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, d), jnp.float32)],
        compiler_params=_params(),
        interpret=opts.interpret,
        name="flash_attention_dq",
    )(q, k, v, do, lse, delta, *((seg, seg) if segmented else ()))

    def q_index(j, t):
        first, last = q_block_range(j, opts, nq)
        return jnp.clip(t % nq, first, last)

    def head(kh, t):
        return kh * g + t // nq

    qd = pl.BlockSpec((None, None, bq, d), lambda b_, kh, j, t: (b_, head(kh, t), q_index(j, t), 0))
    row = pl.BlockSpec((None, None, 1, bq), lambda b_, kh, j, t: (b_, head(kh, t), 0, q_index(j, t)))
    kvd = pl.BlockSpec((None, None, bk, d), lambda b_, kh, j, t: (b_, kh, j, 0))
    qs = pl.BlockSpec((None, 1, bq), lambda b_, kh, j, t: (b_, 0, q_index(j, t)))
    ks = pl.BlockSpec((None, 1, bk), lambda b_, kh, j, t: (b_, 0, j))
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, opts=opts, nq=nq, heads_per_kv=g, segmented=segmented),
        grid=(b, kvh, nk, g * nq),
        in_specs=[qd, kvd, kvd, qd, row, row] + ([qs, ks] if segmented else []),
        out_specs=[kvd, kvd],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, d), jnp.float32), pltpu.VMEM((bk, d), jnp.float32)],
        compiler_params=_params(),
        interpret=opts.interpret,
        name="flash_attention_dkv",
    )(q, k, v, do, lse, delta, *((seg, seg) if segmented else ()))
    return dq, dk, dv
