"""Tokenizers behind one small interface: encode/decode plus bos/eos/pad ids and vocab size.

`encode(text)` never adds BOS/EOS (packing adds them per data.tokenizer.add_bos/add_eos);
`pad_id` fills padding and is never produced by `encode`."""
from __future__ import annotations

import io
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from jaxllm.data.sources import DataError


class ByteTokenizer:
    """UTF-8 bytes shifted past three specials: pad=0, bos=1, eos=2 (vocab 259)."""
    pad_id, bos_id, eos_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def encode_array(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.offset

    def decode(self, ids) -> str:
        data = bytes(int(i) - self.offset for i in ids if self.offset <= int(i) < self.vocab_size)
        return data.decode("utf-8", "replace")


class SentencePieceTokenizer:
    """A sentencepiece model file; a model without a pad piece pads with id 0."""

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

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

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
        from jaxllm.data.hf_tokenizer import HFTokenizer
        return HFTokenizer(tok_cfg.path)
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
