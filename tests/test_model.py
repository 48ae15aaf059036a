"""The decoder against Hugging Face transformers on tiny random models, plus its own invariants:
KV-cache decode equals one forward, packed segments equal separate documents, presets count
their published parameters."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import models
from jaxllm.interop.hf_names import config_from_hf, params_from_hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

forward = jax.jit(models.forward, static_argnames="cfg")

TINY = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
            rms_norm_eps=1e-5)

HF_CASES = {
    "llama3-gqa-rope-scaling": ("LlamaConfig", "LlamaForCausalLM", dict(
        rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                           "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                           "original_max_position_embeddings": 32})),
    "qwen2-bias-tied": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True,
                                                                rope_theta=1e6)),
    "mistral-sliding-window": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=8)),
}


def hf_model(case):
    conf_cls, model_cls, extra = HF_CASES[case]
    torch.manual_seed(0)
    hf_cfg = getattr(transformers, conf_cls)(**TINY, **extra)
    if case.startswith("mistral"):
        hf_cfg._attn_implementation = "eager"  # sdpa ignores the window on some versions
    model = getattr(transformers, model_cls)(hf_cfg).eval()
    with torch.no_grad():  # norm weights start at 1: randomise so a mis-mapped one shows
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    cfg = config_from_hf(hf_cfg.to_dict())
    sd = {k: v.numpy() for k, v in model.state_dict().items()}
    return model, cfg, params_from_hf(sd.__getitem__, cfg)


@pytest.mark.parametrize("case", list(HF_CASES))
def test_logits_match_transformers(case):
    model, cfg, params = hf_model(case)
    tokens = np.random.default_rng(0).integers(0, TINY["vocab_size"], (2, 24))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    ours, _ = forward(params, jnp.asarray(tokens), cfg)
    np.testing.assert_allclose(np.asarray(ours), ref, rtol=1e-4, atol=1e-5)


def small_cfg(**kw):
    base = dict(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                num_kv_heads=2, max_seq_len=128)
    return models.ModelConfig(**(base | kw))


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 5}, {"scan_layers": False},
                                {"num_kv_heads": 1}])
def test_kv_cache_decode_equals_forward(kw):
    cfg = small_cfg(**kw)
    params = models.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 20), 0, cfg.vocab_size)
    full, _ = forward(params, tokens, cfg)
    cache = models.init_cache(cfg, 2, 32)
    prefill, cache = forward(params, tokens[:, :7], cfg, cache=cache)
    steps = [prefill]
    for t in range(7, 20):
        out, cache = forward(params, tokens[:, t:t + 1], cfg, cache=cache)
        steps.append(out)
    np.testing.assert_allclose(np.concatenate(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert int(cache["index"]) == 20
    # The sampler's step: per-layer params and cache lists, the same logits and cache, with the
    # prefill attending over the whole masked cache or (prefill=True) over its own keys only.
    layers = models.unstack_layers(params)
    caches = []
    for prefill in (False, True):
        cache, steps = models.cache_per_layer(models.init_cache(cfg, 2, 32)), []
        for lo, hi in ((0, 7), *((t, t + 1) for t in range(7, 20))):
            out, cache = models.decode_step(
                params, layers, tokens[:, lo:hi], cfg, cache=cache, prefill=prefill and lo == 0,
                positions=jnp.broadcast_to(jnp.arange(lo, hi), (2, hi - lo)),
                segment_ids=jnp.ones((2, hi - lo), jnp.int32))
            steps.append(out)
        np.testing.assert_allclose(np.stack(steps, 1), full[:, 6:], rtol=1e-5, atol=1e-5)
        caches.append(cache)
    for a, b in zip(*(c["k"] + c["v"] for c in caches)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="needs an empty cache; its index is 20"):
        models.decode_step(params, layers, tokens[:, :1], cfg, cache=cache, prefill=True,
                           positions=jnp.full((2, 1), 20), segment_ids=jnp.ones((2, 1), jnp.int32))


@pytest.mark.parametrize("adapted", ["int8", "int8+lora"])
def test_decode_step_fuses_only_plain_or_int8_projections(adapted):
    """unstack_layers joins q/k/v and gate/up into one kernel each where they hold the same
    kinds of params (int8 kernels with their scales too), not where LoRA adapters sit beside
    them; either way decode_step's logits are forward()'s."""
    from jaxllm import lora
    from jaxllm.config import LoraConfig
    cfg = small_cfg(qkv_bias=True)
    params = lora.quantize(models.init(cfg, jax.random.key(0)), "int8")
    lcfg = LoraConfig(rank=2, alpha=4.0, targets=("q_proj",))
    adapters = {}
    if "lora" in adapted:
        adapters = jax.tree.map(lambda x: x + 0.05, lora.init(lora.abstract(params, lcfg),
                                                               jax.random.key(1)))
    params = lora.attach(params, adapters, lcfg)
    layer = models.unstack_layers(params)[0]
    assert ("qkv_proj" in layer["self_attn"]) == ("lora" not in adapted)
    assert set(layer["mlp"]) == {"gate_up_proj", "down_proj"}
    assert layer["mlp"]["gate_up_proj"]["kernel"].dtype == jnp.int8
    tokens = jax.random.randint(jax.random.key(2), (2, 9), 0, cfg.vocab_size)
    cache = models.cache_per_layer(models.init_cache(cfg, 2, 16))
    got, _ = models.decode_step(params, models.unstack_layers(params), tokens, cfg, cache=cache,
                                positions=jnp.broadcast_to(jnp.arange(9), (2, 9)),
                                segment_ids=jnp.ones((2, 9), jnp.int32))
    np.testing.assert_allclose(got, forward(params, tokens, cfg)[0][:, -1], rtol=1e-5, atol=1e-5)


def test_packed_segments_equal_separate_documents():
    cfg = small_cfg()
    params = models.init(cfg, jax.random.key(0))
    a = jax.random.randint(jax.random.key(1), (1, 9), 0, cfg.vocab_size)
    b = jax.random.randint(jax.random.key(2), (1, 7), 0, cfg.vocab_size)
    packed = jnp.concatenate([a, b], 1)
    seg = jnp.array([[1] * 9 + [2] * 7])
    out, _ = forward(params, packed, cfg, segment_ids=seg)  # positions derived, reset
    la, _ = forward(params, a, cfg)
    lb, _ = forward(params, b, cfg)
    np.testing.assert_allclose(out, jnp.concatenate([la, lb], 1), rtol=1e-5, atol=1e-5)
    # Without segment ids the second document would see the first: a real difference.
    mixed, _ = forward(params, packed, cfg)
    assert np.abs(np.asarray(mixed[:, 9:] - lb)).max() > 1e-3


@pytest.mark.parametrize("window", [None, 40])
def test_blocked_causal_attention_equals_one_masked_product(window):
    """The training path skips the key blocks above the diagonal (256 tokens: 4 query blocks);
    with packed segments and a sliding window it must equal one fully masked product."""
    from jaxllm.models.llama import attention_mask, causal_attention, reference_attention
    q, k, v = (jax.random.normal(jax.random.key(i), (2, 256, h, 16)) for i, h in enumerate((4, 2, 2)))
    seg = jnp.asarray(np.repeat([[1, 2, 3, 4], [1, 1, 2, 2]], 64, axis=1))
    seg = seg.at[1, 200:].set(0)  # padding at the end of row 1
    idx = jnp.broadcast_to(jnp.arange(256), (2, 256))
    want = reference_attention(q, k, v, attention_mask(idx, idx, seg, seg, window), 0.25)
    np.testing.assert_allclose(causal_attention(q, k, v, seg, 0.25, window), want, atol=1e-5)


def test_token_cross_entropy_is_minus_log_softmax_at_the_target():
    from jaxllm.tasks.pretrain import token_cross_entropy
    logits = 3 * jax.random.normal(jax.random.key(0), (2, 5, 37))
    targets = jax.random.randint(jax.random.key(1), (2, 5), 0, 37)
    nll, lse = token_cross_entropy(logits, targets)
    logp = jax.nn.log_softmax(logits)
    np.testing.assert_allclose(nll, -jnp.take_along_axis(logp, targets[..., None], -1)[..., 0],
                               rtol=1e-6)
    np.testing.assert_allclose(lse, jax.scipy.special.logsumexp(logits, -1), rtol=1e-6)


def test_remat_and_bf16_paths_agree():
    cfg = small_cfg()
    params = models.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, cfg.vocab_size)

    @jax.jit
    def grads(p):
        return [jax.grad(lambda p: jnp.mean(models.forward(p, tokens, c)[0] ** 2))(p)
                for c in [cfg] + [cfg.replace(remat=r) for r in ("full", "save_dots", "save_qkv")]]
    g0, *others = grads(params)
    for g in others:
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7), g, g0)
    bf, _ = forward(params, tokens, cfg.replace(compute_dtype="bfloat16"))
    ref, _ = forward(params, tokens, cfg)
    np.testing.assert_allclose(np.asarray(bf, np.float32), ref, atol=2e-2, rtol=2e-2)


PUBLISHED = {"llama3-8b": 8_030_261_248, "llama2-7b": 6_738_415_616, "mistral-7b": 7_241_732_096,
             "qwen2.5-0.5b": 494_032_768, "qwen2.5-7b": 7_615_616_512,
             "llama3.2-1b": 1_235_814_400, "llama3.1-8b": 8_030_261_248}


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_parameter_counts(name):
    cfg = models.preset(name)
    assert models.count_params(cfg)["total"] == PUBLISHED[name]
    abstract = models.abstract_params(cfg)  # the real module tree, never allocated
    assert sum(int(np.prod(x.shape)) for x in jax.tree.leaves(abstract)) == PUBLISHED[name]


def test_vanilla_count_formula():
    # Vanilla MHA with a 4H MLP: V*H + 12*H^2*L, up to norms and the untied head.
    v, h, layers = 1000, 128, 3
    cfg = models.ModelConfig(vocab_size=v, hidden_size=h, intermediate_size=4 * h,
                             num_layers=layers, num_heads=4, num_kv_heads=4, tie_embeddings=True)
    # Our MLP is SwiGLU (3 matrices): with 4H it holds 12H^2 instead of 8H^2 per layer.
    swiglu_extra = 4 * h * h * layers
    norms = (2 * layers + 1) * h
    assert models.count_params(cfg)["total"] == v * h + 12 * h * h * layers + swiglu_extra + norms


def test_flops_per_token_matches_6n_plus_attention():
    cfg = models.preset("llama3-8b")
    n_matmul = 8_030_261_248 - 128256 * 4096 - (2 * 32 + 1) * 4096  # no lookup, no norms
    attn = 12 * 32 * 4096 * 32 * 128 / 2
    assert models.flops_per_token(cfg, 4096) == pytest.approx(6 * n_matmul + attn)
