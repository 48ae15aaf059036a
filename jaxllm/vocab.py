"""Vocabulary extension for continued pretraining in a new language or domain.

A sentencepiece model is trained on the new text; the pieces the base tokenizer lacks are
appended to it (after all its own pieces, so every old id keeps its meaning and old text
still tokenizes the same way where the new pieces do not apply); the embedding and output
matrices grow by as many rows, initialised to the mean of the old rows (a neutral start that
keeps the output distribution near the old one)."""
from __future__ import annotations

import tempfile
from pathlib import Path

import jax.numpy as jnp

from jaxllm.data.tokenizer import train_sentencepiece


def extend_sentencepiece(base_model: str | Path, texts, new_pieces: int, out: str | Path):
    """Write base + the missing pieces of a `new_pieces`-piece model trained on `texts` to `out`;
    returns (out path, number of pieces added)."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    base = spm_pb2.ModelProto()
    base.ParseFromString(Path(base_model).read_bytes())
    with tempfile.TemporaryDirectory() as tmp:
        new = spm_pb2.ModelProto()
        new.ParseFromString(train_sentencepiece(texts, new_pieces, Path(tmp) / "new").read_bytes())
    have = {p.piece for p in base.pieces}
    lowest = min(p.score for p in base.pieces)
    added = 0
    for p in new.pieces:  # in the new model's merge order
        if p.type == spm_pb2.ModelProto.SentencePiece.NORMAL and p.piece not in have:
            piece = base.pieces.add()
            piece.piece, piece.type = p.piece, p.type
            piece.score = lowest - 1 - added  # merged after every base piece
            have.add(p.piece)
            added += 1
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(base.SerializeToString())
    return out, added


def resize_vocab(params: dict, new_vocab: int) -> dict:
    """Params with embed_tokens (and an untied lm_head) grown to new_vocab; new rows are the
    mean of the old ones, old rows unchanged."""
    out = dict(params)
    emb = params["embed_tokens"]["embedding"]
    extra = new_vocab - emb.shape[0]
    if extra < 0:
        raise ValueError(f"resize_vocab: {new_vocab} is smaller than the current {emb.shape[0]}")
    rows = jnp.broadcast_to(emb.mean(0, keepdims=True), (extra, emb.shape[1])).astype(emb.dtype)
    out["embed_tokens"] = {"embedding": jnp.concatenate([emb, rows])}
    if "lm_head" in params:
        w = params["lm_head"]["kernel"]  # [hidden, vocab]
        cols = jnp.broadcast_to(w.mean(1, keepdims=True), (w.shape[0], extra)).astype(w.dtype)
        out["lm_head"] = {"kernel": jnp.concatenate([w, cols], axis=1)}
    return out
