"""Hugging Face round trips (Levanter style): a tiny random HF model saved by transformers,
loaded by us, logits compared; saved by us, reloaded by transformers, logits compared again."""
import json

import jax
import numpy as np
import pytest

from jaxllm import config, models, sharding
from jaxllm.interop import hf

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from test_model import HF_CASES, TINY, forward, hf_model  # noqa: E402


def hf_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.numpy()


@pytest.mark.parametrize("case", list(HF_CASES))
def test_round_trip_through_transformers(case, tmp_path):
    model, _, _ = hf_model(case)
    model.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="60KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()  # sharded read path
    cfg, params = hf.load(tmp_path / "hf")
    tokens = np.random.default_rng(1).integers(0, TINY["vocab_size"], (2, 20))
    ref = hf_logits(model, tokens)
    np.testing.assert_allclose(np.asarray(forward(params, tokens, cfg)[0]), ref, rtol=1e-4, atol=1e-5)

    out = hf.save(cfg, params, tmp_path / "ours", max_shard_bytes=50_000)
    assert json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    again = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(again).__name__ == HF_CASES[case][1]
    if case.startswith("mistral"):
        again.config._attn_implementation = "eager"
    np.testing.assert_allclose(hf_logits(again, tokens), ref, rtol=1e-4, atol=1e-5)


def test_load_onto_a_mesh_shards_params(tmp_path):
    model, _, _ = hf_model("llama3-gqa-rope-scaling")
    model.save_pretrained(tmp_path)
    mesh = sharding.make_mesh(sharding.with_sizes(config.MeshConfig(), fsdp=4, tensor=2))
    cfg, params = hf.load(tmp_path, mesh=mesh)
    q = params["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q.sharding.mesh.shape == mesh.shape and q.sharding.shard_shape(q.shape) != q.shape
    _, plain = hf.load(tmp_path)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, plain)


def test_unsupported_configs_are_refused_by_name(tmp_path):
    model, _, _ = hf_model("llama3-gqa-rope-scaling")
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    for change, message in [({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "'yarn'"),
                            ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
                            ({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"},
                             "GPT2LMHeadModel")]:
        (tmp_path / "config.json").write_text(json.dumps({**cfg, **change}))
        with pytest.raises(hf.HFFormatError, match=message):
            hf.load(tmp_path)
    with pytest.raises(hf.HFFormatError, match="no config.json"):
        hf.load(tmp_path / "nowhere")


def test_published_preset_configs_export_their_shapes():
    for name in ("llama3.1-8b", "qwen2.5-0.5b", "mistral-7b"):
        cfg = models.preset(name)
        back = hf.config_from_hf(hf.config_to_hf(cfg))
        assert back == cfg.replace(preset=None)
