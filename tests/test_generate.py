"""Sampling: greedy equals transformers' generate, padding does not change continuations,
top-k/top-p never emit filtered tokens, stop tokens end sequences, keys fix samples, a mesh
samples what one device samples (cache sharded by batch and kv heads), streaming sees every
token. The tests share shapes (4 prompts, 8 new tokens) so that they share compilations."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import models, sharding
from jaxllm.config import MeshConfig, ShardingRules
from jaxllm.generate import _generate, filter_logits, generate, pad_prompts

torch = pytest.importorskip("torch")
from test_model import forward, hf_model  # noqa: E402

NEW = 8


@pytest.fixture(scope="module")
def imported():
    model, cfg, params = hf_model("llama3-gqa-rope-scaling")
    return model, cfg, jax.tree.map(jnp.asarray, params)


def prompts_of(cfg, lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(3, cfg.vocab_size, n).tolist() for n in lengths]


def teacher_forced_logits(params, cfg, prompts, tokens):
    """Logits [B, NEW, V] predicting each generated token, from one forward pass per row over
    prompt + continuation (right-padded: padding comes after, so causal rows are unaffected)."""
    seqs = np.zeros((len(prompts), 16 + NEW), np.int32)  # one shape: one compilation
    for i, p in enumerate(prompts):
        seqs[i, :len(p) + NEW] = p + list(tokens[i])
    logits = np.asarray(forward(params, jnp.asarray(seqs), cfg)[0])
    return np.stack([logits[i, len(p) - 1:len(p) - 1 + NEW] for i, p in enumerate(prompts)])


def test_greedy_matches_transformers_generate(imported):
    model, cfg, params = imported
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (4, 6))
    with torch.no_grad():
        ref = model.generate(torch.tensor(prompts), max_new_tokens=NEW, do_sample=False,
                             eos_token_id=None, pad_token_id=0).numpy()[:, 6:]
    out = generate(params, cfg, prompts.tolist(), max_new_tokens=NEW)
    np.testing.assert_array_equal(out["tokens"], ref)
    assert (out["lengths"] == NEW).all()
    # logprobs are the model's log-probabilities of the chosen tokens
    lp = jax.nn.log_softmax(teacher_forced_logits(params, cfg, prompts.tolist(), ref))
    np.testing.assert_allclose(out["logprobs"], np.take_along_axis(np.asarray(lp), ref[..., None], -1)[..., 0],
                               atol=1e-4)


def test_left_padding_gives_the_same_continuation(imported):
    _, cfg, params = imported
    prompts = prompts_of(cfg, (3, 9, 5, 6), seed=1)
    batch = generate(params, cfg, prompts, max_new_tokens=NEW)["tokens"]  # padded to 16
    alone = generate(params, cfg, prompts[:1], max_new_tokens=NEW, pad_multiple=1)["tokens"]
    np.testing.assert_array_equal(batch[:1], alone)  # 13 pads or none: the same tokens
    # and every row is the greedy continuation of its own unpadded prompt
    logits = teacher_forced_logits(params, cfg, prompts, batch)
    np.testing.assert_array_equal(logits.argmax(-1), batch)


def test_stop_tokens_and_max_lengths_end_sequences(imported):
    _, cfg, params = imported
    prompts = prompts_of(cfg, (3, 3, 4, 5), seed=2)
    free = generate(params, cfg, prompts, max_new_tokens=NEW)["tokens"]
    stop = int(free[0, 3])
    first = int(np.flatnonzero(free[0] == stop)[0])
    out = generate(params, cfg, prompts, max_new_tokens=NEW, stop_tokens=[stop],
                   max_lengths=[NEW, 4, NEW, 0], pad_id=-1)
    assert out["lengths"][0] == first + 1 and out["tokens"][0, first] == stop
    assert (out["tokens"][0, first + 1:] == -1).all() and (out["logprobs"][0, first + 1:] == 0).all()
    np.testing.assert_array_equal(out["tokens"][0, :first + 1], free[0, :first + 1])
    hit = np.flatnonzero(free[1][:4] == stop)
    assert out["lengths"][1] == (hit[0] + 1 if len(hit) else 4)
    assert out["lengths"][3] == 0 and (out["tokens"][3] == -1).all()


def test_filters_keep_exactly_the_allowed_tokens():
    logits = jax.random.normal(jax.random.key(0), (4, 50)) * 3
    kept = np.isfinite(np.asarray(filter_logits(logits, 1.0, 5, 1.0)))
    top5 = np.argsort(-np.asarray(logits), axis=-1)[:, :5]
    assert (kept.sum(-1) == 5).all() and all(set(np.flatnonzero(k)) == set(t) for k, t in zip(kept, top5))
    probs = np.asarray(jax.nn.softmax(logits))
    kept = np.isfinite(np.asarray(filter_logits(logits, 1.0, 0, 0.8)))
    for p, k in zip(probs, kept):
        order = np.argsort(-p)
        need = int(np.searchsorted(np.cumsum(p[order]), 0.8) + 1)  # smallest prefix with mass >= 0.8
        assert set(np.flatnonzero(k)) == set(order[:need])


def test_sampling_respects_top_k_and_is_deterministic(imported):
    _, cfg, params = imported
    prompts = [[5, 6, 7]] * 4
    kw = dict(max_new_tokens=NEW, temperature=1.0, top_k=3)
    a = generate(params, cfg, prompts, key=jax.random.key(1), **kw)
    compiled = _generate._cache_size()
    b = generate(params, cfg, prompts, key=jax.random.key(1), **kw)
    c = generate(params, cfg, prompts, key=jax.random.key(2), **kw)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], c["tokens"])
    generate(params, cfg, prompts, key=jax.random.key(1), **kw | {"temperature": 0.5})
    assert _generate._cache_size() == compiled  # temperature is not compiled in
    logits = teacher_forced_logits(params, cfg, prompts, a["tokens"])
    ranks = (logits > np.take_along_axis(logits, a["tokens"][..., None], -1)).sum(-1)
    assert ranks.max() < 3 and ranks.max() > 0  # within the top 3, not always the top 1
    top1 = generate(params, cfg, prompts, max_new_tokens=NEW, temperature=1.0, top_k=1,
                    key=jax.random.key(5))["tokens"]
    np.testing.assert_array_equal(top1, generate(params, cfg, prompts, max_new_tokens=NEW)["tokens"])


def test_sampling_on_a_mesh_equals_one_device(imported):
    """Params sharded over data x fsdp x tensor sample what one device samples; the KV cache is
    split by batch (data, fsdp) and kv heads (tensor); streamed tokens arrive in order."""
    _, cfg, params = imported
    rules = ShardingRules()
    mesh = sharding.make_mesh(sharding.with_sizes(MeshConfig(), data=2, fsdp=2, tensor=2))
    prompts = prompts_of(cfg, (7, 3, 7, 5), seed=3)
    kw = dict(max_new_tokens=NEW, temperature=1.0, top_k=3, key=jax.random.key(1))
    ref = generate(params, cfg, prompts, **kw)
    shardings = sharding.tree_shardings(models.logical_axes(cfg), params, mesh, rules)
    sharded = jax.device_put(params, shardings)
    assert len(sharded["layers"]["mlp"]["up_proj"]["kernel"].sharding.device_set) == 8
    streamed = []
    with sharding.use(mesh, rules):
        out = generate(sharded, cfg, prompts, **kw, on_token=lambda t, e: streamed.append((t, e)))
    np.testing.assert_array_equal(out["tokens"], ref["tokens"])
    np.testing.assert_allclose(out["logprobs"], ref["logprobs"], atol=1e-4)
    steps, emitted = (np.stack(x, 1) for x in zip(*streamed))
    assert emitted.all() and steps.shape == (4, NEW)
    np.testing.assert_array_equal(steps, out["tokens"])
    # Params already on a mesh are sampled on it without a sharding.use block (same program).
    again = generate(sharded, cfg, prompts, **kw, on_token=lambda *a: None)
    np.testing.assert_array_equal(again["tokens"], ref["tokens"])
    # The program constrains each layer's cache [batch, kv_heads, slots, head_dim] as the rules say.
    tokens, seg, pos = pad_prompts(prompts, 0, 16)
    text = _generate.lower(
        sharded, None, tokens, seg, pos, np.full(4, NEW, np.int32), kw["key"], np.float32(1),
        np.float32(1), cfg=cfg, max_new_tokens=NEW, greedy=False, top_k=3, use_top_p=False,
        stop_tokens=(), pad_id=0, stream=True, mesh=mesh, rules=rules).as_text()
    cache = f"tensor<4x{cfg.num_kv_heads}x{16 + NEW}x{cfg.dim_per_head}x"
    assert f'[{{"data", "fsdp"}}, {{"tensor"}}, {{}}, {{}}]> : {cache}' in text


def test_greedy_argmax_takes_the_first_maximum_and_stays_in_the_vocabulary():
    x = np.random.default_rng(0).normal(size=(16, 300)).astype(np.float32)
    x[0, [5, 9]] = 10.0  # a tie: the first index wins, as with np.argmax
    argmax, lse = models.logit_stats(jnp.asarray(x))
    np.testing.assert_array_equal(argmax, np.argmax(x, -1))
    np.testing.assert_allclose(lse, np.log(np.exp(x.astype(np.float64)).sum(-1)), rtol=1e-6)
    x[1, 3] = np.nan
    assert 0 <= int(models.logit_stats(jnp.asarray(x))[0][1]) < 300
