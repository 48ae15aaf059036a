"""One tokenizer interface over tokenizer.json and sentencepiece models, checked against
transformers: encode/decode, special tokens, chat templates (rendered text, token ids, and the
assistant-token masks of `{% generation %}` templates); then `jaxllm generate` / `jaxllm chat`
from a Hugging Face directory."""
import io
import json

import jax
import numpy as np
import pytest

from jaxllm import models
from jaxllm.data import ByteTokenizer, DataError, SentencePieceTokenizer, train_sentencepiece
from jaxllm.data.chat_template import FALLBACK_TEMPLATE
from jaxllm.data.hf_tokenizer import HFTokenizer
from jaxllm.data.sources import builtin_pydoc
from jaxllm.data.tokenizer import from_pretrained
from jaxllm.generate import generate

transformers = pytest.importorskip("transformers")

CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
          "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# The same chat with assistant turns marked, as transformers' return_assistant_tokens_mask needs.
CHATML_MARKED = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}<|im_end|>\n"
    "{% endgeneration %}{% else %}{{ m['content'] }}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# Jinja features real templates use: namespace, loop controls, filters, tojson on non-ASCII,
# tools, raise_exception, strftime_now, an undefined pad_token, trim/lstrip whitespace rules.
FEATURES = """{%- set ns = namespace(turns=0) -%}
{%- for m in messages %}
    {%- if m['role'] == 'system' and not loop.first -%}
        {{ raise_exception('System message must come first') }}
    {%- endif %}
    {% if m['role'] == 'tool' %}{% continue %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
[{{ m['role'] | upper }}] {{ m['content'] | trim }}
    {% if m.get('meta') %}
meta: {{ m['meta'] | tojson }}
    {% endif %}
{% endfor %}
{% if tools %}tools: {{ tools | tojson(indent=2) }}
{% endif %}
{% if pad_token is defined %}pad {{ pad_token }}{% else %}no pad{% endif %}
 turns={{ ns.turns }} year={{ strftime_now('%Y') }}{{ eos_token }}
{%- if add_generation_prompt %}[ASSISTANT] {% endif %}"""

TEXT = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokens",
        "reverse the word and answer", "what is the capital of france? paris"] * 20
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"},
        {"role": "assistant", "content": "hello tokens"}, {"role": "user", "content": "the fox?"},
        {"role": "assistant", "content": "jumps over"}]


def write_hf_tokenizer(d, template=CHATML):
    """A small byte-level BPE trained here, saved as tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models as tmodels, pre_tokenizers, trainers
    tok = Tokenizer(tmodels.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(TEXT, trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "<|im_end|>", "unk_token": "<unk>",
        "chat_template": template, "tokenizer_class": "PreTrainedTokenizerFast"}))
    return d


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return write_hf_tokenizer(tmp_path_factory.mktemp("tok"))


def with_template(tok, template):
    tok.chat_template = template
    return tok


def test_hf_tokenizer_encodes_and_renders_chats_like_transformers(tok_dir):
    ours = HFTokenizer(tok_dir)
    ref = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    for text in ["the lazy fox, hello!", "paris is the capital", "<|im_start|>user\nhi<|im_end|>"]:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text), skip_special_tokens=True)
    assert (ours.bos_id, ours.eos_id, ours.pad_id) == (ref.bos_token_id, ref.eos_token_id,
                                                       ref.eos_token_id)  # no pad: EOS pads
    for gen, msgs in ((False, CHAT), (True, CHAT[:4])):
        text = ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
        assert ours.apply_chat_template(msgs, add_generation_prompt=gen) == text
        ids, _ = ours.encode_chat(msgs, add_generation_prompt=gen)
        assert ids == ref.apply_chat_template(msgs, add_generation_prompt=gen)["input_ids"]


def test_template_features_render_like_transformers(tok_dir):
    ours = with_template(HFTokenizer(tok_dir), FEATURES)
    ref = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    chat = [{"role": "system", "content": "  be brief "}, {"role": "tool", "content": "skipped"},
            {"role": "user", "content": "héllo", "meta": {"lang": "français", "n": [1, 2]}},
            {"role": "assistant", "content": "hi", "meta": None}]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"a": "int"}}}]
    for kw in ({}, {"add_generation_prompt": True}, {"tools": tools}):
        want = ref.apply_chat_template(chat, tokenize=False, chat_template=FEATURES, **kw)
        assert ours.apply_chat_template(chat, **kw) == want
    assert "meta: {\"lang\": \"français\"" in want and "no pad" in want
    bad = chat[2:] + chat[:1]
    with pytest.raises(Exception, match="System message must come first"):
        ref.apply_chat_template(bad, tokenize=False, chat_template=FEATURES)
    with pytest.raises(DataError, match="chat template: System message must come first"):
        ours.apply_chat_template(bad)


def test_generation_blocks_give_transformers_assistant_masks(tok_dir):
    ours = with_template(HFTokenizer(tok_dir), CHATML_MARKED)
    ref = transformers.AutoTokenizer.from_pretrained(str(tok_dir))
    want = ref.apply_chat_template(CHAT, chat_template=CHATML_MARKED, return_dict=True,
                                   return_assistant_tokens_mask=True)
    ids, mask = ours.encode_chat(CHAT)
    assert ids == want["input_ids"] and mask == want["assistant_masks"]
    assert sum(mask) > 0
    # Without the markers the assistant turns are found by rendering growing prefixes: the
    # same tokens, the same mask.
    assert HFTokenizer(tok_dir).encode_chat(CHAT) == (ids, mask)
    text, spans = HFTokenizer(tok_dir).assistant_spans(CHAT)
    assert [text[a:b] for a, b in spans] == ["hello tokens<|im_end|>\n", "jumps over<|im_end|>\n"]


def test_templates_that_rewrite_earlier_turns_need_generation_blocks(tok_dir):
    unstable = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    tok = with_template(HFTokenizer(tok_dir), unstable)
    with pytest.raises(DataError, match="generation"):
        tok.render_chat(CHAT[1:3])
    with pytest.raises(DataError, match="chat template: line 1"):
        with_template(HFTokenizer(tok_dir), "{% for m in messages %}").apply_chat_template(CHAT)


def test_sentencepiece_tokenizer_matches_transformers(tmp_path):
    from transformers.tokenization_utils_sentencepiece import SentencePieceBackend
    model = train_sentencepiece(builtin_pydoc()[:40], 500, tmp_path / "tokenizer")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>",
        "chat_template": FALLBACK_TEMPLATE}))
    ours = from_pretrained(tmp_path)
    assert isinstance(ours, SentencePieceTokenizer) and ours.chat_template == FALLBACK_TEMPLATE
    ref = SentencePieceBackend(vocab_file=str(model), bos_token="<s>", eos_token="</s>",
                               unk_token="<unk>", pad_token="<pad>", chat_template=FALLBACK_TEMPLATE)
    for text in ["The for statement\n  is used.  x = 1", "hello world"]:
        assert ours.encode(text) == ref.encode(text, add_special_tokens=False)
        assert ours.decode(ours.encode(text)) == ref.decode(ref.encode(text, add_special_tokens=False)) == text
    # Special-token strings: text to plain encode (data), ids in rendered chats, as transformers.
    mixed = "hello </s> world<s>"
    assert ours.encode_special(mixed) == ref.encode(mixed, add_special_tokens=False)
    assert ours.eos_id not in ours.encode(mixed)
    text = ref.apply_chat_template(CHAT, tokenize=False)
    assert ours.apply_chat_template(CHAT) == text
    assert ours.encode_special(text) == ref.apply_chat_template(CHAT)["input_ids"]
    pieces = ours.render_chat(CHAT)
    assert [ours.decode(ids) for ids, t in pieces if t] == ["hello tokens", "jumps over"]
    assert all(ids[-1] == ours.eos_id for ids, t in pieces if t)  # each turn's EOS is trained


def test_fallback_template_and_loading_by_path(tok_dir, tmp_path):
    byte = ByteTokenizer()
    ids, mask = byte.encode_chat(CHAT[1:3], add_generation_prompt=False)
    enc = byte.encode
    head = [byte.bos_id] + enc("<|user|>\nhello world") + [byte.eos_id] + enc("<|assistant|>\n")
    assert ids == head + enc("hello tokens") + [byte.eos_id]
    assert mask == [0] * len(head) + [1] * (len(ids) - len(head))
    prompt, _ = byte.encode_chat(CHAT[1:2], add_generation_prompt=True)
    assert prompt == head
    assert isinstance(from_pretrained(tok_dir), HFTokenizer)
    assert isinstance(from_pretrained(tok_dir / "tokenizer.json"), HFTokenizer)
    with pytest.raises(DataError, match="no tokenizer.json or tokenizer.model"):
        from_pretrained(tmp_path)


# ----------------------------------------------------------------------------- CLI

@pytest.fixture(scope="module")
def hf_dir(tok_dir, tmp_path_factory):
    """A tiny random Llama saved by our exporter, with the tokenizer beside it."""
    from jaxllm.interop import hf
    cfg = models.ModelConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_layers=2,
                             num_heads=4, num_kv_heads=2, max_seq_len=64)
    d = tmp_path_factory.mktemp("hf")
    rng = np.random.default_rng(0)  # random weights without compiling the model's init
    params = jax.tree.map(lambda s: rng.normal(0, 0.2, s.shape).astype(s.dtype),
                          models.abstract_params(cfg))
    hf.save(cfg, params, d, tokenizer_from=tok_dir)
    return d


def run_cli(capsys, monkeypatch, *args, stdin=""):
    """jaxllm's CLI in this process (no second jax start-up): (exit code, stdout, stderr)."""
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
    from jaxllm import sharding
    from jaxllm.cli_generate import load_model
    cfg, params, tok, stops, mesh_rules = load_model(None, str(hf_dir), with_mesh=True)
    assert stops == [tok.eos_id] and len(mesh_rules[0].devices.flat) == len(jax.devices())

    def reply(prompt, chat=False):  # what the CLI should answer, computed here
        with sharding.use(*mesh_rules):  # chat streams, and pads prompts to 64 (one compile)
            out = generate(params, cfg, [prompt], max_new_tokens=6, stop_tokens=stops,
                           on_token=(lambda *a: None) if chat else None,
                           pad_multiple=64 if chat else 16)
        return tok.decode([t for t in out["tokens"][0][:out["lengths"][0]] if t not in stops])

    code, out, err = run_cli(capsys, monkeypatch, "generate", "--hf", str(hf_dir), "--prompt",
                             "hello world", "--max-new-tokens", "6")
    assert code == 0, err[-2000:]
    assert out == f"'hello world' -> {reply([tok.bos_id] + tok.encode('hello world'))!r}\n"

    code, out, err = run_cli(capsys, monkeypatch, "chat", "--hf", str(hf_dir), "--max-new-tokens",
                             "6", stdin="hello\n\nthe fox?\n/exit\nnever read\n")
    assert code == 0, err[-2000:]
    history = [{"role": "user", "content": "hello"}]
    first = reply(tok.encode_chat(history, add_generation_prompt=True)[0], chat=True)
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "the fox?"}]
    second = reply(tok.encode_chat(history, add_generation_prompt=True)[0], chat=True)
    assert out == f"{first}\n{second}\n"  # streamed text ends up exactly the replies

    for args in (["generate", "--hf", "/no/such/dir", "--prompt", "x"],
                 ["generate", "--hf", str(hf_dir), "--prompt", "x", "--top-p", "0"],
                 ["chat", "--hf", str(hf_dir), "--max-new-tokens", "6"]):
        code, _, err = run_cli(capsys, monkeypatch, *args, stdin="the fox? " * 40 + "\n")
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err


def test_generate_cli_serves_a_bfloat16_model(hf_dir, capsys, monkeypatch):
    from jaxllm import sharding
    from jaxllm.cli_generate import load_model
    cfg, params, tok, stops, mesh_rules = load_model(None, str(hf_dir), with_mesh=True,
                                                     dtype="bfloat16")
    assert (cfg.param_dtype, cfg.compute_dtype) == ("bfloat16", "bfloat16")
    assert {str(a.dtype) for a in jax.tree.leaves(params)} == {"bfloat16"}
    with sharding.use(*mesh_rules):
        out = generate(params, cfg, [[tok.bos_id] + tok.encode("the fox")], max_new_tokens=6,
                       stop_tokens=stops)
    want = tok.decode([t for t in out["tokens"][0][:out["lengths"][0]] if t not in stops])
    import jaxllm.generate
    seen = []  # what the CLI samples from (the text alone could match a float32 model's)

    def spy(params, cfg, *args, **kw):
        seen.append((cfg.compute_dtype, {str(a.dtype) for a in jax.tree.leaves(params)}))
        return generate(params, cfg, *args, **kw)
    monkeypatch.setattr(jaxllm.generate, "generate", spy)
    code, out, err = run_cli(capsys, monkeypatch, "generate", "--hf", str(hf_dir), "--prompt",
                             "the fox", "--max-new-tokens", "6", "--dtype", "bfloat16")
    assert code == 0, err[-2000:]
    assert out == f"'the fox' -> {want!r}\n" and seen == [("bfloat16", {"bfloat16"})]


def test_chat_history_drops_the_oldest_turns_when_full():
    from jaxllm.cli_generate import _chat_prompt
    tok = ByteTokenizer()
    msgs = [{"role": "system", "content": "s"}]
    for i in range(3):
        msgs += [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": "x" * 20}]
    msgs.append({"role": "user", "content": "last"})
    full = len(tok.encode_chat(msgs, add_generation_prompt=True)[0])
    ids = _chat_prompt(tok, msgs, max_len=full - 1)
    assert [m["content"] for m in msgs] == ["s", "question 1", "x" * 20, "question 2", "x" * 20, "last"]
    assert ids == tok.encode_chat(msgs, add_generation_prompt=True)[0] and len(ids) < full - 1
