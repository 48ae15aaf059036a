"""`jaxllm convert` both ways, and training that starts from Hugging Face weights."""
import json

import jax
import numpy as np
import pytest

from jaxllm import cli, config, data
from jaxllm.interop import hf
from jaxllm.tasks import pretrain
from jaxllm.train.loop import run
from jaxllm.train.metrics import read_metrics

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=264, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)).eval()
    model.save_pretrained(d)
    return d, model


def test_convert_from_hf_and_back(hf_dir, tmp_path):
    src, model = hf_dir
    cli.main(["convert", "--from-hf", str(src), "--out", str(tmp_path / "run")])
    assert (tmp_path / "run" / "checkpoints" / "0").is_dir()
    cli.main(["convert", "--to-hf", str(tmp_path / "run"), "--out", str(tmp_path / "back")])
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "back").eval()
    tokens = torch.tensor(np.random.default_rng(0).integers(0, 264, (2, 12)))
    with torch.no_grad():
        np.testing.assert_array_equal(again(tokens).logits.numpy(), model(tokens).logits.numpy())


def test_training_starts_from_hf_weights(hf_dir, tmp_path):
    src, _ = hf_dir
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"text": "abc def " * (i % 7 + 3)}) + "\n"
                                              for i in range(60)))
    exp = config.load(None, [f"model.init_from=hf:{src}", f"data.sources=[{tmp_path / 'c.jsonl'}]",
                             "data.tokenizer.kind=byte", "data.seq_len=32", "train.steps=1",
                             "train.batch_size=8", f"run_dir={tmp_path / 'run'}",
                             "logging.progress_bar=false", "checkpoint.enabled=false",
                             "logging.plot=false", "logging.tensorboard=false"])
    assert exp.model.hidden_size == 64 and exp.model.num_kv_heads == 2  # shape from config.json
    run(exp)
    first = read_metrics(tmp_path / "run")[0]["loss"]
    batch = next(data.PretrainData.from_config(exp.data, run_dir=None, batch_size=8,
                                               seed=exp.seed).train_iterator())
    _, params = hf.load(src)
    expected = float(pretrain.loss(params, jax.tree.map(np.asarray, batch), exp.model)[0])
    assert first == pytest.approx(expected, rel=1e-5)


def test_bad_init_from_is_a_config_error(tmp_path):
    with pytest.raises(config.ConfigError, match="model.init_from: .*no config.json"):
        config.load(None, [f"model.init_from=hf:{tmp_path}"])
    with pytest.raises(config.ConfigError, match="expected 'hf:DIR' or 'run:DIR'"):
        config.load(None, ["model.init_from=somewhere"])
