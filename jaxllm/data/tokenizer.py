"""Tokenizers behind one small interface: encode/decode plus bos/eos/pad ids and vocab size."""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable

from jaxllm.data.sources import DataError


class ByteTokenizer:
    """UTF-8 bytes shifted past three specials: pad=0, bos=1, eos=2 (vocab 259)."""
    pad_id, bos_id, eos_id = 0, 1, 2
    offset = 3
    vocab_size = 256 + offset

    def encode(self, text: str) -> list[int]:
        return [b + self.offset for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(i - self.offset for i in ids if i >= self.offset).decode("utf-8", "replace")


class SentencePieceTokenizer:
    def __init__(self, path: str | Path):
        import sentencepiece as spm
        path = Path(path)
        if not path.is_file():
            raise DataError(f"data.tokenizer.path: {path}: file not found")
        self.path = path
        self.sp = spm.SentencePieceProcessor(model_file=str(path))
        self.vocab_size = self.sp.get_piece_size()
        self.bos_id, self.eos_id = self.sp.bos_id(), self.sp.eos_id()
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return self.sp.encode(texts)

    def decode(self, ids) -> str:
        return self.sp.decode([int(i) for i in ids])


def train_sentencepiece(texts: Iterable[str], vocab_size: int, model_prefix: str | Path) -> Path:
    """Train a BPE sentencepiece model (pad 0, unk 1, bos 2, eos 3, byte fallback) in-process.

    Writes to a temporary name first and renames, so an interrupted run leaves no half model."""
    import sentencepiece as spm
    prefix = Path(model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(prefix.name + ".tmp")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(texts)), model_prefix=str(tmp), vocab_size=vocab_size,
        model_type="bpe", byte_fallback=True, character_coverage=1.0, pad_id=0, unk_id=1,
        bos_id=2, eos_id=3, num_threads=1, minloglevel=2, max_sentence_length=1 << 20,
        split_digits=True)
    out = prefix.with_name(prefix.name + ".model")
    Path(str(tmp) + ".model").replace(out)
    Path(str(tmp) + ".vocab").unlink(missing_ok=True)
    return out


def load_tokenizer(tok_cfg, run_dir: Path | None, train_texts: Callable[[], Iterable[str]] | None):
    """The configured tokenizer; a sentencepiece model with no path is trained into run_dir
    (and reused from there, so a resumed run keeps its tokenizer)."""
    if tok_cfg.kind == "byte":
        return ByteTokenizer()
    if tok_cfg.kind == "sentencepiece":
        if tok_cfg.path:
            return SentencePieceTokenizer(tok_cfg.path)
        if run_dir is None:
            raise DataError("data.tokenizer.path: needed when there is no run directory to train into")
        model = Path(run_dir) / "tokenizer.model"
        if not model.is_file():
            if train_texts is None:
                raise DataError(f"{model}: no trained tokenizer in the run directory")
            train_sentencepiece(train_texts(), tok_cfg.vocab_size, Path(run_dir) / "tokenizer")
        return SentencePieceTokenizer(model)
    raise DataError(f"data.tokenizer.kind: {tok_cfg.kind!r} tokenizers come with the Hugging Face "
                    "interop work; use 'byte' or 'sentencepiece'")
