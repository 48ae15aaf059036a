"""Pretraining data: documents -> tokens -> packed rows -> seeded, sharded grain batches.

Packing concatenates documents (each with BOS/EOS) into one stream and cuts it into rows of
seq_len + 1 tokens that overlap by one, so inputs are row[:-1] and targets row[1:] with no
padding. Segment ids number the documents inside a row (from 1); positions restart at 0 at
each document start and at each row start (a document continued from the previous row starts
a new segment, since it cannot see its earlier part anyway). A target that belongs to another
document than its input gets loss_mask 0, so nothing is learned across document boundaries."""
from __future__ import annotations

from pathlib import Path

import grain
import jax
import numpy as np

from jaxllm.data.sources import DataError, read_documents
from jaxllm.data.tokenizer import load_tokenizer


def split_documents(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train indices, eval indices): a seeded draw per document, at least one of each."""
    if n == 1 or eval_fraction <= 0:
        return np.arange(n), np.arange(0)
    is_eval = np.random.default_rng([seed, 1234]).random(n) < eval_fraction
    if not is_eval.any():
        is_eval[-1] = True
    if is_eval.all():
        is_eval[0] = False
    return np.flatnonzero(~is_eval), np.flatnonzero(is_eval)


def token_stream(docs: list[list[int]], bos: int | None, eos: int | None):
    """Concatenated tokens and, per token, the index of its document (both int32 arrays)."""
    parts, owners = [], []
    for i, ids in enumerate(docs):
        ids = ([bos] if bos is not None else []) + list(ids) + ([eos] if eos is not None else [])
        parts.append(np.asarray(ids, np.int32))
        owners.append(np.full(len(ids), i, np.int32))
    if not parts:
        return np.zeros(0, np.int32), np.zeros(0, np.int32)
    return np.concatenate(parts), np.concatenate(owners)


def pack_row(tokens: np.ndarray, owners: np.ndarray) -> dict[str, np.ndarray]:
    """One row of seq_len + 1 stream tokens -> the model inputs for seq_len positions."""
    inp, tgt = tokens[:-1], tokens[1:]
    own = owners[:-1]
    starts = np.concatenate([[True], own[1:] != own[:-1]])
    seg = np.cumsum(starts).astype(np.int32)
    idx = np.arange(len(inp))
    positions = (idx - np.maximum.accumulate(np.where(starts, idx, 0))).astype(np.int32)
    return {"tokens": inp, "targets": tgt, "segment_ids": seg, "positions": positions,
            "loss_mask": (owners[1:] == own).astype(np.float32)}


class PackedRows:
    """Random access to the packed rows of a token stream."""

    def __init__(self, tokens: np.ndarray, owners: np.ndarray, seq_len: int):
        self.tokens, self.owners, self.seq_len = tokens, owners, seq_len
        self.n = max(0, (len(tokens) - 1) // seq_len)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        s = int(i) * self.seq_len
        return pack_row(self.tokens[s:s + self.seq_len + 1], self.owners[s:s + self.seq_len + 1])


class PretrainData:
    """Train and eval batches (host-local numpy dicts of [batch_size, seq_len] arrays)."""

    def __init__(self, data_cfg, tokenizer, train_docs: list[str], eval_docs: list[str], *,
                 batch_size: int, seed: int, process_index: int = 0, process_count: int = 1):
        self.cfg, self.tokenizer = data_cfg, tokenizer
        self.batch_size, self.seed = batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        self.train_rows = self._rows(train_docs)
        self.eval_rows = self._rows(eval_docs)
        if len(self.train_rows) < batch_size * process_count:
            raise DataError(
                f"data.sources: the corpus packs into {len(self.train_rows)} training rows of "
                f"{data_cfg.seq_len} tokens, fewer than one global batch of "
                f"{batch_size * process_count}; add text or lower train.batch_size/data.seq_len")

    @classmethod
    def from_config(cls, data_cfg, *, run_dir: Path | None, batch_size: int, seed: int,
                    process_index: int = 0, process_count: int = 1) -> "PretrainData":
        docs = read_documents(data_cfg)
        train_idx, eval_idx = split_documents(len(docs), data_cfg.eval_fraction, seed)
        train_docs = [docs[i] for i in train_idx]
        tokenizer = load_tokenizer(data_cfg.tokenizer, run_dir, lambda: train_docs)
        return cls(data_cfg, tokenizer, train_docs, [docs[i] for i in eval_idx],
                   batch_size=batch_size, seed=seed, process_index=process_index,
                   process_count=process_count)

    def _rows(self, docs: list[str]) -> PackedRows:
        tok, tcfg = self.tokenizer, self.cfg.tokenizer
        encode = getattr(tok, "encode_batch", None)
        ids = encode(docs) if encode else [tok.encode(d) for d in docs]
        tokens, owners = token_stream(ids, tok.bos_id if tcfg.add_bos else None,
                                      tok.eos_id if tcfg.add_eos else None)
        return PackedRows(tokens, owners, self.cfg.seq_len)

    def train_iterator(self):
        """An endless, seeded stream of batches; get_state()/set_state() resume it exactly.

        The global order (a seeded shuffle of all rows, reshuffled each epoch) is cut into
        global batches, and each process stacks only its own slice of each: the same global
        batches whatever the number of processes."""
        local, rows = self.batch_size, self.train_rows
        start = self.process_index * local
        order = grain.MapDataset.range(len(rows)).shuffle(seed=self.seed).repeat()
        batches = order.batch(local * self.process_count, drop_remainder=True)
        mine = batches.map(lambda idx: _stack([rows[int(i)] for i in idx[start:start + local]]))
        return mine.to_iter_dataset().__iter__()

    def eval_batches(self, n: int) -> list[dict[str, np.ndarray]]:
        """Up to n global batches of held-out rows (this process's slice of each), the same every
        call and the same count on every process; the last is filled with empty rows
        (loss_mask 0) so that a small eval split is still used."""
        rows, bs = self.eval_rows, self.batch_size
        if len(rows) == 0:
            return []
        glob = bs * self.process_count
        count = min(n, -(-len(rows) // glob))
        empty = {k: np.zeros_like(v) for k, v in rows[0].items()}
        batches = []
        for b in range(count):  # this process's slice of each global batch, padded at the end
            first = b * glob + self.process_index * bs
            items = [rows[i] for i in range(first, min(first + bs, len(rows)))]
            batches.append(_stack(items + [empty] * (bs - len(items))))
        return batches


def _stack(items: list[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([it[k] for it in items]) for k in items[0]}


def check_vocab(tokens: np.ndarray, vocab_size: int, where: str) -> None:
    """Refuse token ids outside [0, vocab_size) before they reach an embedding lookup (which
    would silently clamp them)."""
    lo, hi = int(tokens.min()), int(tokens.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise DataError(f"{where}: token id {bad} is outside the model vocab [0, {vocab_size}) "
                        f"(model.vocab_size too small for the tokenizer?)")


def to_global(batch: dict[str, np.ndarray], sharding: jax.sharding.NamedSharding) -> dict:
    """Host-local batch rows -> global jax.Arrays laid out by `sharding` across all processes."""
    return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
