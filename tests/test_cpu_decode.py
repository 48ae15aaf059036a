"""The fused CPU decode kernels (jaxllm.kernels.cpu_decode) against what they replace: the
packed product against a float64 product, a prefill on packed kernels and a fused decode step
(one kernel call per layer) against the Flax decoder's on the imported HF models (GQA with
Llama-3 RoPE scaling, qkv bias with tied embeddings, a sliding window) and on odd sizes, with
left-padded prompts; the packed weights live as long as their params."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import generate as sampler
from jaxllm import models, sharding
from jaxllm.config import MeshConfig, ShardingRules
from jaxllm.kernels import cpu_decode

pytest.importorskip("torch")
from test_model import HF_CASES, hf_model  # noqa: E402

step = jax.jit(models.decode_step, static_argnames=("cfg", "stats", "prefill"))
ODD = models.ModelConfig(vocab_size=53, hidden_size=48, intermediate_size=40, num_layers=2,
                         num_heads=6, num_kv_heads=2, head_dim=8, max_seq_len=64)
# Query groups of two over heads of 32 (the attention's two-head, 32-column path).
WIDE_HEADS = models.ModelConfig(vocab_size=61, hidden_size=64, intermediate_size=48,
                                num_layers=1, num_heads=4, num_kv_heads=2, head_dim=32,
                                max_seq_len=64)
# Batch 8 over 140 cache slots: enough work that every stage runs on the pool's threads.
THREADED = WIDE_HEADS.replace(vocab_size=2048, hidden_size=128, intermediate_size=256,
                              num_heads=8, num_kv_heads=4, max_seq_len=160)


def test_the_kernels_build_on_this_machine():
    """CI machines have a C++ compiler: a failed build fails here instead of leaving every
    sampling test on the XLA path."""
    assert cpu_decode.available()


@pytest.mark.parametrize("m,k,n,dtype", [(1, 64, 32, "float32"), (3, 37, 70, "float32"),
                                         (8, 256, 96, "float32"), (9, 16, 5, "float32"),
                                         (17, 40, 130, "float32"), (8, 48, 70, "bfloat16"),
                                         (11, 37, 33, "bfloat16")])
def test_packed_matmul_equals_a_float64_product(m, k, n, dtype):
    """bfloat16 kernels are widened exactly: the product is float32's of the same values."""
    rng = np.random.default_rng(m * k + n)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = jnp.asarray(rng.normal(size=(k, n)), dtype)
    packed = cpu_decode.pack(w)
    assert packed.dtype == w.dtype
    got = jax.jit(cpu_decode.matmul, static_argnums=2)(x, packed, n)
    np.testing.assert_allclose(got, x.astype(np.float64) @ np.asarray(w, np.float64), rtol=1e-5,
                               atol=1e-4)


@pytest.mark.parametrize("m,k,n", [(8, 256, 96), (3, 37, 70), (17, 40, 130), (1, 1, 5)])
def test_bfloat16_products_equal_a_float64_product_of_the_rounded_values(m, k, n):
    """A kernel packed for bfloat16 products (pairs of rows, odd K padded): x and w rounded to
    bfloat16, each product exact and summed in float32. Without the rounding of x the error
    would be ~1e-3, a hundred times the tolerance."""
    rng = np.random.default_rng(m * k + n)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = rng.normal(size=(k, n)).astype(np.float32)
    packed = cpu_decode.pack(jnp.asarray(w), bf16_products=True)
    assert packed.dtype == jnp.uint32 and packed.shape == (-(-n // 32), -(-k // 2), 32)
    got = jax.jit(cpu_decode.matmul, static_argnums=2)(x, packed, n)
    rounded = [np.asarray(jnp.asarray(a, jnp.bfloat16), np.float64) for a in (x, w)]
    np.testing.assert_allclose(got, rounded[0] @ rounded[1], rtol=1e-5, atol=1e-5)


def test_head_gives_logits_argmax_and_logsumexp():
    """The output projection after the final norm, and each row's first argmax (ties, a NaN
    row) and log-sum-exp, against numpy in float64; a vocabulary that is no multiple of 16."""
    rng = np.random.default_rng(0)
    x, scale = rng.normal(size=(5, 24)).astype(np.float32), rng.normal(size=24).astype(np.float32)
    w = rng.normal(size=(24, 101)).astype(np.float32)
    w[:, 7] = w[:, 90]  # rows' logits tie at 7 and 90 wherever 90 is their maximum
    x[3] = 0.0  # a zero row: every logit 0 after the norm, so argmax 0
    x[4, 2] = np.nan
    logits, argmax, lse = jax.jit(cpu_decode.head, static_argnums=3, static_argnames="eps")(
        x, scale, cpu_decode.pack(w), 101, eps=1e-6)
    h = x.astype(np.float64)
    want = h / np.sqrt((h**2).mean(-1, keepdims=True) + 1e-6) * scale @ w
    np.testing.assert_allclose(logits[:4], want[:4], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(argmax[:4], np.argmax(want[:4], -1))
    np.testing.assert_allclose(lse[:4], np.log(np.exp(want[:4]).sum(-1)), rtol=1e-6)
    assert int(argmax[4]) == 100 and np.isnan(lse[4])


def test_a_mismatched_operand_is_refused_by_name():
    x, w = jnp.ones((2, 8)), cpu_decode.pack(jnp.ones((8, 40)))
    with pytest.raises(Exception, match="cpu_decode.matmul"):
        jax.block_until_ready(cpu_decode.matmul(x, w, 70))  # 40 columns packed, 70 asked
    with pytest.raises(Exception, match="cpu_decode.head"):  # a norm scale of 7 for 8 features
        jax.block_until_ready(cpu_decode.head(x, jnp.ones(7), w, 40, eps=1e-5))


BF16_MODELS = ("bfloat16-model", "bfloat16-model-wide-heads")


@pytest.mark.parametrize("case", [*HF_CASES, "odd-sizes", "bfloat16-weights", "wide-heads",
                                  "threaded", *BF16_MODELS])
def test_fused_decode_steps_equal_the_flax_decoder(case):
    """bfloat16 weights with float32 activations: the Flax layers widen them, the kernels read
    them as bfloat16 (half the bytes) and widen them as they load; the same float32 math.
    Enough steps that the attention's blocks of 16 keys run and the sliding window slides;
    "threaded" is big enough that every stage shares its work out to the pool's threads.
    A bfloat16 model (compute_dtype) gets bfloat16 products and a bfloat16 KV cache; the
    kernels keep the rest of a step in float32, so they agree with its Flax layers to
    bfloat16's precision, not float32's (checked in `close`)."""
    bf16_model = case in BF16_MODELS
    if case in ("odd-sizes", "bfloat16-weights", "wide-heads", "threaded", *BF16_MODELS):
        cfg = {"wide-heads": WIDE_HEADS, "threaded": THREADED,
               "bfloat16-model-wide-heads": WIDE_HEADS}.get(case, ODD)
        params = models.init(cfg, jax.random.key(0))
        if case in ("bfloat16-weights", *BF16_MODELS):
            cfg = cfg.replace(param_dtype="bfloat16")
            params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
        if bf16_model:
            cfg = cfg.replace(compute_dtype="bfloat16")
    else:
        _, cfg, params = hf_model(case)
        params = jax.tree.map(jnp.asarray, params)
    layers = models.unstack_layers(params)
    fused = models.fused_decode_weights(params, layers, cfg)
    assert fused is not None
    assert fused["head"].dtype == (jnp.uint32 if bf16_model else jnp.dtype(cfg.param_dtype))

    def close(got, want, tol=1e-5):
        """Equal to float32's precision; for a bfloat16 model within 3% of the values' spread
        (its Flax layers round every activation to bfloat16: measured 1-1.5%)."""
        got, want = (np.asarray(jnp.asarray(a, jnp.float32)) for a in (got, want))
        if bf16_model:
            assert np.abs(got - want).max() <= 0.03 * want.std(), np.abs(got - want).max()
        else:
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol)
    lengths, steps = ((137,) * 7 + (120,), 3) if case == "threaded" else ((5, 9, 3), 10)
    width = max(lengths)
    tokens, seg, pos = sampler.pad_prompts(
        [np.random.default_rng(i).integers(1, cfg.vocab_size, n).tolist()
         for i, n in enumerate(lengths)])
    empty = models.cache_per_layer(models.init_cache(cfg, len(lengths), width + steps))
    logits, cache = step(params, layers, tokens, cfg, positions=pos, segment_ids=seg, cache=empty)
    # generate's prefill, through the Flax layers reading the packed kernels and attending over
    # its own keys only, is the same.
    packed, packed_cache = step(params, fused["layers"], tokens, cfg, positions=pos,
                                segment_ids=seg, cache=empty, prefill=True)
    close(packed, logits)
    for name in ("k", "v"):
        close(np.stack(packed_cache[name]), np.stack(cache[name]))
    ours, ref = cache, cache
    for i in range(steps):
        tok = jnp.argmax(logits, -1)[:, None]
        at = dict(positions=jnp.asarray(pos[:, -1:] + 1 + i), segment_ids=jnp.ones_like(tok))
        logits, ref = step(params, layers, tok, cfg, cache=ref, **at)
        got, (argmax, lse), ours = step(params, layers, tok, cfg, cache=ours, fused=fused,
                                        stats=True, **at)
        close(got, logits)
        assert got.dtype == jnp.float32 and ours["k"][0].dtype == cache["k"][0].dtype
        np.testing.assert_array_equal(argmax, jnp.argmax(got if bf16_model else logits, -1))
        np.testing.assert_allclose(lse, jax.nn.logsumexp(got, -1), rtol=1e-5)
    for name in ("k", "v"):
        close(np.stack(ours[name]), np.stack(ref[name]))
    assert int(ours["index"]) == width + steps


def test_generate_samples_the_same_with_and_without_the_kernels(monkeypatch):
    cfg = ODD
    params = models.init(cfg, jax.random.key(0))
    prompts = [[5, 7, 9], [3] * 8, [11, 2]]
    kw = dict(max_new_tokens=6, temperature=0.8, top_k=5, key=jax.random.key(3))
    fast = sampler.generate(params, cfg, prompts, **kw)
    monkeypatch.setattr(sampler, "_fused_for", lambda params, cfg: None)
    plain = sampler.generate(params, cfg, prompts, **kw)
    np.testing.assert_array_equal(fast["tokens"], plain["tokens"])
    np.testing.assert_allclose(fast["logprobs"], plain["logprobs"], atol=1e-5)


def test_a_bfloat16_model_samples_through_the_kernels(monkeypatch):
    """generate() on a bfloat16 model: its cache stays bfloat16 through the fused steps. The
    first token comes from the prefill (float32 activations into bfloat16 products with the
    kernels, bfloat16 activations without: within bfloat16's rounding); later ones may part
    where the two round near-equal logits differently."""
    cfg = ODD.replace(param_dtype="bfloat16", compute_dtype="bfloat16")
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), models.init(ODD, jax.random.key(0)))
    prompts = [[5, 7, 9], [3] * 8, [11, 2]]
    fast = sampler.generate(params, cfg, prompts, max_new_tokens=6)
    assert sampler._FUSED and sampler._FUSED[0][2]["head"].dtype == jnp.uint32
    monkeypatch.setattr(sampler, "_fused_for", lambda params, cfg: None)
    plain = sampler.generate(params, cfg, prompts, max_new_tokens=6)
    np.testing.assert_array_equal(fast["tokens"][:, 0], plain["tokens"][:, 0])
    np.testing.assert_allclose(fast["logprobs"][:, 0], plain["logprobs"][:, 0], atol=2e-2)
    assert fast["tokens"].shape == (3, 6) and (fast["lengths"] == 6).all()
    assert ((0 <= fast["tokens"]) & (fast["tokens"] < cfg.vocab_size)).all()


def test_the_kernels_step_aside_where_they_do_not_apply():
    """int8 or LoRA-adapted projections and a mesh keep the XLA path."""
    from jaxllm import lora
    from jaxllm.config import LoraConfig
    cfg = ODD
    params = models.init(cfg, jax.random.key(0))
    lcfg = LoraConfig(rank=2, alpha=4.0, targets=("o_proj",))
    int8 = lora.attach(lora.quantize(params, "int8"), {}, lcfg)
    adapted = lora.attach(params, lora.init(lora.abstract(params, lcfg), jax.random.key(1)), lcfg)
    for p in (int8, adapted):
        assert models.fused_decode_weights(p, models.unstack_layers(p), cfg) is None
    mesh = sharding.make_mesh(sharding.with_sizes(MeshConfig(), data=8))
    with sharding.use(mesh, ShardingRules()):
        assert models.fused_decode_weights(params, models.unstack_layers(params), cfg) is None
    # A second generate() with the same params reuses their packed weights.
    sampler.generate(params, cfg, [[1, 2]], max_new_tokens=2)
    first = sampler._FUSED[0][2]
    sampler.generate(params, cfg, [[3, 4]], max_new_tokens=2)
    assert sampler._FUSED[0][2] is first


def test_packed_weights_are_freed_with_their_params():
    import gc
    params = models.init(ODD, jax.random.key(5))
    sampler.generate(params, ODD, [[1, 2]], max_new_tokens=2)
    assert sampler._FUSED and sampler._FUSED[0][2] is not None
    del params
    gc.collect()
    assert not sampler._FUSED
