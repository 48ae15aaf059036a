"""LoRA runs out to PEFT (`convert --to-peft`), PEFT adapters back in, and `jaxllm lora extract`
(truncated SVD of a fine-tune's difference): checked against peft and numpy's SVD."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import cli, config, lora, models
from jaxllm.cli_generate import load_model
from jaxllm.interop import hf
from jaxllm.interop.peft import load_adapter, save_adapter
from jaxllm.lora_extract import write_task_run
from jaxllm.train.checkpoint import write_run
from jaxllm.train.step import base_key

TINY = ["model.vocab_size=259", "model.hidden_size=64", "model.intermediate_size=128",
        "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.max_seq_len=64",
        "data.seq_len=48", "data.tokenizer.kind=byte", "checkpoint.async_save=false"]
TOKENS = (np.arange(2 * 24).reshape(2, 24) * 7 + 3) % 259


def _noisy(tree, key, std):
    leaves, treedef = jax.tree.flatten(tree)
    keys = jax.random.split(jax.random.key(key), len(leaves))
    return jax.tree.unflatten(treedef, [std * jax.random.normal(k, x.shape, x.dtype)
                                        for k, x in zip(keys, leaves)])


def _logits(params, cfg, tokens=TOKENS):
    return np.asarray(models.forward(params, jnp.asarray(tokens), cfg)[0])


def test_convert_to_peft_loads_in_peft_with_our_logits(tmp_path):
    """A LoRA run over a fresh-init base, adapters on embeddings, attention, MLP and lm_head
    with rsLoRA scaling: `convert --to-peft` writes the adapter and the base; peft reproduces
    the run's logits; load_adapter reads the adapter back exactly."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    import transformers

    exp = config.load(None, [*TINY, f"run_dir={tmp_path / 'run'}", "task=sft", "lora.rank=4",
                             "lora.alpha=6", "lora.rslora=true", "lora.dropout=0.05",
                             "lora.targets=[embed_tokens,q_proj,v_proj,o_proj,down_proj,lm_head]"])
    base = models.init(exp.model, base_key(exp))  # what the run rebuilds as its base
    adapters = _noisy(lora.abstract(base, exp.lora), 1, 0.1)  # A and B both non-zero
    write_task_run(exp, {"lora": adapters}, tmp_path / "run")
    cli.main(["convert", "--to-peft", str(tmp_path / "run"), "--out", str(tmp_path / "peft")])

    cfg, merged, _, _ = load_model(str(tmp_path / "run"), None)
    ours = _logits(merged, cfg)
    cfg16, merged16, _, _ = load_model(str(tmp_path / "run"), None, dtype="bfloat16")
    assert (cfg16.param_dtype, cfg16.compute_dtype) == ("bfloat16", "bfloat16")
    for a, b in zip(jax.tree.leaves(merged), jax.tree.leaves(merged16)):  # the same, rounded
        assert b.dtype == jnp.bfloat16 and np.array_equal(a.astype(jnp.bfloat16), b)
    assert np.abs(ours - _logits(base, cfg)).max() > 1e-2  # the adapters matter
    adapter_cfg = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == str((tmp_path / "peft" / "base").resolve())
    assert (adapter_cfg["r"], adapter_cfg["lora_alpha"], adapter_cfg["use_rslora"],
            adapter_cfg["lora_dropout"]) == (4, 6.0, True, 0.05)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        adapter_cfg["base_model_name_or_path"], torch_dtype=torch.float32)
    model = peft.PeftModel.from_pretrained(model, tmp_path / "peft").eval()
    with torch.no_grad():
        ref = model(torch.tensor(TOKENS)).logits.numpy()
    np.testing.assert_allclose(ours, ref, atol=2e-5, rtol=1e-5)

    back, lcfg = load_adapter(tmp_path / "peft")
    assert (lcfg.rank, lcfg.alpha, lcfg.rslora, lcfg.dropout) == (4, 6.0, True, 0.05)
    assert sorted(lcfg.targets) == sorted(exp.lora.targets)
    jax.tree.map(np.testing.assert_array_equal, back, jax.device_get(adapters))


def test_peft_export_refusals_are_one_line_errors(tmp_path, capsys):
    exp = config.load(None, [*TINY, f"run_dir={tmp_path / 'full'}"])
    write_run(exp, models.init(exp.model, jax.random.key(0)), tmp_path / "full")
    with pytest.raises(SystemExit) as e:
        cli.main(["convert", "--to-peft", str(tmp_path / "full"), "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "trains all weights" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["lora", "extract", "--base", str(tmp_path / "full"), "--tuned", "run:x",
                  "--rank", "2", "--out", str(tmp_path / "x")])
    assert e.value.code == 2
    assert "expected run:DIR or hf:DIR" in capsys.readouterr().err
    # Tied embeddings: PEFT's embedding LoRA would not move the tied output projection.
    tied = config.load(None, [*TINY, "model.tie_embeddings=true"])
    params = models.init(tied.model, jax.random.key(0))
    lcfg = config.LoraConfig(rank=2, targets=("embed_tokens",))
    with pytest.raises(hf.HFFormatError, match="tied embeddings"):
        save_adapter(lora.init(lora.abstract(params, lcfg), jax.random.key(1)), lcfg,
                     tmp_path / "t", tie_embeddings=True)


def test_lora_extract_recovers_low_rank_differences_and_reports_energy(tmp_path, capsys):
    """Base as a run, tuned as a Hugging Face directory: q_proj and up_proj differ by exactly
    rank 2 and are recovered; down_proj differs at full rank and keeps exactly its top-2
    squared singular values (Eckart-Young), which the report states per module and overall."""
    exp = config.load(None, [*TINY, f"run_dir={tmp_path / 'base'}"])
    base = models.init(exp.model, jax.random.key(0))
    low = config.LoraConfig(rank=2, alpha=2.0, targets=("q_proj", "up_proj"))
    tuned = lora.merge(base, _noisy(lora.abstract(base, low), 3, 0.2), low)
    down = base["layers"]["mlp"]["down_proj"]["kernel"]
    tuned["layers"]["mlp"]["down_proj"]["kernel"] = down + _noisy(down, 4, 0.01)
    write_run(exp, base, tmp_path / "base")
    hf.save(exp.model, tuned, tmp_path / "tuned")
    cli.main(["lora", "extract", "--base", f"run:{tmp_path / 'base'}",
              "--tuned", f"hf:{tmp_path / 'tuned'}", "--rank", "2", "--alpha", "8",
              "--targets", "q_proj,up_proj,down_proj", "--out", str(tmp_path / "peft"),
              "--run-dir", str(tmp_path / "extracted")])
    printed = {line.split()[0]: float(line.split()[1].rstrip("%"))
               for line in capsys.readouterr().out.splitlines() if "%" in line}

    # Exact rank 2: recovered to float32 precision, all of its energy kept.
    adapters, lcfg = load_adapter(tmp_path / "peft")
    assert (lcfg.rank, lcfg.alpha) == (2, 8.0)
    merged = lora.merge(base, adapters, lcfg)
    for group, mod in (("self_attn", "q_proj"), ("mlp", "up_proj")):
        np.testing.assert_allclose(merged["layers"][group][mod]["kernel"],
                                   tuned["layers"][group][mod]["kernel"], atol=1e-5)
        assert printed[f"layers/{group}/{mod}"] == pytest.approx(100.0, abs=1e-3)
    # Full rank: the best rank-2 approximation, per layer, and its share of the energy.
    d = np.asarray(tuned["layers"]["mlp"]["down_proj"]["kernel"] - down, np.float64)
    u, s, vt = np.linalg.svd(d, full_matrices=False)
    best = np.einsum("lik,lk,lkj->lij", u[..., :2], s[..., :2], vt[..., :2, :])
    np.testing.assert_allclose(merged["layers"]["mlp"]["down_proj"]["kernel"] - down, best,
                               atol=1e-6)
    frac = (s[:, :2] ** 2).sum() / (s ** 2).sum()
    assert printed["layers/mlp/down_proj"] == pytest.approx(100 * frac, abs=0.01)
    energy = {"down": (s ** 2).sum(), "low": sum(
        float(np.sum(np.square(np.asarray(tuned["layers"][g][m]["kernel"] - base["layers"][g][m]["kernel"],
                                          np.float64))))
        for g, m in (("self_attn", "q_proj"), ("mlp", "up_proj")))}
    overall = (frac * energy["down"] + energy["low"]) / (energy["down"] + energy["low"])
    assert printed["overall"] == pytest.approx(100 * overall, abs=0.01)

    # The jaxllm run over the base run: the model it loads is base + the extracted adapters.
    cfg, extracted, _, _ = load_model(str(tmp_path / "extracted"), None)
    assert config.load(tmp_path / "extracted" / "resolved.yaml").model.init_from == \
        f"run:{(tmp_path / 'base').resolve()}"
    np.testing.assert_allclose(_logits(extracted, cfg), _logits(merged, cfg), atol=1e-5)
