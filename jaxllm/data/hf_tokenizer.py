"""Hugging Face tokenizers: tokenizer.json through the `tokenizers` library, the special
tokens and chat template from tokenizer_config.json, rendered with jinja2 the way
transformers renders them (sandboxed, trim_blocks/lstrip_blocks, raise_exception, tojson)."""
from __future__ import annotations

import json
from pathlib import Path

from jaxllm.data.sources import DataError

# Used when a tokenizer has no template of its own (ChatML-style headers, EOS ends a turn).
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{{ eos_token }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def render_template(template: str, messages: list[dict], **context) -> str:
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    return env.from_string(template).render(messages=messages, **context)


class HFTokenizer:
    """tokenizer.json (a file, or a model directory holding it and tokenizer_config.json)."""

    def __init__(self, path: str | Path):
        from tokenizers import Tokenizer
        path = Path(path)
        file = path / "tokenizer.json" if path.is_dir() else path
        if not file.is_file():
            raise DataError(f"data.tokenizer.path: {file}: file not found")
        try:
            self.tok = Tokenizer.from_file(str(file))
        except Exception as e:  # the library's own message says what is wrong
            raise DataError(f"{file}: not a tokenizers JSON file ({e})") from None
        cfg_file = file.parent / "tokenizer_config.json"
        self.config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        self.vocab_size = self.tok.get_vocab_size()
        self.special = {k: _token_text(self.config.get(k)) for k in
                        ("bos_token", "eos_token", "pad_token", "unk_token")}
        ids = {k: (self.tok.token_to_id(v) if v else None) for k, v in self.special.items()}
        self.bos_id, self.eos_id = ids["bos_token"], ids["eos_token"]
        self.pad_id = ids["pad_token"] if ids["pad_token"] is not None else (self.eos_id or 0)
        template = self.config.get("chat_template")
        if isinstance(template, list):  # named templates: the "default" one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.chat_template = template or FALLBACK_TEMPLATE

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False) -> str:
        """The chat as text, as transformers' apply_chat_template(tokenize=False) gives it."""
        return render_template(self.chat_template, messages,
                               add_generation_prompt=add_generation_prompt,
                               **{k: v or "" for k, v in self.special.items()})

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = False):
        """[(ids, trained)]: each assistant message's text as the template renders it (its
        end-of-turn token included) is trained; headers and other turns are not. Found by
        rendering growing prefixes of the chat, so any prefix-stable template works."""
        spans, done = [], ""
        for i, m in enumerate(messages):
            if m["role"] == "assistant":
                head = self.apply_chat_template(messages[:i], add_generation_prompt=True)
                spans.append((head[len(done):], False))
                done = head
            text = self.apply_chat_template(messages[: i + 1])
            if not text.startswith(done):
                raise DataError("chat template is not prefix-stable: cannot find the assistant "
                                "turns' tokens")
            spans.append((text[len(done):], m["role"] == "assistant"))
            done = text
        if add_generation_prompt:
            spans.append((self.apply_chat_template(messages, True)[len(done):], False))
        return [(self.encode(t), trained) for t, trained in spans if t]
