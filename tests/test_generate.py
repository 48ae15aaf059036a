"""Sampling: greedy equals transformers' generate, padding does not change continuations,
top-k/top-p never emit filtered tokens, stop tokens end sequences, keys fix samples."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import models
from jaxllm.generate import filter_logits, generate

torch = pytest.importorskip("torch")
from test_model import hf_model  # noqa: E402


@pytest.fixture(scope="module")
def imported():
    model, cfg, params = hf_model("llama3-gqa-rope-scaling")
    return model, cfg, jax.tree.map(jnp.asarray, params)


def test_greedy_matches_transformers_generate(imported):
    model, cfg, params = imported
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 6))
    with torch.no_grad():
        ref = model.generate(torch.tensor(prompts), max_new_tokens=12, do_sample=False,
                             eos_token_id=None, pad_token_id=0).numpy()[:, 6:]
    out = generate(params, cfg, prompts.tolist(), max_new_tokens=12)
    np.testing.assert_array_equal(out["tokens"], ref)
    assert (out["lengths"] == 12).all()
    # logprobs are the model's log-probabilities of the chosen tokens
    logits, _ = models.forward(params, jnp.concatenate([prompts, ref], 1), cfg)
    lp = jax.nn.log_softmax(logits[:, 5:-1].astype(jnp.float32))
    np.testing.assert_allclose(out["logprobs"], np.take_along_axis(np.asarray(lp), ref[..., None], -1)[..., 0],
                               atol=1e-4)


def test_left_padding_gives_the_same_continuation(imported):
    _, cfg, params = imported
    rng = np.random.default_rng(1)
    prompts = [rng.integers(3, cfg.vocab_size, n).tolist() for n in (3, 9, 5)]
    batch = generate(params, cfg, prompts, max_new_tokens=8)["tokens"]
    for i, p in enumerate(prompts):
        alone = generate(params, cfg, [p], max_new_tokens=8)["tokens"][0]
        np.testing.assert_array_equal(batch[i], alone)


def test_stop_tokens_and_max_lengths_end_sequences(imported):
    _, cfg, params = imported
    prompts = [[5, 6, 7], [9, 10, 11]]
    free = generate(params, cfg, prompts, max_new_tokens=10)["tokens"]
    stop = int(free[0, 3])
    first = int(np.flatnonzero(free[0] == stop)[0])
    out = generate(params, cfg, prompts, max_new_tokens=10, stop_tokens=[stop], max_lengths=[10, 4],
                   pad_id=-1)
    assert out["lengths"][0] == first + 1 and out["tokens"][0, first] == stop
    assert (out["tokens"][0, first + 1:] == -1).all() and (out["logprobs"][0, first + 1:] == 0).all()
    np.testing.assert_array_equal(out["tokens"][0, :first + 1], free[0, :first + 1])
    hit = np.flatnonzero(free[1][:4] == stop)
    assert out["lengths"][1] == (hit[0] + 1 if len(hit) else 4)


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
    kw = dict(max_new_tokens=6, temperature=1.0, top_k=3)
    a = generate(params, cfg, prompts, key=jax.random.key(1), **kw)
    b = generate(params, cfg, prompts, key=jax.random.key(1), **kw)
    c = generate(params, cfg, prompts, key=jax.random.key(2), **kw)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    assert not np.array_equal(a["tokens"], c["tokens"])
    full = np.concatenate([np.array(prompts), a["tokens"]], 1)
    logits = np.asarray(models.forward(params, jnp.asarray(full), cfg)[0])[:, 2:-1]
    ranks = (logits > np.take_along_axis(logits, a["tokens"][..., None], -1)).sum(-1)
    assert ranks.max() < 3  # every sampled token was among the top 3
    greedy = generate(params, cfg, prompts, max_new_tokens=6)["tokens"]
    top1 = generate(params, cfg, prompts, max_new_tokens=6, temperature=1.0, top_k=1,
                    key=jax.random.key(5))["tokens"]
    np.testing.assert_array_equal(top1, greedy)
