"""Pallas flash attention against the jnp reference: forward, lse and gradients, both kernels
in interpret mode on CPU (TPU kernels inside the TPU interpret mode), and its model wiring."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from jaxllm.kernels.flash_attention import (AttentionShapeError, BlockSizes, flash_attention,
                                            forward_with_lse, reference_attention)


@dataclasses.dataclass(frozen=True)
class Case:
    t: int = 256
    heads: int = 4
    kv_heads: int = 4
    head_dim: int = 64
    batch: int = 2
    causal: bool = True
    segmented: bool = True
    window: int | None = None
    blocks: dict = dataclasses.field(default_factory=lambda: {"tpu": (128, 128), "gpu": (32, 32)})
    dtype: str = "float32"


# Small grids: the TPU interpreter costs ~0.1 s per grid step on this CPU.
CASES = {
    "causal-mha-segments-batch2": Case(heads=1, kv_heads=1),
    "noncausal-gqa2-segments": Case(causal=False, heads=2, kv_heads=1, batch=1),
    "gqa4-blockq-ne-blockkv": Case(heads=4, kv_heads=1, batch=1,
                                   blocks={"tpu": (256, 128), "gpu": (64, 32)}),
    "mqa-d128-kv-block-larger": Case(heads=2, kv_heads=1, head_dim=128, segmented=False, batch=1,
                                     blocks={"tpu": (128, 256), "gpu": (16, 64)}),
    "sliding-window": Case(window=100, heads=2, kv_heads=1, batch=1),
    "bf16-gqa2": Case(heads=2, kv_heads=1, dtype="bfloat16", batch=1),
    "ragged-length-padded": Case(t=200, causal=False, heads=2, kv_heads=1, batch=1),
}
TOL = {"float32": 2e-5, "bfloat16": 2e-2}


def make_inputs(c: Case, seed=0):
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    dt = jnp.dtype(c.dtype)
    q = jax.random.normal(kq, (c.batch, c.t, c.heads, c.head_dim), dt)
    k = jax.random.normal(kk, (c.batch, c.t, c.kv_heads, c.head_dim), dt)
    v = jax.random.normal(kv, (c.batch, c.t, c.kv_heads, c.head_dim), dt)
    seg = None
    if c.segmented:  # boundaries off the block grid, different per row
        bounds = np.array([[37, 170], [90, 91]])[: c.batch]
        idx = np.arange(c.t)
        seg = jnp.asarray(sum((idx[None] >= b[:, None]) for b in bounds.T).astype(np.int32))
    ct = jax.random.normal(kc, q.shape, dt)
    return q, k, v, seg, ct


def close(a, b, tol):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    assert np.isfinite(a).all(), "NaN or inf in kernel output"
    scale = max(1.0, float(np.abs(b).max()))
    np.testing.assert_allclose(a, b, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("backend", ["tpu", "gpu"])
@pytest.mark.parametrize("name", list(CASES))
def test_kernel_matches_reference(name, backend):
    c = CASES[name]
    q, k, v, seg, ct = make_inputs(c)
    kw = dict(causal=c.causal, sliding_window=c.window)
    blocks = BlockSizes(*c.blocks[backend])
    tol = TOL[c.dtype]
    if c.t % max(blocks.block_q, blocks.block_kv) == 0:  # lse is exposed for unpadded lengths
        out, lse = forward_with_lse(q, k, v, seg, block_sizes=blocks, backend=backend,
                                    interpret=True, **kw)
        ref_out, ref_lse = reference_attention(q, k, v, seg, **kw)
        close(out, ref_out, tol)
        close(lse, ref_lse, tol)

    def flash(q, k, v):
        return flash_attention(q, k, v, seg, block_sizes=blocks, backend=backend, interpret=True,
                               **kw)

    def ref(q, k, v):
        return reference_attention(q, k, v, seg, **kw)[0]

    out, vjp = jax.vjp(flash, q, k, v)
    ref_out, ref_vjp = jax.vjp(ref, q, k, v)
    close(out, ref_out, tol)
    for name_, g, rg in zip("qkv", vjp(ct), ref_vjp(ct)):
        assert g.shape == rg.shape and g.dtype == rg.dtype, name_
        close(g, rg, tol * 4)  # gradients sum over a sequence: allow a little more


def test_tpu_kernel_has_no_races_or_out_of_bounds_reads():
    """Uninitialised scratch or a cross-iteration race would fail here, not only mis-compare."""
    from jax._src.pallas.mosaic.interpret import interpret_pallas_call as ipc

    c = Case(heads=2, kv_heads=1, t=256, batch=1)
    q, k, v, seg, ct = make_inputs(c)
    strict = pltpu.InterpretParams(out_of_bounds_reads="raise", detect_races=True,
                                   uninitialized_memory="nan")
    f = lambda q, k, v: flash_attention(q, k, v, seg, block_sizes=(128, 128), backend="tpu",
                                        interpret=strict)
    out, vjp = jax.vjp(f, q, k, v)
    grads = vjp(ct)
    jax.block_until_ready(grads)
    assert not ipc.races.races_found
    ref_out, ref_vjp = jax.vjp(lambda q, k, v: reference_attention(q, k, v, seg)[0], q, k, v)
    close(out, ref_out, 2e-5)
    for g, rg in zip(grads, ref_vjp(ct)):
        close(g, rg, 1e-4)


def test_cpu_dispatch_uses_the_reference_unless_interpret_is_asked():
    c = Case(t=128, batch=1, heads=2, kv_heads=1)
    q, k, v, seg, _ = make_inputs(c)
    plain = str(jax.make_jaxpr(lambda q: flash_attention(q, k, v, seg))(q))
    kernel = str(jax.make_jaxpr(lambda q: flash_attention(q, k, v, seg, interpret=True))(q))
    assert "pallas_call" not in plain and "pallas_call" in kernel


@pytest.mark.parametrize("kwargs, shapes, message", [
    ({}, ((1, 128, 6, 64), (1, 128, 4, 64)), "kv heads (4) must divide query heads (6)"),
    ({"backend": "tpu", "block_sizes": (100, 128)}, None, "block_q=100: TPU blocks must be multiples of 128"),
    ({"backend": "gpu", "block_sizes": (32, 48)}, None, "block_kv=48: Triton blocks must be powers of two"),
    ({"backend": "tpu"}, ((1, 128, 2, 96), (1, 128, 2, 96)), "head_dim=96"),
    ({"backend": "cuda"}, None, "backend must be one of"),
    ({}, ((1, 128, 2, 64), (1, 64, 2, 64)), "equal query and key lengths"),
])
def test_bad_arguments_are_refused_up_front(kwargs, shapes, message):
    qs, ks = shapes or ((1, 128, 2, 64), (1, 128, 2, 64))
    q, k = jnp.zeros(qs), jnp.zeros(ks)
    with pytest.raises(AttentionShapeError) as e:
        flash_attention(q, k, k, interpret=True, **kwargs)
    assert message in str(e.value)


@pytest.mark.parametrize("mesh_sizes", [dict(data=2, fsdp=2, tensor=2), dict(fsdp=4, tensor=2),
                                        dict(fsdp=4, sequence=2)])
def test_model_with_flash_attention_matches_reference_on_a_mesh(mesh_sizes):
    """attention_impl=flash: the TPU kernel (interpreted) inside shard_map, heads over tensor
    (one kv head on 2-way tensor parallelism: repeated per shard) or, with the sequence split,
    over the sequence axis (all-to-all in and out), packed segments, a length the kernel pads;
    logits and parameter gradients equal the reference model's."""
    from jaxllm import config, models, sharding

    exp = config.load(None, ["model.vocab_size=128", "model.hidden_size=128",
                             "model.intermediate_size=128", "model.num_layers=1",
                             "model.num_heads=2", "model.num_kv_heads=1", "model.max_seq_len=64",
                             "data.seq_len=48"])
    ref_cfg = exp.model
    flash_cfg = dataclasses.replace(ref_cfg, attention_impl="flash", flash_interpret=True)
    mesh = sharding.make_mesh(sharding.with_sizes(exp.mesh, **mesh_sizes))
    params = models.init(ref_cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, 128, (4, 48)), jnp.int32)
    seg = jnp.asarray(np.where(np.arange(48) < 29, 1, 2)[None].repeat(4, 0), jnp.int32)
    pos = models.positions_from_segments(seg)
    weights = jax.random.normal(jax.random.key(1), (4, 48, 128))

    def loss(params, cfg):
        logits, _ = models.forward(params, tokens, cfg, positions=pos, segment_ids=seg)
        return jnp.sum(logits * weights), logits

    with sharding.use(mesh, exp.mesh.rules):
        results = {name: jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)(
            params, cfg) for name, cfg in (("ref", ref_cfg), ("flash", flash_cfg))}
    (_, ref_logits), ref_grads = results["ref"]
    (_, logits), grads = results["flash"]
    close(logits, ref_logits, 2e-5)
    jax.tree.map(lambda g, r: close(g, r, 1e-4), grads, ref_grads)


@pytest.mark.tpu_aot
def test_tpu_kernel_lowers_with_mosaic_and_needs_less_memory_than_xla():
    """Real Mosaic lowering (interpret mode checks none of its rules): fwd+bwd compiled for a
    v5e 2x2 slice at a realistic shape; the per-chip plan is printed beside XLA attention's."""
    pytest.importorskip("libtpu", reason="libtpu not installed (pip install -e '.[tpu]')")
    from jaxllm.kernels.flash_attention.aot import compile_attention_grad

    shape = dict(batch=8, heads=16, kv_heads=4, seq=2048, head_dim=128)
    mem = {impl: compile_attention_grad(impl, "v5e:2x2", **shape).memory_analysis()
           for impl in ("flash", "xla")}
    for impl, m in mem.items():
        print(f"{impl}: arguments {m.argument_size_in_bytes / 2**20:.1f} MiB, "
              f"temporaries {m.temp_size_in_bytes / 2**20:.1f} MiB per chip")
    assert mem["flash"].argument_size_in_bytes == mem["xla"].argument_size_in_bytes
    # XLA materialises [heads, seq, seq] scores per chip; the kernel keeps tiles in VMEM.
    assert mem["xla"].temp_size_in_bytes > 16 * 2048 * 2048 * 2
    assert mem["flash"].temp_size_in_bytes < mem["xla"].temp_size_in_bytes / 10


def test_gpu_kernels_lower_through_triton_for_cuda():
    """The Triton lowering runs at trace time on any host: forward, dQ and dK/dV kernels all
    become Triton calls for a CUDA target (PTX compilation itself needs a GPU)."""
    def loss(q, k, v, seg):
        return jnp.sum(jnp.square(flash_attention(q, k, v, seg, backend="gpu").astype(jnp.float32)))

    shapes = [(2, 1024, 8, 128), (2, 1024, 2, 128), (2, 1024, 2, 128)]
    args = [jax.ShapeDtypeStruct(s, jnp.bfloat16) for s in shapes]
    args.append(jax.ShapeDtypeStruct((2, 1024), jnp.int32))
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(
        lowering_platforms=("cuda",))
    assert lowered.as_text().count("custom_call @__gpu$xla.gpu.triton") == 3
