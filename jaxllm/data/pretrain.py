"""Pretraining data: documents -> tokens -> packed rows -> seeded, sharded grain batches.

The corpus is tokenized and packed once, in memory (see packing.py for the row layout). The
train stream is a grain pipeline over row indices: shuffle(seed) -> repeat (reshuffled each
epoch) -> global batches of indices -> this process's slice, stacked into numpy arrays. So
the global batches are the same whatever the number of processes, each process reads a
disjoint share of every one, and the iterator's whole state is one batch counter."""
from __future__ import annotations

from pathlib import Path

import grain
import numpy as np

from jaxllm.data.packing import PackedRows, token_stream
from jaxllm.data.sources import DataError, read_documents
from jaxllm.data.tokenizer import load_tokenizer


def mix64(values, seed: int) -> np.ndarray:
    """splitmix64 of each value combined with a seed: well-spread, fixed pseudo-random uint64s."""
    with np.errstate(over="ignore"):
        z = np.asarray(values, np.int64).view(np.uint64) * np.uint64(0x9E3779B97F4A7C15)
        z = z + np.uint64(seed % 2**64) + np.uint64(0x632BE59BD9B4E019)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def split_documents(n: int, eval_fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(train, eval) document indices. A document is held out when the seeded hash of its index
    falls below eval_fraction: membership does not depend on the rest of the corpus, and with
    at least two documents and eval_fraction > 0 each side gets at least one. The pipeline uses
    seed 0 whatever the training seed, so all runs of a seed sweep are scored on the same text."""
    if n < 2 or eval_fraction <= 0:
        return np.arange(n), np.arange(0)
    u = (mix64(np.arange(n), seed) >> np.uint64(11)).astype(np.float64) / 2.0**53
    held = u < eval_fraction
    if not held.any():
        held[np.argmin(u)] = True
    if held.all():
        held[np.argmax(u)] = False
    return np.flatnonzero(~held), np.flatnonzero(held)


def train_split(data_cfg, documents: list[str] | None = None) -> list[str]:
    """The documents that are not held out for eval (what a tokenizer should be trained on)."""
    docs = read_documents(data_cfg) if documents is None else documents
    return [docs[i] for i in split_documents(len(docs), data_cfg.eval_fraction)[0]]


def encode_all(tokenizer, texts: list[str]) -> list:
    if hasattr(tokenizer, "encode_batch"):
        return tokenizer.encode_batch(texts)
    if hasattr(tokenizer, "encode_array"):
        return [tokenizer.encode_array(t) for t in texts]
    return [tokenizer.encode(t) for t in texts]


class ResumableIterator(grain.DatasetIterator):
    """A grain iterator whose state also records what it iterates over, so that resuming on a
    different corpus, seq_len, global batch size or seed is an error instead of silently
    different batches."""

    def __init__(self, inner: grain.DatasetIterator, fingerprint: dict):
        super().__init__(inner)
        self.fingerprint = fingerprint

    def __next__(self):
        return next(self._parent)

    def get_state(self) -> dict:
        return {**self._parent.get_state(), **self.fingerprint}

    def set_state(self, state: dict) -> None:
        if not state:  # a checkpoint without data state (e.g. imported weights): start over
            return
        for key, want in self.fingerprint.items():
            if key in state and state[key] != want:
                raise DataError(f"data iterator state: the checkpoint's {key} is {state[key]}, "
                                f"this run's is {want} (data, data.seq_len, train.batch_size or "
                                f"seed changed since the checkpoint)")
        self._parent.set_state({k: v for k, v in state.items() if k not in self.fingerprint})


class PretrainData:
    """Train and eval batches: dicts of host-local numpy [batch_size, seq_len] arrays with
    keys tokens, targets, segment_ids, positions (int32) and loss_mask (float32)."""

    def __init__(self, data_cfg, tokenizer, *, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1, documents: list[str] | None = None):
        self.cfg, self.tokenizer = data_cfg, tokenizer
        self.batch_size, self.seed = batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        docs = read_documents(data_cfg) if documents is None else documents
        train_idx, eval_idx = split_documents(len(docs), data_cfg.eval_fraction)
        self.num_docs = (len(train_idx), len(eval_idx))
        self.train_rows = self._pack([docs[i] for i in train_idx])
        self.eval_rows = self._pack([docs[i] for i in eval_idx])
        if len(self.train_rows) < batch_size * process_count:
            raise DataError(
                f"data.sources: the corpus packs into {len(self.train_rows)} training rows of "
                f"{data_cfg.seq_len} tokens, fewer than one global batch of "
                f"{batch_size * process_count}; add text or lower train.batch_size/data.seq_len")

    @classmethod
    def from_config(cls, data_cfg, *, run_dir: Path | None, batch_size: int, seed: int,
                    process_index: int = 0, process_count: int = 1) -> "PretrainData":
        """Read the sources, load (or train, on the train split only) the tokenizer, pack."""
        docs = read_documents(data_cfg)
        tokenizer = load_tokenizer(data_cfg.tokenizer, run_dir, lambda: train_split(data_cfg, docs))
        return cls(data_cfg, tokenizer, batch_size=batch_size, seed=seed, documents=docs,
                   process_index=process_index, process_count=process_count)

    def _pack(self, docs: list[str]) -> PackedRows:
        tok, tcfg = self.tokenizer, self.cfg.tokenizer
        for flag, name, tid in (("add_bos", "BOS", tok.bos_id), ("add_eos", "EOS", tok.eos_id)):
            if getattr(tcfg, flag) and (tid is None or tid < 0):
                raise DataError(f"data.tokenizer.{flag}: the tokenizer has no {name} token; "
                                f"set it to false")
        tokens, owners = token_stream(encode_all(tok, docs), tok.bos_id if tcfg.add_bos else None,
                                      tok.eos_id if tcfg.add_eos else None)
        return PackedRows(tokens, owners, self.cfg.seq_len, tok.pad_id)

    @property
    def summary(self) -> str:
        rows, ev = len(self.train_rows), len(self.eval_rows)
        return (f"{self.num_docs[0]} train / {self.num_docs[1]} eval documents, {rows} / {ev} "
                f"rows of {self.cfg.seq_len} tokens")

    def train_iterator(self) -> ResumableIterator:
        """An endless, seeded stream of batches; get_state()/set_state() resume it exactly."""
        local, glob = self.batch_size, self.batch_size * self.process_count
        first, rows = self.process_index * local, self.train_rows
        # Hash the seed: grain reshuffles epoch e with seed + e, so raw seeds s and s + 1 would
        # share all but one epoch's order.
        shuffle_seed = int(mix64(self.seed, 1) % np.uint64(2**32))
        batches = (grain.MapDataset.range(len(rows)).shuffle(seed=shuffle_seed).repeat()
                   .batch(glob).map(lambda idx: rows.batch(idx[first:first + local])))
        # num_workers threads prepare batches ahead; 0 prepares each in the calling thread.
        workers = self.cfg.num_workers
        it = batches.to_iter_dataset(grain.ReadOptions(num_threads=workers,
                                                       prefetch_buffer_size=2 * workers))
        return ResumableIterator(iter(it), {"train_rows": len(rows), "global_batch": glob,
                                            "seq_len": self.cfg.seq_len, "seed": self.seed})

    def eval_batches(self, n: int) -> list[dict[str, np.ndarray]]:
        """Up to n global batches of held-out rows in a fixed order (this process's slice of
        each), the same count on every process; the last is filled with padding rows
        (loss_mask 0) so that a small eval split is still used whole."""
        rows, local = self.eval_rows, self.batch_size
        glob = local * self.process_count
        count = min(n, -(-len(rows) // glob))
        batches = []
        for b in range(count):
            first = b * glob + self.process_index * local
            idx = np.arange(first, min(first + local, len(rows)))
            batch = rows.batch(idx)
            if len(idx) < local:
                fill = rows.empty(local - len(idx))
                batch = {k: np.concatenate([batch[k], fill[k]]) for k in batch}
            batches.append(batch)
        return batches
