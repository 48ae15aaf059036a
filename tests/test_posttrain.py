"""Post-training: loss formulas on hand-computed values, masks and packing, LoRA, data errors."""
import dataclasses
import functools
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import config, lora, models
from jaxllm.config import DistillConfig, DPOConfig, LoraConfig, RewardConfig
from jaxllm.data import ByteTokenizer, DataError, synthetic
from jaxllm.data.examples import example_spans
from jaxllm.data.posttrain import ExampleData, flatten, rows_of
from jaxllm.tasks import get_task
from jaxllm.tasks.distill import token_kl
from jaxllm.tasks.dpo import dpo_losses
from jaxllm.tasks.reward import pairwise_losses
from jaxllm.tasks.sequences import sequence_logps

TOK = ByteTokenizer()
FEW_STEPS = ["train.steps=2", "train.eval_every=0", "train.eval_batches=0",
             "logging.progress_bar=false", "logging.plot=false", "logging.tensorboard=false",
             "checkpoint.async_save=false"]
TINY = ["model.vocab_size=259", "model.hidden_size=64", "model.intermediate_size=128",
        "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.max_seq_len=64",
        "data.seq_len=48", "data.tokenizer.kind=byte"]


def logsig(x):
    return -math.log1p(math.exp(-x))


# ----------------------------------------------------------------------------- formulas

@pytest.mark.parametrize("loss, smoothing", [("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0),
                                             ("ipo", 0.0)])
def test_dpo_losses_match_the_published_formulas(loss, smoothing):
    pc, pr, rc, rr = -10.0, -14.0, -11.0, -12.5  # summed log-probs
    lc, lr_ = 4.0, 5.0  # completion lengths
    b = 0.5
    if loss == "ipo":  # averaged per token: d = (-10/4 + 11/4) - (-14/5 + 12.5/5) = 0.25 + 0.3
        d = 0.25 + 0.3
        want = (d - 1 / (2 * b)) ** 2
    else:
        d = (pc - rc) - (pr - rr)  # 1 + 1.5 = 2.5
        want = {"sigmoid": -(1 - smoothing) * logsig(b * d) - smoothing * logsig(-b * d),
                "hinge": max(0.0, 1 - b * d)}[loss]
    got = dpo_losses(jnp.array([pc]), jnp.array([pr]), jnp.array([rc]), jnp.array([rr]),
                     DPOConfig(beta=b, loss=loss, label_smoothing=smoothing),
                     jnp.array([lc]), jnp.array([lr_]))
    assert float(got[0]) == pytest.approx(want, rel=1e-6)


def test_reward_pairwise_loss_with_margin_and_centering():
    rc, rr = jnp.array([1.5, -0.2]), jnp.array([0.5, 0.3])
    got = pairwise_losses(rc, rr, RewardConfig(margin=0.25, center_coef=0.1))
    want = [-logsig(1.5 - 0.5 - 0.25) + 0.1 * 2.0 ** 2, -logsig(-0.2 - 0.3 - 0.25) + 0.1 * 0.1 ** 2]
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("kl", ["forward", "reverse"])
def test_distillation_kl_equals_a_direct_computation(kl):
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(3, 7)) * 2, rng.normal(size=(3, 7)) * 2
    temp = 2.0

    def softmax(x):
        e = np.exp(x / temp - (x / temp).max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    ps, pt = softmax(s), softmax(t)
    p, q = (pt, ps) if kl == "forward" else (ps, pt)
    want = [sum(p[i, v] * math.log(p[i, v] / q[i, v]) for v in range(7)) * temp ** 2 for i in range(3)]
    got = token_kl(jnp.asarray(s), jnp.asarray(t), DistillConfig(kl=kl, temperature=temp))
    np.testing.assert_allclose(got, want, rtol=1e-5)


# ----------------------------------------------------------------------------- masks, packing

def test_sft_mask_covers_the_completion_and_its_end_token_only():
    ex = {"prompt": "Reverse: abc\nAnswer: ", "completion": "cba"}
    ids, trained = flatten(example_spans(TOK, ex))
    rows = rows_of([(ids, trained)], 32, TOK.pad_id, pack=False)
    mask, targets = rows["loss_mask"][0], rows["targets"][0]
    trained_targets = targets[mask > 0]
    assert TOK.decode(trained_targets[:-1]) == "cba" and trained_targets[-1] == TOK.eos_id
    chat = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                         {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok"}]}
    ids, trained = flatten(example_spans(TOK, chat))
    rows = rows_of([(ids, trained)], 64, TOK.pad_id, pack=False)
    t = rows["targets"][0][rows["loss_mask"][0] > 0]
    assert list(t) == TOK.encode("yo") + [TOK.eos_id] + TOK.encode("ok") + [TOK.eos_id]


def test_packed_row_loss_equals_the_sum_of_its_examples_losses():
    exp = config.load(None, [*TINY, "model.max_seq_len=96"])
    params = models.init(exp.model, jax.random.key(0))
    exs = synthetic.instruct_rows(["abc", "hello", "zyxwv"])
    seqs = [flatten(example_spans(TOK, ex)) for ex in exs]
    packed = {k: jnp.asarray(v) for k, v in rows_of(seqs, 96, TOK.pad_id, pack=True).items()}
    assert packed["tokens"].shape[0] == 1 and int(packed["segment_ids"].max()) == 3
    alone = [{k: jnp.asarray(v) for k, v in rows_of([s], 96, TOK.pad_id, pack=False).items()}
             for s in seqs]
    total = float(sequence_logps(params, exp.model, packed)[0][0])
    parts = sum(float(sequence_logps(params, exp.model, r)[0][0]) for r in alone)
    assert total == pytest.approx(parts, rel=1e-5)


# ----------------------------------------------------------------------------- LoRA

def test_lora_step0_equals_base_and_merge_unmerge_round_trip():
    exp = config.load(None, TINY)
    base = models.init(exp.model, jax.random.key(0))
    lcfg = LoraConfig(rank=4, alpha=8.0)
    adapters = lora.init(lora.abstract(base, lcfg), jax.random.key(1))
    tokens = jnp.arange(40, dtype=jnp.int32)[None] % 259
    ref = models.forward(base, tokens, exp.model)[0]
    np.testing.assert_array_equal(models.forward(lora.apply(base, adapters, lcfg), tokens, exp.model)[0], ref)
    trained = jax.tree.map(lambda x: x + 0.05, adapters)  # as if after some steps
    merged = lora.merge(base, trained, lcfg)
    np.testing.assert_allclose(models.forward(merged, tokens, exp.model)[0],
                               models.forward(lora.apply(base, trained, lcfg), tokens, exp.model)[0],
                               atol=1e-5)
    assert not np.allclose(merged["layers"]["self_attn"]["q_proj"]["kernel"],
                           base["layers"]["self_attn"]["q_proj"]["kernel"])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
                 lora.unmerge(merged, trained, lcfg), base)


@pytest.mark.parametrize("base_dtype", ["param", "int8"])
def test_lora_inside_the_layers_equals_the_merged_weights(base_dtype):
    """lora.attach (x W + x A sB in each layer, an int8 W dequantised in the product; what
    training runs) gives the logits and adapter gradients of the merged weights (lora.apply),
    with adapters on embeddings, attention, MLP and lm_head and a qkv bias."""
    exp = config.load(None, [*TINY, "model.qkv_bias=true"])
    base = lora.quantize(models.init(exp.model, jax.random.key(0)), base_dtype)
    lcfg = LoraConfig(rank=4, alpha=8.0, targets=("embed_tokens", "q_proj", "v_proj", "up_proj",
                                                  "down_proj", "lm_head"))
    adapters = jax.tree.map(lambda x: x + 0.05, lora.init(lora.abstract(base, lcfg), jax.random.key(1)))
    tokens = jnp.arange(40, dtype=jnp.int32)[None] % 259
    attached = lora.attach(base, adapters, lcfg)
    assert attached["layers"]["mlp"]["up_proj"]["kernel"].dtype == (
        jnp.int8 if base_dtype == "int8" else jnp.float32)  # no dequantised copy
    assert "lora_a" in attached["lm_head"] and "lora_a" not in attached["layers"]["mlp"]["gate_proj"]

    def loss(ad, how):
        return jnp.mean(models.forward(how(base, ad, lcfg), tokens, exp.model)[0] ** 2)
    (inside, g_inside), (merged, g_merged) = (jax.value_and_grad(loss)(adapters, how)
                                              for how in (lora.attach, lora.apply))
    assert float(inside) == pytest.approx(float(merged), rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7),
                 g_inside, g_merged)


def test_lora_dropout_masks_the_adapters_input_only_inside_training_steps():
    exp = config.load(None, TINY)
    base = models.init(exp.model, jax.random.key(0))
    lcfg = LoraConfig(rank=4, alpha=8.0, dropout=0.5)
    adapters = jax.tree.map(lambda x: x + 0.05, lora.init(lora.abstract(base, lcfg), jax.random.key(1)))
    tokens = jnp.arange(40, dtype=jnp.int32)[None] % 259

    def logits(params, rate=None, key=0):
        if rate is None:  # evaluation, sampling: no dropout context
            return np.asarray(models.forward(params, tokens, exp.model)[0])
        with models.adapter_dropout(rate, jax.random.key(key)):
            return np.asarray(models.forward(params, tokens, exp.model)[0])
    adapted = lora.attach(base, adapters, lcfg)
    plain = logits(adapted)
    np.testing.assert_array_equal(logits(adapted, 0.5, 3), logits(adapted, 0.5, 3))  # seeded
    assert not np.allclose(logits(adapted, 0.5, 3), logits(adapted, 0.5, 4), atol=1e-4)
    assert not np.allclose(logits(adapted, 0.5, 3), plain, atol=1e-4)
    np.testing.assert_array_equal(logits(adapted, 0.0, 3), plain)
    np.testing.assert_array_equal(logits(base, 0.5, 3), logits(base))  # no adapters, no dropout


def test_lora_dropout_keeps_each_input_with_probability_one_minus_rate():
    """With A = B = I and W = 0 a layer's output is its adapter's dropped-out input: a share
    `rate` of the entries is zero and the rest are scaled by 1 / (1 - rate)."""
    from jaxllm.models.llama import _TokenDense
    rate, d = 0.3, 64
    eye = jnp.eye(d)
    layer = {"kernel": jnp.zeros((d, d)), "lora_a": eye, "lora_b": eye}
    with models.adapter_dropout(rate, jax.random.key(0)):
        out = np.asarray(_TokenDense(d, use_bias=False).apply(
            {"params": layer}, jnp.ones((500, d)), rngs=models.adapter_dropout_rngs()))
    assert abs((out == 0).mean() - rate) < 0.01  # 32,000 draws: the std error is 0.0026
    np.testing.assert_allclose(out[out != 0], 1 / (1 - rate), rtol=1e-6)


@pytest.mark.parametrize("tied", [False, True])
def test_blockwise_loss_head_equals_the_whole_one_and_holds_less(tied):
    """model.loss_chunks=4 gives the loss, gradients and per-token log-probs of one whole
    [B, S, V] logits tensor, on packed rows, and its compiled step holds less memory (by more
    than the whole logits' size)."""
    from jaxllm.tasks import pretrain
    from jaxllm.tasks.sequences import token_logps
    exp = config.load(None, [*TINY, "model.vocab_size=4096", f"model.tie_embeddings={tied}",
                             "model.max_seq_len=256", "data.seq_len=256"])
    cfg = exp.model
    params = models.init(cfg, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 256), 0, cfg.vocab_size)
    seg = jnp.concatenate([jnp.ones((2, 150), jnp.int32), 2 * jnp.ones((2, 106), jnp.int32)], 1)
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "segment_ids": seg,
             "positions": models.positions_from_segments(seg), "loss_mask": seg > 0}
    step = {n: jax.jit(jax.value_and_grad(functools.partial(
        pretrain.loss, cfg=cfg.replace(loss_chunks=n)), has_aux=True)) for n in (1, 4)}
    (whole, _), g_whole = step[1](params, batch)
    (blocks, _), g_blocks = step[4](params, batch)
    assert float(blocks) == pytest.approx(float(whole), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g_blocks, g_whole)
    np.testing.assert_allclose(token_logps(params, cfg.replace(loss_chunks=4), batch),
                               token_logps(params, cfg, batch), rtol=1e-5, atol=1e-6)
    temp = {n: f.lower(params, batch).compile().memory_analysis().temp_size_in_bytes
            for n, f in step.items()}
    assert temp[1] - temp[4] > 2 * 256 * cfg.vocab_size * 4, temp  # a whole fp32 [B,S,V] less


def test_blockwise_loss_head_draws_its_own_lm_head_dropout_per_block():
    from jaxllm.tasks import pretrain
    exp = config.load(None, [*TINY, "model.loss_chunks=4"])
    base = models.init(exp.model, jax.random.key(0))
    lcfg = LoraConfig(rank=4, alpha=8.0, targets=("lm_head",), dropout=0.5)
    adapters = jax.tree.map(lambda x: 0.3 * jax.random.normal(jax.random.key(1), x.shape),
                            lora.abstract(base, lcfg))
    params = lora.attach(base, adapters, lcfg)
    # Every token its own document at position 0, token p // 4 at p: block i (positions
    # i, i+4, ...) sees tokens 0..11, the same hidden states as every other block.
    tokens = jnp.repeat(jnp.arange(12, dtype=jnp.int32), 4)[None]
    rows = {"tokens": tokens, "targets": tokens, "segment_ids": jnp.arange(1, 49)[None],
            "positions": jnp.zeros_like(tokens)}
    with models.adapter_dropout(0.5, jax.random.key(2)):
        nll = np.asarray(pretrain.rows_cross_entropy(params, rows, exp.model)[0]).reshape(12, 4)
    assert not np.allclose(nll[:, 0], nll[:, 1])  # same inputs, different masks per block
    plain = np.asarray(pretrain.rows_cross_entropy(params, rows, exp.model)[0]).reshape(12, 4)
    np.testing.assert_allclose(plain[:, 0], plain[:, 1], rtol=1e-6)


def test_lora_int8_base_is_close_to_the_float_base():
    exp = config.load(None, TINY)
    base = models.init(exp.model, jax.random.key(0))
    q = lora.quantize(base, "int8")
    assert q["layers"]["mlp"]["up_proj"]["kernel"]["int8"].dtype == jnp.int8
    tokens = jnp.arange(40, dtype=jnp.int32)[None] % 259
    deq = lora.apply(q, {}, LoraConfig(rank=4))
    ref, got = models.forward(base, tokens, exp.model)[0], models.forward(deq, tokens, exp.model)[0]
    assert float(jnp.abs(got - ref).max()) < 0.02 * float(jnp.abs(ref).max())


def test_lora_trains_only_adapters_and_the_optimizer_holds_only_them(tmp_path):
    """Through the real loop: the base is unchanged (it is not even in the state) and the
    optimizer state is two moments of adapter size, not of model size."""
    from jaxllm.train import loop
    from jaxllm.train.checkpoint import restore_run_params
    from jaxllm.train.optimizer import make_optimizer
    from jaxllm.train.step import abstract_state
    from jaxllm import sharding

    exp = config.load("experiments/posttrain/sft_lora.yaml",  # the shipped example
                      [*FEW_STEPS, "train.steps=3", f"run_dir={tmp_path}", "lora.dropout=0.1",
                       "train.batch_size=16", "train.grad_accum=2"])
    loop.run(exp)
    _, params = restore_run_params(tmp_path)
    n_adapter = lora.param_count(params)
    n_model = lora.param_count(models.abstract_params(exp.model))
    assert set(params) == {"lora"} and 0 < n_adapter < n_model / 5
    assert float(jnp.abs(params["lora"]["layers"]["mlp"]["down_proj"]["b"]).max()) > 0  # trained
    opt = make_optimizer(exp.optimizer, exp.train.steps)
    spec = get_task("sft").param_spec(exp)
    abstract = abstract_state(exp, opt, sharding.make_mesh(exp.mesh), spec)
    assert lora.param_count(abstract["opt_state"]) <= 2 * n_adapter + 8

    # Export merged: transformers gives the logits of base + adapters.
    torch = pytest.importorskip("torch")
    import transformers

    from jaxllm import cli
    from jaxllm.cli_generate import load_model
    cli.main(["convert", "--to-hf", str(tmp_path), "--out", str(tmp_path / "hf")])
    cfg, merged, _, _ = load_model(str(tmp_path), None)
    tokens = np.arange(30)[None] % 259
    ours = np.asarray(models.forward(merged, jnp.asarray(tokens), cfg)[0])
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf",
                                                                 torch_dtype=torch.float32)
    with torch.no_grad():
        ref = hf_model(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


# ----------------------------------------------------------------------------- data

def _write(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_malformed_rows_are_an_error_with_file_and_line_or_counted(tmp_path):
    good = {"prompt": "a", "chosen": "b", "rejected": "c"}
    path = _write(tmp_path / "p.jsonl", [good, {"prompt": "a", "chosen": "b"}, "{oops", good])
    exp = config.load(None, [*TINY, "data.format=preference", f"data.sources=[{path}]"])
    with pytest.raises(DataError, match=r"p.jsonl:2: field 'rejected'"):
        ExampleData(exp.data, TOK, batch_size=2, seed=0)
    skip = dataclasses.replace(exp.data, skip_malformed=True, eval_fraction=0.0)
    data = ExampleData(skip, TOK, batch_size=2, seed=0)
    assert data.skipped == 2 and "2 malformed skipped" in data.summary


def test_parquet_reads_like_jsonl_and_names_the_row_of_a_bad_one(tmp_path):
    """Chat-message prompts as Parquet list<struct> columns; rows equal the JSONL ones."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = [{"prompt": [{"role": "user", "content": f"q{i}"}], "chosen": f"good{i}",
             "rejected": "bad"} for i in range(5)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    _write(tmp_path / "p.jsonl", rows)
    made = {}
    for suffix in ("jsonl", "parquet"):
        exp = config.load(None, [*TINY, "data.format=preference", "data.eval_fraction=0",
                                 f"data.sources=[{tmp_path / ('p.' + suffix)}]"])
        made[suffix] = ExampleData(exp.data, TOK, batch_size=2, seed=0).train_rows[0]
    jax.tree.map(np.testing.assert_array_equal, made["parquet"], made["jsonl"])
    pq.write_table(pa.Table.from_pylist(rows[:2] + [rows[2] | {"chosen": None}]),
                   tmp_path / "bad.parquet")
    exp = config.load(None, [*TINY, "data.format=preference", f"data.sources=[{tmp_path}/bad.parquet]"])
    with pytest.raises(DataError, match=r"bad.parquet, row 3: field 'chosen'"):
        ExampleData(exp.data, TOK, batch_size=2, seed=0)


def test_field_names_are_remappable_and_chat_pairs_accepted(tmp_path):
    path = _write(tmp_path / "p.jsonl", [
        {"question": "q1", "selected": "good", "worse": "bad"},
        {"question": [{"role": "user", "content": "q2"}],
         "selected": [{"role": "assistant", "content": "fine"}], "worse": "nope"}])
    exp = config.load(None, [*TINY, "data.format=preference", f"data.sources=[{path}]",
                             "data.fields.prompt=question", "data.fields.chosen=selected",
                             "data.fields.rejected=worse", "data.eval_fraction=0"])
    rows = ExampleData(exp.data, TOK, batch_size=2, seed=0).train_rows[0]
    chosen = rows["chosen_targets"][rows["chosen_loss_mask"] > 0]
    assert TOK.decode(chosen) == "goodfine"


def test_mixture_weights_set_the_sampling_proportions(tmp_path):
    a = _write(tmp_path / "a.jsonl", [{"prompt": "a", "completion": f"A{i}"} for i in range(50)])
    b = _write(tmp_path / "b.jsonl", [{"prompt": "b", "completion": f"B{i}"} for i in range(50)])
    exp = config.load(None, [*TINY, "data.format=instruct", f"data.sources=[{a},{b}]",
                             "data.weights=[3,1]", "data.pack=false", "data.eval_fraction=0"])
    it = ExampleData(exp.data, TOK, batch_size=40, seed=0).train_iterator()
    first = np.concatenate([next(it)["tokens"][:, 1] for _ in range(10)])  # the prompt letter
    share_a = float(np.mean(first == TOK.encode("a")[0]))
    assert 0.65 < share_a < 0.85


# ----------------------------------------------------------------------------- tasks end to end

def test_dpo_starts_at_log2_for_full_and_lora_training(tmp_path):
    """Policy == reference at step 0, so every pair's sigmoid loss is log 2: true only if the
    reference really is the starting point (LoRA, through the loop with the shipped config:
    the base with adapters off; full: the task's frozen copy)."""
    from jaxllm.data.posttrain import ExampleData
    from jaxllm.tasks.dpo import DPOTask
    from jaxllm.train import loop
    exp = config.load("experiments/posttrain/dpo.yaml", [
        *FEW_STEPS, "train.steps=1", "logging.every_steps=1", "checkpoint.enabled=false",
        f"run_dir={tmp_path}", "lora.rank=4"])
    last = loop.run(exp)
    assert last["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert last["rewards/margins"] == pytest.approx(0.0, abs=1e-6)

    full = dataclasses.replace(exp, lora=LoraConfig())
    task, base = DPOTask(), models.init(full.model, jax.random.key(0))
    params, frozen = task.init_params(full, jax.random.key(1), base), task.frozen(full, base, None)
    batch = next(ExampleData(full.data, TOK, batch_size=8, seed=0).train_iterator())
    loss, metrics = jax.jit(task.loss_fn(full))(params, jax.tree.map(jnp.asarray, batch), frozen)
    assert float(loss) == pytest.approx(math.log(2), abs=1e-6)
    assert float(metrics["rewards/accuracies"]) == 0.0  # ties are not wins


def test_dpo_with_precomputed_reference_trains_the_same_without_a_frozen_copy(tmp_path):
    """dpo.precompute_reference: one reference pass before training, stored in the run
    directory and reused (the reference is not needed again), gives the same losses as the
    reference run each step, and full fine-tuning then keeps no frozen copy."""
    from jaxllm import sharding
    from jaxllm.data.posttrain import ExampleData
    from jaxllm.tasks import reference_logps
    from jaxllm.tasks.dpo import DPOTask
    from jaxllm.train import loop
    from jaxllm.train.step import base_key
    losses = {}
    for pre in ("false", "true"):
        exp = config.load("experiments/posttrain/dpo.yaml", [
            *FEW_STEPS, "train.steps=3", "optimizer.warmup_steps=1", "logging.every_steps=1",
            "checkpoint.enabled=false", f"run_dir={tmp_path / pre}", "train.eval_batches=2",
            f"dpo.precompute_reference={pre}"])
        loop.run(exp)
        lines = [json.loads(line) for line in
                 (tmp_path / pre / "metrics.jsonl").read_text().splitlines()]
        # the last line has the held-out loss and the task's metrics (eval_*) too
        losses[pre] = [line["loss"] for line in lines] + [lines[-1]["eval_loss"],
                                                            lines[-1]["eval_rewards/margins"]]
    assert losses["true"][0] == pytest.approx(math.log(2), abs=1e-6)
    assert losses["true"][2] < math.log(2) - 1e-3 and losses["true"][4] > 0  # it trained
    np.testing.assert_allclose(losses["true"], losses["false"], rtol=1e-5, atol=1e-6)
    assert not DPOTask().needs_frozen(exp)

    data = ExampleData(exp.data, TOK, batch_size=8, seed=0)
    mesh = sharding.make_mesh(exp.mesh)
    reference_logps.attach(exp, data, lambda: pytest.fail("recomputed"), mesh, tmp_path / "true",
                           resuming=True)
    (tmp_path / "true" / reference_logps.FILE).write_bytes(b"damaged")  # recomputed, no crash
    reference_logps.attach(exp, data, lambda: models.init(exp.model, base_key(exp)), mesh,
                           tmp_path / "true", resuming=True)
    base = models.init(exp.model, base_key(exp))  # the fresh init the run starts from
    rows = {k: jnp.asarray(v[:4]) for k, v in data.train_rows[0].items()}
    want, _ = sequence_logps(base, exp.model, rows, "chosen_")
    np.testing.assert_allclose(rows["chosen_ref_logps"], want, rtol=1e-5)


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    from jaxllm.train import loop
    run_dir = tmp_path_factory.mktemp("teacher")
    loop.run(config.load("experiments/posttrain/sft_full.yaml", [*FEW_STEPS, f"run_dir={run_dir}"]))
    return run_dir



def test_distill_loss_over_blocks_equals_the_whole_logits():
    """With model.loss_chunks the student's and the (wider) teacher's logits are formed a block
    at a time: the same KL and cross-entropy, the same gradients."""
    from jaxllm.tasks.distill import DistillTask
    exp = config.load(None, [*TINY, "task=distill", "distill.sft_weight=0.5"])
    task = DistillTask()
    task.teacher_cfg = exp.model.replace(hidden_size=96, num_layers=1)
    frozen = {"teacher": models.init(task.teacher_cfg, jax.random.key(5))}
    params = models.init(exp.model, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (2, 48), 0, exp.model.vocab_size)
    batch = {"tokens": tokens, "targets": jnp.roll(tokens, -1, 1), "positions":
             jnp.broadcast_to(jnp.arange(48), (2, 48)), "segment_ids": jnp.ones_like(tokens),
             "loss_mask": jnp.ones_like(tokens)}
    out = {}
    for n in (1, 4):
        blocked = dataclasses.replace(exp, model=exp.model.replace(loss_chunks=n))
        out[n] = jax.value_and_grad(task.loss_fn(blocked), has_aux=True)(params, batch, frozen)
    (whole, m1), g1 = out[1]
    (blocks, m4), g4 = out[4]
    assert float(m1["kl"]) > 0 and float(blocks) == pytest.approx(float(whole), rel=1e-6)
    assert float(m4["ce_loss"]) == pytest.approx(float(m1["ce_loss"]), rel=1e-6)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-7), g4, g1)


def test_distill_example_config_trains_from_a_teacher_run(tmp_path, teacher_run):
    """The shipped distillation config, with the shipped full-SFT config's run as teacher
    (sft_lora, dpo and reward configs run in the LoRA, DPO and reward export tests)."""
    from jaxllm.train import loop
    last = loop.run(config.load("experiments/posttrain/distill.yaml", [
        *FEW_STEPS, f"run_dir={tmp_path}", f"distill.teacher=run:{teacher_run}"]))
    assert np.isfinite(last["loss"]) and last["kl"] > 0


def test_reward_model_exports_as_a_sequence_classifier_transformers_reproduces(tmp_path):
    torch = pytest.importorskip("torch")
    import transformers

    from jaxllm import cli
    from jaxllm.tasks.reward import score
    from jaxllm.train import loop
    from jaxllm.train.checkpoint import restore_run_params

    loop.run(config.load("experiments/posttrain/reward.yaml",  # the shipped example
                         [*FEW_STEPS, f"run_dir={tmp_path / 'rm'}"]))
    cli.main(["convert", "--to-hf", str(tmp_path / "rm"), "--out", str(tmp_path / "hf")])
    exp, params = restore_run_params(tmp_path / "rm")
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 259, (3, 20))
    tokens[1, 12:] = TOK.pad_id  # right padding: the reward is read at the last real token
    seg = (tokens != TOK.pad_id).astype(np.int32)
    ours = np.asarray(score(params, exp.model, jnp.asarray(tokens), jnp.asarray(seg)))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "hf", torch_dtype=torch.float32)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits[:, 0].numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-4, rtol=1e-4)


def test_prompt_tuning_trains_only_the_soft_prompt(tmp_path):
    from jaxllm.tasks.base import model_params
    from jaxllm.train import loop
    from jaxllm.train.checkpoint import restore_run_params

    exp = config.load(None, [*TINY, "task=sft", "data.format=instruct", "data.pack=false",
                             "data.sources=[experiments/posttrain/data/reverse_sft.jsonl]",
                             "prompt_tuning.num_tokens=4", "train.steps=12", "train.batch_size=8",
                             "optimizer.lr=5e-2", "optimizer.warmup_steps=1",
                             "logging.every_steps=1", f"run_dir={tmp_path}",
                             "logging.progress_bar=false", "logging.plot=false",
                             "train.eval_batches=0", "checkpoint.async_save=false"])
    loop.run(exp)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "metrics.jsonl")]
    assert losses[-1] < losses[0] - 0.02  # a random base: the prompt alone moves it a little
    _, params = restore_run_params(tmp_path)
    assert set(params) == {"soft_prompt"} and params["soft_prompt"].shape == (4, 64)
    # The frozen base is the seeded init, untouched; the prompt changes the logits.
    base = models.init(exp.model, jax.random.split(jax.random.key(exp.seed))[0])
    tokens = jnp.arange(20)[None] % 259
    with_prompt = models.forward(model_params(exp, params, {"base": base}), tokens, exp.model)[0]
    assert with_prompt.shape == (1, 20, 259)
    assert not np.allclose(with_prompt, models.forward(base, tokens, exp.model)[0], atol=1e-3)
