"""Prompt tuning: the model's soft-prompt hook (params["soft_prompt"] prepended to the input
embeddings) and its export in PEFT's prompt-tuning format. Training only the prompt, with a
falling loss, is tested in test_posttrain.py (test_prompt_tuning_trains_only_the_soft_prompt)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import cli, config, models
from jaxllm.cli_generate import load_model
from jaxllm.lora_extract import write_task_run
from jaxllm.train.step import base_key

TINY = ["model.vocab_size=259", "model.hidden_size=64", "model.intermediate_size=128",
        "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.max_seq_len=64",
        "data.seq_len=48", "data.tokenizer.kind=byte", "checkpoint.async_save=false"]


def test_a_soft_prompt_of_token_embeddings_equals_prepending_those_tokens():
    """The hook extends positions and segment ids as if the prompt were N more tokens at the
    front of each row (right-padded rows included), and returns only the rows' own outputs."""
    cfg = config.load(None, TINY).model
    params = models.init(cfg, jax.random.key(0))
    rng = np.random.default_rng(0)
    prompt_ids = jnp.asarray(rng.integers(3, 259, 5))
    tokens = jnp.asarray(rng.integers(3, 259, (2, 16)))
    seg = jnp.ones((2, 16), jnp.int32).at[1, 11:].set(0)  # row 1: 11 real tokens, then padding
    soft = params | {"soft_prompt": params["embed_tokens"]["embedding"][prompt_ids]}
    ours, _ = models.forward(soft, tokens, cfg, segment_ids=seg)
    full = jnp.concatenate([jnp.broadcast_to(prompt_ids, (2, 5)), tokens], 1)
    ref, _ = models.forward(params, full, cfg,
                            segment_ids=jnp.concatenate([jnp.ones((2, 5), jnp.int32), seg], 1))
    assert ours.shape == (2, 16, 259)
    real = np.asarray(seg, bool)
    np.testing.assert_allclose(np.asarray(ours)[real], np.asarray(ref[:, 5:])[real], atol=1e-5)
    hidden, _ = models.hidden_states(soft, tokens, cfg, segment_ids=seg)
    assert hidden.shape == (2, 16, 64)


def test_prompt_tuning_run_exports_to_peft_with_our_logits(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    exp = config.load(None, [*TINY, f"run_dir={tmp_path / 'run'}", "task=sft",
                             "prompt_tuning.num_tokens=6"])
    prompt = jax.random.normal(jax.random.key(1), (6, 64))
    write_task_run(exp, {"soft_prompt": prompt}, tmp_path / "run")
    cli.main(["convert", "--to-peft", str(tmp_path / "run"), "--out", str(tmp_path / "peft")])
    assert "soft prompt (6 virtual tokens)" in capsys.readouterr().out

    cfg, params, _, _ = load_model(str(tmp_path / "run"), None)
    base = models.init(exp.model, base_key(exp))
    jax.tree.map(np.testing.assert_array_equal, {k: v for k, v in params.items()
                                                 if k != "soft_prompt"}, base)
    tokens = (np.arange(2 * 20).reshape(2, 20) * 5 + 3) % 259
    ours = np.asarray(models.forward(params, jnp.asarray(tokens), cfg)[0])
    adapter_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_cfg["peft_type"] == "PROMPT_TUNING" and adapter_cfg["num_virtual_tokens"] == 6
    model = transformers.AutoModelForCausalLM.from_pretrained(
        adapter_cfg["base_model_name_or_path"], torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, tmp_path / "peft").eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor(tokens)).logits.numpy()
    assert ref.shape == (2, 26, 259)  # peft returns the virtual tokens' positions too
    np.testing.assert_allclose(ours, ref[:, 6:], atol=2e-5, rtol=1e-5)

    # A plain Hugging Face model has no place for the prompt: refused in one line.
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "hf")])
    assert e.value.code == 2 and "use --to-peft" in capsys.readouterr().err
