"""Reward runs export as Hugging Face *ForSequenceClassification (one label, score.weight,
pad_token_id) and transformers reproduces jaxllm.tasks.reward.score. The shipped reward
config, trained, is exported in test_posttrain.py; here: Qwen2 (qkv bias, tied embeddings)
and a LoRA reward model (exported merged)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import cli, config, lora, models
from jaxllm.cli_generate import load_model
from jaxllm.lora_extract import write_task_run
from jaxllm.tasks.reward import score
from jaxllm.train.step import base_key

TINY = ["model.vocab_size=259", "model.hidden_size=64", "model.intermediate_size=128",
        "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.max_seq_len=64",
        "data.seq_len=48", "data.tokenizer.kind=byte", "checkpoint.async_save=false", "task=reward"]


@pytest.mark.parametrize("family", ["qwen2", "llama_lora"])
def test_reward_run_exports_as_a_sequence_classifier_with_our_scores(tmp_path, family):
    torch = pytest.importorskip("torch")
    import transformers

    over = (["model.qkv_bias=true", "model.tie_embeddings=true"] if family == "qwen2" else
            ["lora.rank=4", "lora.alpha=8"])
    exp = config.load(None, [*TINY, *over, f"run_dir={tmp_path / 'run'}"])
    head = {"kernel": jax.random.normal(jax.random.key(1), (64, 1))}
    if family == "qwen2":
        trained = models.init(exp.model, jax.random.key(0))
    else:
        base = models.init(exp.model, base_key(exp))
        abstract = lora.abstract(base, exp.lora)
        keys = iter(jax.random.split(jax.random.key(2), 64))
        trained = {"lora": jax.tree.map(lambda a: 0.1 * jax.random.normal(next(keys), a.shape),
                                        abstract)}
    write_task_run(exp, trained | {"score": head}, tmp_path / "run")
    cli.main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])

    hf_cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    arch = "Qwen2" if family == "qwen2" else "Llama"
    assert hf_cfg["architectures"] == [f"{arch}ForSequenceClassification"]
    assert hf_cfg["num_labels"] == 1 and hf_cfg["pad_token_id"] == 0  # the byte tokenizer's pad
    rng = np.random.default_rng(0)
    tokens = rng.integers(3, 259, (3, 20))
    tokens[1, 9:] = 0  # right padding: read at the last real token
    tokens[2, 17:] = 0
    cfg, params, _, _ = load_model(str(tmp_path / "run"), None, keep_heads=True)
    ours = np.asarray(score(params, cfg, jnp.asarray(tokens), jnp.asarray(tokens != 0, jnp.int32)))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        tmp_path / "hf", torch_dtype=torch.float32).eval()
    assert type(model).__name__ == f"{arch}ForSequenceClassification"
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits[:, 0].numpy()
    assert np.abs(ours).min() > 0.1  # scores of order one, not vanishing
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)
