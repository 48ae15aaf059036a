"""Flash attention for GPUs through Pallas' Triton lowering: forward, dQ and dK/dV kernels.

The Triton backend of Pallas is deprecated from jax 0.11; it is kept to this one module so a
Mosaic GPU version can replace it. Layout is the public one, [B, seq, heads, head_dim]: a
program owns one (batch, head, block) and loops over the other sequence in blocks, skipping
(neither loading nor computing) the blocks that its mask hides entirely. Grouped-query heads
read their kv head through the index map; dK/dV come out per query head and are summed over
each group afterwards."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from .common import MASK_VALUE, Options, block_mask, kv_block_range, q_block_range

NT = (((1,), (1,)), ((), ()))  # a @ b.T


def _params():
    return plgpu.CompilerParams(num_warps=4, num_stages=2)


def _fwd_kernel(q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, *, opts: Options, nk: int):
    bq, bk = opts.blocks.block_q, opts.blocks.block_kv
    i = pl.program_id(2)
    q = q_ref[...]
    q_seg = None if qs_ref is None else qs_ref[...][:, None]

    def body(j, carry):
        acc, m_prev, l_prev = carry
        kv_slice = pl.ds(j * bk, bk)
        s = jax.lax.dot_general(q, k_ref[kv_slice, :], NT, preferred_element_type=jnp.float32)
        s = s * opts.sm_scale
        k_seg = None if ks_ref is None else ks_ref[kv_slice][None, :]
        mask = block_mask(i * bq, j * bk, (bq, bk), opts, q_seg, k_seg)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        alpha = jnp.exp(m_prev - m_new)
        v = v_ref[kv_slice, :]
        acc = alpha * acc + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return acc, m_new, alpha * l_prev + jnp.sum(p, axis=1, keepdims=True)

    first, last = kv_block_range(i, opts, nk)
    init = (jnp.zeros(q.shape, jnp.float32), jnp.full((bq, 1), MASK_VALUE, jnp.float32),
            jnp.zeros((bq, 1), jnp.float32))
    acc, m, l = jax.lax.fori_loop(first, last + 1, body, init)
    o_ref[...] = (acc / jnp.where(l == 0, 1.0, l)).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(l == 0, -jnp.inf, m + jnp.log(l))[:, 0]


def _wrap(kernel, segmented: bool, n_in: int):
    """Adapt a kernel taking (inputs..., qs_ref, ks_ref, outputs...) to optional segment refs."""
    if segmented:
        return kernel

    def no_segments(*refs):
        return kernel(*refs[:n_in], None, None, *refs[n_in:])
    return no_segments


def forward(q, k, v, seg, opts: Options):
    """q [B,T,H,D], k/v [B,S,KV,D], seg [B,T] int32 or None -> (o [B,T,H,D], lse [B,H,T])."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    bq = opts.blocks.block_q
    nq, nk = t // bq, s // opts.blocks.block_kv
    q_spec = pl.BlockSpec((None, bq, None, d), lambda b_, h_, i: (b_, i, h_, 0))
    kv_spec = pl.BlockSpec((None, s, None, d), lambda b_, h_, i: (b_, 0, h_ // g, 0))
    seg_specs = [pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i)),
                 pl.BlockSpec((None, s), lambda b_, h_, i: (b_, 0))] if seg is not None else []
    return pl.pallas_call(
        _wrap(functools.partial(_fwd_kernel, opts=opts, nk=nk), seg is not None, 3),
        grid=(b, h, nq),
        in_specs=[q_spec, kv_spec, kv_spec] + seg_specs,
        out_specs=[q_spec, pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i))],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        compiler_params=_params(),
        interpret=opts.interpret,
        name="flash_attention_fwd",
    )(q, k, v, *((seg, seg) if seg is not None else ()))


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qs_ref, ks_ref, dq_ref, *,
               opts: Options, nk: int):
    bq, bk = opts.blocks.block_q, opts.blocks.block_kv
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], di_ref[...][:, None]
    q_seg = None if qs_ref is None else qs_ref[...][:, None]

    def body(j, dq):
        kv_slice = pl.ds(j * bk, bk)
        k = k_ref[kv_slice, :]
        s = jax.lax.dot_general(q, k, NT, preferred_element_type=jnp.float32)
        p = jnp.exp(s * opts.sm_scale - lse)
        k_seg = None if ks_ref is None else ks_ref[kv_slice][None, :]
        mask = block_mask(i * bq, j * bk, (bq, bk), opts, q_seg, k_seg)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = jax.lax.dot_general(do, v_ref[kv_slice, :], NT, preferred_element_type=jnp.float32)
        ds = p * (dp - delta)
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    first, last = kv_block_range(i, opts, nk)
    dq = jax.lax.fori_loop(first, last + 1, body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (dq * opts.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, di_ref, qs_ref, ks_ref, dk_ref, dv_ref, *,
                opts: Options, nq: int):
    """One kv block of one query head; tiles are kv-major, [bk, bq]."""
    bq, bk = opts.blocks.block_q, opts.blocks.block_kv
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    k_seg = None if ks_ref is None else ks_ref[...][:, None]

    def body(i, carry):
        dk, dv = carry
        q_slice = pl.ds(i * bq, bq)
        q, do = q_ref[q_slice, :], do_ref[q_slice, :]
        s_t = jax.lax.dot_general(k, q, NT, preferred_element_type=jnp.float32)
        p_t = jnp.exp(s_t * opts.sm_scale - lse_ref[q_slice][None, :])
        q_seg = None if qs_ref is None else qs_ref[q_slice][None, :]
        mask = block_mask(i * bq, j * bk, (bk, bq), opts, q_seg, k_seg, kv_major=True)
        if mask is not None:
            p_t = jnp.where(mask, p_t, 0.0)
        dv = dv + jnp.dot(p_t.astype(do.dtype), do, preferred_element_type=jnp.float32)
        dp_t = jax.lax.dot_general(v, do, NT, preferred_element_type=jnp.float32)
        ds_t = p_t * (dp_t - di_ref[q_slice][None, :])
        return dk + jnp.dot(ds_t.astype(q.dtype), q, preferred_element_type=jnp.float32), dv

    first, last = q_block_range(j, opts, nq)
    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = jax.lax.fori_loop(first, last + 1, body, (zeros, zeros))
    dk_ref[...] = (dk * opts.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(q, k, v, seg, o, lse, do, opts: Options):
    """Gradients (dq, dk, dv) in the layouts of q, k, v."""
    b, t, h, d = q.shape
    s, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    bq, bk = opts.blocks.block_q, opts.blocks.block_kv
    nq, nk = t // bq, s // bk
    segmented = seg is not None
    seg_args = (seg, seg) if segmented else ()
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))

    q_blk = pl.BlockSpec((None, bq, None, d), lambda b_, h_, i: (b_, i, h_, 0))
    kv_all = pl.BlockSpec((None, s, None, d), lambda b_, h_, i: (b_, 0, h_ // g, 0))
    row_blk = pl.BlockSpec((None, None, bq), lambda b_, h_, i: (b_, h_, i))
    segs = [pl.BlockSpec((None, bq), lambda b_, h_, i: (b_, i)),
            pl.BlockSpec((None, s), lambda b_, h_, i: (b_, 0))] if segmented else []
    dq = pl.pallas_call(
        _wrap(functools.partial(_dq_kernel, opts=opts, nk=nk), segmented, 6),
        grid=(b, h, nq),
        in_specs=[q_blk, kv_all, kv_all, q_blk, row_blk, row_blk] + segs,
        out_specs=q_blk,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=_params(),
        interpret=opts.interpret,
        name="flash_attention_dq",
    )(q, k, v, do, lse, delta, *seg_args)

    q_all = pl.BlockSpec((None, t, None, d), lambda b_, h_, j: (b_, 0, h_, 0))
    kv_blk = pl.BlockSpec((None, bk, None, d), lambda b_, h_, j: (b_, j, h_ // g, 0))
    row_all = pl.BlockSpec((None, None, t), lambda b_, h_, j: (b_, h_, 0))
    segs = [pl.BlockSpec((None, t), lambda b_, h_, j: (b_, 0)),
            pl.BlockSpec((None, bk), lambda b_, h_, j: (b_, j))] if segmented else []
    # Per query head; a group's heads are summed below (in fp32 when there is a group to sum).
    per_head = pl.BlockSpec((None, bk, None, d), lambda b_, h_, j: (b_, j, h_, 0))
    grad_dtype = k.dtype if g == 1 else jnp.float32
    dk, dv = pl.pallas_call(
        _wrap(functools.partial(_dkv_kernel, opts=opts, nq=nq), segmented, 6),
        grid=(b, h, nk),
        in_specs=[q_all, kv_blk, kv_blk, q_all, row_all, row_all] + segs,
        out_specs=[per_head, per_head],
        out_shape=[jax.ShapeDtypeStruct((b, s, h, d), grad_dtype)] * 2,
        compiler_params=_params(),
        interpret=opts.interpret,
        name="flash_attention_dkv",
    )(q, k, v, do, lse, delta, *seg_args)
    if g > 1:
        dk = dk.reshape(b, s, kvh, g, d).sum(3).astype(k.dtype)
        dv = dv.reshape(b, s, kvh, g, d).sum(3).astype(v.dtype)
    return dq, dk, dv
