"""Packing: documents' tokens -> fixed-length rows with segment ids and positions.

All documents (each with BOS/EOS when configured) are concatenated into one stream, and row r
is the stream's tokens [r*L, r*L + L + 1): rows overlap by one token so that inputs are
row[:-1] and targets row[1:], and every token after a document's first is a target exactly
once. A document longer than what is left of a row continues in the next row as a new
segment whose positions restart at 0 (with RoPE only position differences matter, and
attention cannot reach the earlier part anyway). The stream's tail is padded to a whole row
with pad tokens (segment 0). Rows depend only on the documents' tokens, never on a seed.

In a row: segment_ids number its documents from 1 (0 only on padding); positions count from 0
at each segment start; loss_mask is 1 where the target is the next token of the same document,
and there targets hold that token; elsewhere (a document's last token, padding) the target is
pad and the mask 0, so nothing is learned or attended across documents."""
from __future__ import annotations

import numpy as np

KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def token_stream(docs, bos: int | None, eos: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated tokens and, per token, the index of its document (both int32)."""
    parts, owners = [], []
    for i, ids in enumerate(docs):
        ids = np.asarray(ids, np.int32)
        if bos is not None:
            ids = np.concatenate([[bos], ids]).astype(np.int32)
        if eos is not None:
            ids = np.concatenate([ids, [eos]]).astype(np.int32)
        parts.append(ids)
        owners.append(np.full(len(ids), i, np.int32))
    if not parts:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(parts), np.concatenate(owners)


def pack_rows(tokens: np.ndarray, owners: np.ndarray, pad_id: int) -> dict[str, np.ndarray]:
    """[B, L+1] stream windows (owner -1 = padding) -> the model's [B, L] batch arrays."""
    inp, own, next_own = tokens[:, :-1], owners[:, :-1], owners[:, 1:]
    real = own >= 0
    changed = np.concatenate([np.ones_like(own[:, :1], bool), own[:, 1:] != own[:, :-1]], axis=1)
    starts = real & changed
    idx = np.broadcast_to(np.arange(own.shape[1], dtype=np.int32), own.shape)
    last_start = np.maximum.accumulate(np.where(starts, idx, 0), axis=1)
    mask = real & (next_own == own)
    return {
        "tokens": np.where(real, inp, pad_id).astype(np.int32),
        "targets": np.where(mask, tokens[:, 1:], pad_id).astype(np.int32),
        "segment_ids": np.where(real, np.cumsum(starts, axis=1), 0).astype(np.int32),
        "positions": np.where(real, idx - last_start, 0).astype(np.int32),
        "loss_mask": mask.astype(np.float32),
    }


class PackedRows:
    """Random access to the packed rows of a token stream; `batch(indices)` stacks rows."""

    def __init__(self, tokens: np.ndarray, owners: np.ndarray, seq_len: int, pad_id: int):
        self.seq_len, self.pad_id = seq_len, pad_id
        self.n = -(-(len(tokens) - 1) // seq_len) if len(tokens) > 1 else 0
        pad = self.n * seq_len + 1 - len(tokens) if self.n else 0
        self.tokens = np.concatenate([tokens, np.full(pad, pad_id, np.int32)])
        self.owners = np.concatenate([owners, np.full(pad, -1, np.int32)])

    def __len__(self) -> int:
        return self.n

    def batch(self, indices) -> dict[str, np.ndarray]:
        window = np.asarray(indices, np.int64)[:, None] * self.seq_len + np.arange(self.seq_len + 1)
        return pack_rows(self.tokens[window], self.owners[window], self.pad_id)

    def empty(self, count: int) -> dict[str, np.ndarray]:
        """Rows of pure padding (segment 0, loss_mask 0), to fill a partial batch."""
        shape = (count, self.seq_len + 1)
        return pack_rows(np.full(shape, self.pad_id, np.int32), np.full(shape, -1, np.int32),
                         self.pad_id)
