"""tokenizer.json + chat templates against transformers; generate/chat CLIs; sampling on a mesh."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm import models, sharding
from jaxllm.config import MeshConfig, ShardingRules
from jaxllm.data.hf_tokenizer import HFTokenizer
from jaxllm.generate import generate

transformers = pytest.importorskip("transformers")

CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokens",
        "reverse the word and answer", "what is the capital of france? paris"] * 20


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers, trainers, decoders
    d = tmp_path_factory.mktemp("tok")
    tok = Tokenizer(tmodels.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(vocab_size=300, special_tokens=specials,
                                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>",
        "chat_template": CHATML, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return d


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "hello tokens"}, {"role": "user", "content": "the fox?"},
        {"role": "assistant", "content": "jumps over"}]


def test_encode_and_chat_template_match_transformers(tok_dir):
    ours = HFTokenizer(tok_dir)
    ref = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    for text in ["the lazy fox, hello!", "paris is the capital"]:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ours.encode(text)) == text
    for gen in (False, True):
        msgs = CHAT[:4] if gen else CHAT
        assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == \
            ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert (ours.bos_id, ours.eos_id) == (ref.bos_token_id, ref.eos_token_id)


def test_assistant_turns_are_the_trained_spans(tok_dir):
    tok = HFTokenizer(tok_dir)
    spans = tok.render_chat(CHAT)
    trained = [tok.tok.decode(ids, skip_special_tokens=False) for ids, t in spans if t]
    assert trained == ["hello tokens<|im_end|>\n", "jumps over<|im_end|>\n"]
    whole = [i for ids, _ in spans for i in ids]
    assert tok.tok.decode(whole, skip_special_tokens=False) == tok.apply_chat_template(CHAT)


@pytest.fixture(scope="module")
def hf_dir(tok_dir, tmp_path_factory):
    """A tiny random Llama saved by our exporter, with the tokenizer beside it."""
    from jaxllm.interop import hf
    cfg = models.ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2,
                             num_heads=4, num_kv_heads=2, max_seq_len=128)
    params = models.init(cfg, jax.random.key(0))
    d = tmp_path_factory.mktemp("hf")
    hf.save(cfg, params, d, tokenizer_from=tok_dir)
    return d, cfg, params


def run_cli(capsys, monkeypatch, *args, stdin=""):
    """jaxllm's CLI in this process (no second jax start-up): (exit code, stdout, stderr)."""
    import io

    from jaxllm import cli
    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    code = 0
    try:
        cli.main(list(args))
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_generate_and_chat_cli_from_a_hugging_face_directory(hf_dir, capsys, monkeypatch):
    d, cfg, params = hf_dir
    tok = HFTokenizer(d)
    code, out, err = run_cli(capsys, monkeypatch, "generate", "--hf", str(d), "--prompt",
                             "hello world", "--max-new-tokens", "6")
    assert code == 0, err[-2000:]
    want = generate(params, cfg, [[tok.bos_id] + tok.encode("hello world")], max_new_tokens=6,
                    stop_tokens=[tok.eos_id])
    ids = [int(t) for t in want["tokens"][0][:want["lengths"][0]] if t != tok.eos_id]
    assert out.strip() == f"'hello world' -> {tok.decode(ids)!r}"

    code, out, err = run_cli(capsys, monkeypatch, "chat", "--hf", str(d), "--max-new-tokens", "5",
                             stdin="hello\nthe fox?\n/exit\nnever read\n")
    assert code == 0, err[-2000:]
    replies = out.splitlines()
    prompt = [i for ids, _ in tok.render_chat([{"role": "user", "content": "hello"}], True) for i in ids]
    first = generate(params, cfg, [prompt], max_new_tokens=5, stop_tokens=[tok.eos_id])
    ids = [int(t) for t in first["tokens"][0][:first["lengths"][0]] if t != tok.eos_id]
    assert len(replies) == 2 and replies[0] == tok.decode(ids)

    code, _, err = run_cli(capsys, monkeypatch, "generate", "--hf", "/no/such/dir", "--prompt", "x")
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1


def test_sampling_on_a_mesh_equals_one_device(hf_dir):
    _, cfg, params = hf_dir
    rules = ShardingRules()
    mesh = sharding.make_mesh(sharding.with_sizes(MeshConfig(), data=2, fsdp=2, tensor=2))
    prompts = np.random.default_rng(0).integers(5, 300, (4, 7)).tolist()
    prompts[1] = prompts[1][:3]  # different lengths: left padding
    ref = generate(params, cfg, prompts, max_new_tokens=8, temperature=0.8,
                   key=jax.random.key(3))
    sharded = models.init_sharded(cfg, jax.random.key(0), mesh, rules)
    assert len(sharded["layers"]["mlp"]["up_proj"]["kernel"].sharding.device_set) == 8
    with sharding.use(mesh, rules):
        out = generate(sharded, cfg, prompts, max_new_tokens=8, temperature=0.8,
                       key=jax.random.key(3))
    np.testing.assert_array_equal(out["tokens"], ref["tokens"])
    np.testing.assert_allclose(out["logprobs"], ref["logprobs"], atol=1e-4)
