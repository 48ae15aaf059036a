"""Tokenizers behind one small interface: encode/decode, bos/eos/pad ids, vocab size, and chat
templates (ChatMixin: apply_chat_template, assistant_spans, render_chat, encode_chat).

`encode(text)` never adds BOS/EOS (packing adds them per data.tokenizer.add_bos/add_eos) and
reads special-token strings as text; `encode_special(text)` maps them to their ids (for
rendered chats). `pad_id` fills padding and is never produced by `encode`.
`from_pretrained(path)` opens a tokenizer.json, a sentencepiece .model, or a model directory."""
from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from jaxllm.data.chat_template import ChatMixin, split_special
from jaxllm.data.sources import DataError


class ByteTokenizer(ChatMixin):
    """UTF-8 bytes shifted past three specials: pad=0, bos=1, eos=2 (vocab 259)."""
    pad_id, bos_id, eos_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset
    special_tokens = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>"}
    _special_ids = {"<pad>": 0, "<s>": 1, "</s>": 2}

    def encode_special(self, text: str) -> list[int]:
        return [i for part in split_special(text, self._special_ids)
                for i in ([part] if isinstance(part, int) else self.encode(part))]

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.offset

    def decode(self, ids) -> str:
        data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.vocab_size)
        return data.decode("utf-8", "replace")


class SentencePieceTokenizer(ChatMixin):
    """A sentencepiece model file; a model without a pad piece pads with id 0. A
    tokenizer_config.json beside it (a Hugging Face directory) gives the chat template."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm
        self.path = Path(path)
        if not self.path.is_file():
            raise DataError(f"data.tokenizer.path: {self.path}: file not found")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(self.path))
        except (RuntimeError, OSError) as e:
            raise DataError(f"data.tokenizer.path: {self.path}: not a sentencepiece model ({e})") from None
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0
        # Control pieces (<s>, </s>, <pad>) and <unk> never come out of sp.encode: rendered
        # chats name them as text, which encode_special maps back to their ids.
        self._special_ids = {self.sp.id_to_piece(i): i for i in range(self.vocab_size)
                             if self.sp.is_control(i) or self.sp.is_unknown(i)}
        names = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.sp.unk_id(),
                 "pad_token": self.sp.pad_id()}
        self.special_tokens = {k: self.sp.id_to_piece(i) for k, i in names.items() if i >= 0}
        from jaxllm.data.hf_tokenizer import read_tokenizer_config
        special, self.chat_template = read_tokenizer_config(self.path.parent)
        for text in special.values():  # e.g. a user-defined <|im_end|> piece
            i = self.sp.piece_to_id(text)
            if self.sp.id_to_piece(i) == text:
                self._special_ids[text] = i
        self.special_tokens |= special

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_special(self, text: str) -> list[int]:
        return [i for part in split_special(text, self._special_ids)
                for i in ([part] if isinstance(part, int) else self.sp.encode(part))]

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)  # in C++, over all cores

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def _chunks(texts: Iterable[str], max_chars: int = 1 << 16):
    """Texts cut at line ends into pieces of at most max_chars: the trainer silently skips
    'sentences' longer than max_sentence_length, so a long document is fed in parts."""
    for text in texts:
        piece = ""
        for line in text.splitlines(keepends=True):
            while len(line) > max_chars:
                yield line[:max_chars]
                line = line[max_chars:]
            if len(piece) + len(line) > max_chars:
                yield piece
                piece = ""
            piece += line
        if piece:
            yield piece


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_prefix: str | Path) -> Path:
    """Train a BPE sentencepiece model in-process; returns `<model_prefix>.model`.

    Ids: pad 0, unk 1, bos 2, eos 3. Lossless: no normalization, whitespace and newlines kept
    (code and indentation survive decode(encode(text))), bytes fall back to <0xNN> pieces.
    Deterministic: one thread, so the same texts and vocab size give the same model. Written
    under a temporary name and renamed, so concurrent trainers (one per host) and interrupted
    runs never leave a partial file."""
    import sentencepiece as spm
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    out = prefix.with_name(prefix.name + ".model")
    model = io.BytesIO()  # in memory, so no temporary path ends up in the model's trainer_spec
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=_chunks(texts), model_writer=model,
            vocab_size=vocab_size, model_type="bpe", byte_fallback=True,
            character_coverage=1.0, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=False, allow_whitespace_only_pieces=True, split_digits=True,
            max_sentence_length=1 << 20, num_threads=1, minloglevel=2)
    except RuntimeError as e:
        limit = re.search(r"<= (\d+)", str(e))
        if "too high" in str(e) and limit:
            raise DataError(f"data.tokenizer.vocab_size: {vocab_size} is too large for this "
                            f"corpus (at most {limit.group(1)})") from None
        raise DataError(f"sentencepiece training failed: {e}") from None
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    with os.fdopen(fd, "wb") as f:
        f.write(model.getvalue())
    os.replace(tmp, out)
    return out


def load_tokenizer(tok_cfg, run_dir: Path | None, train_texts: Callable[[], Iterable[str]] | None):
    """The configured tokenizer. A sentencepiece model with no path is trained on
    `train_texts()` into run_dir/tokenizer.model, and reused from there when it exists, so a
    resumed run keeps its tokenizer."""
    if tok_cfg.kind == "byte":
        return ByteTokenizer()
    if tok_cfg.kind == "hf":
        if not tok_cfg.path:
            raise DataError("data.tokenizer.path: kind hf needs a tokenizer.json or a model dir")
        return from_pretrained(tok_cfg.path)
    if tok_cfg.kind != "sentencepiece":
        raise DataError(f"data.tokenizer.kind: unknown kind {tok_cfg.kind!r}")
    if tok_cfg.path:
        return SentencePieceTokenizer(tok_cfg.path)
    if run_dir is None:
        raise DataError("data.tokenizer.path: needed when there is no run directory to train into")
    model = Path(run_dir) / "tokenizer.model"
    if model.is_file():
        tok = SentencePieceTokenizer(model)
        if tok.vocab_size != tok_cfg.vocab_size:
            raise DataError(f"{model}: has {tok.vocab_size} pieces but data.tokenizer.vocab_size="
                            f"{tok_cfg.vocab_size} (delete it to retrain, or use another run_dir)")
        return tok
    if train_texts is None:
        raise DataError(f"{model}: no trained tokenizer in the run directory")
    return SentencePieceTokenizer(train_sentencepiece(train_texts(), tok_cfg.vocab_size,
                                                      Path(run_dir) / "tokenizer"))


def from_pretrained(path: str | Path):
    """The tokenizer of a Hugging Face model directory (its tokenizer.json, else its
    tokenizer.model), or of a tokenizer.json / sentencepiece .model file."""
    path = Path(path)
    if path.is_dir():
        for name in ("tokenizer.json", "tokenizer.model"):
            if (path / name).is_file():
                return from_pretrained(path / name)
        raise DataError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    if path.suffix == ".json":
        from jaxllm.data.hf_tokenizer import HFTokenizer
        return HFTokenizer(path)
    return SentencePieceTokenizer(path)
