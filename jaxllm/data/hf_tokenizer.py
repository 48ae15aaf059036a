"""Hugging Face tokenizers: tokenizer.json through the `tokenizers` library, with the special
tokens and chat template of the directory's tokenizer_config.json (chat_template.jinja and
special_tokens_map.json too, where present)."""
from __future__ import annotations

import json
from pathlib import Path

from jaxllm.data.chat_template import SPECIAL_NAMES, ChatMixin
from jaxllm.data.sources import DataError


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def read_tokenizer_config(directory: Path) -> tuple[dict, str | None]:
    """(named special tokens as text, chat template or None) from a model directory."""
    def read(name):
        f = directory / name
        try:
            return json.loads(f.read_text()) if f.is_file() else {}
        except json.JSONDecodeError as e:
            raise DataError(f"{f}: not valid JSON ({e})") from None
    config = read("tokenizer_config.json")
    special = {k: _token_text(config[k]) for k in SPECIAL_NAMES if k in config}
    if "added_tokens_decoder" not in config:  # legacy directory: this file wins (as transformers)
        special |= {k: _token_text(v) for k, v in read("special_tokens_map.json").items()}
    special = {k: v for k, v in special.items() if k in SPECIAL_NAMES and isinstance(v, str)}
    template = config.get("chat_template")
    if isinstance(template, list):  # named templates: the "default" one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    jinja = directory / "chat_template.jinja"  # where transformers >= 4.50 saves it
    if jinja.is_file():
        template = jinja.read_text()
    return special, template


class HFTokenizer(ChatMixin):
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
        self.special_tokens, self.chat_template = read_tokenizer_config(file.parent)
        self.vocab_size = self.tok.get_vocab_size()
        ids = {k: self.tok.token_to_id(v) for k, v in self.special_tokens.items()}
        self.bos_id, self.eos_id = ids.get("bos_token"), ids.get("eos_token")
        # Padding needs some id; it is masked everywhere, so EOS (or 0) serves when none is set.
        pad = ids.get("pad_token")
        self.pad_id = pad if pad is not None else (self.eos_id if self.eos_id is not None else 0)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    encode_special = encode  # added tokens in the text are matched by the library itself

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_token(self, i: int) -> str | None:
        return self.tok.id_to_token(int(i))
