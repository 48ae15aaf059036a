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

from jaxllm.data.sources import DataError
from jaxllm.data.tokenizer import train_sentencepiece


def extend_sentencepiece(base_model: str | Path, texts, new_pieces: int, out: str | Path):
    """Write base + the missing pieces of a `new_pieces`-piece model trained on `texts` to `out`;
    returns (out path, ids of the added pieces). Old ids keep their pieces."""
    from sentencepiece import sentencepiece_model_pb2 as spm_pb2
    base = spm_pb2.ModelProto()
    base.ParseFromString(Path(base_model).read_bytes())
    if base.trainer_spec.model_type != spm_pb2.TrainerSpec.BPE:
        # Appended pieces rank after the base's merges; a unigram model has no such order.
        raise DataError(f"{base_model}: only BPE sentencepiece models can be extended")
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
    return out, list(range(len(base.pieces) - added, len(base.pieces)))


def resize_vocab(params: dict, new_vocab: int, new_ids=None, mean_of: int | None = None) -> dict:
    """Params with embed_tokens (and an untied lm_head) grown to new_vocab rows. The rows of
    new_ids (default: the added rows) become the mean of the first `mean_of` rows (default:
    all the old ones); every other row is kept as it was."""
    out = dict(params)
    emb = params["embed_tokens"]["embedding"]
    old = emb.shape[0]
    if new_vocab < old:
        raise ValueError(f"resize_vocab: {new_vocab} is smaller than the current {old}")
    ids = jnp.arange(old, new_vocab) if new_ids is None else jnp.asarray(new_ids, jnp.int32)
    n = old if mean_of is None else mean_of

    def grow(w):  # [vocab, hidden]
        w = jnp.concatenate([w, jnp.zeros((new_vocab - old, w.shape[1]), w.dtype)])
        mean = w[:n].astype(jnp.float32).mean(0).astype(w.dtype)
        return w.at[ids].set(jnp.broadcast_to(mean, (ids.shape[0], w.shape[1])))

    out["embed_tokens"] = {"embedding": grow(emb)}
    if "lm_head" in params:  # kernel [hidden, vocab]
        out["lm_head"] = {"kernel": grow(params["lm_head"]["kernel"].T).T}
    return out
