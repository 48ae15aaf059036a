"""Post-training batches: examples -> fixed [seq_len] rows -> a seeded, resumable grain mix.

Rows are built once, in memory. Instruction data becomes packed rows like pretraining's
(tokens, targets, segment_ids, positions, loss_mask) with the loss on trained spans only;
preference pairs become two unpacked rows each (chosen_* and rejected_* keys); scored data
one row plus `score`. Sources are mixed by data.weights; the iterator's state is the mix's
position, so resume continues the same order."""
from __future__ import annotations

import grain
import numpy as np

from jaxllm.data.examples import example_spans, prompt_spans, read_examples
from jaxllm.data.pretrain import ResumableIterator, mix64, split_documents
from jaxllm.data.sources import DataError
from jaxllm.data.tokenizer import load_tokenizer

ROW_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def flatten(spans) -> tuple[np.ndarray, np.ndarray]:
    ids = np.concatenate([np.asarray(i, np.int32) for i, _ in spans])
    trained = np.concatenate([np.full(len(i), t, bool) for i, t in spans])
    return ids, trained


def rows_of(seqs, seq_len: int, pad_id: int, pack: bool) -> dict[str, np.ndarray]:
    """Sequences (ids, trained) -> rows. Position t predicts ids[t+1], counted when that token
    is trained; a sequence longer than seq_len + 1 tokens is cut. pack=False: one per row."""
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    used = seq_len  # forces a first row
    for ids, trained in seqs:
        ids, trained = ids[: seq_len + 1], trained[: seq_len + 1]
        n = min(len(ids), seq_len)  # input slots this sequence takes
        if not pack or used + n > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((ids, trained))
        used += n
    out = {k: np.zeros((len(rows), seq_len), np.float32 if k == "loss_mask" else np.int32)
           for k in ROW_KEYS}
    out["tokens"][:] = pad_id
    out["targets"][:] = pad_id
    for r, row in enumerate(rows):
        at = 0
        for seg, (ids, trained) in enumerate(row, 1):
            n = min(len(ids), seq_len)
            sl = slice(at, at + n)
            out["tokens"][r, sl] = ids[:n]
            out["segment_ids"][r, sl] = seg
            out["positions"][r, sl] = np.arange(n)
            m = len(ids) - 1  # inputs that have a next token inside this sequence
            out["targets"][r, at:at + m] = ids[1:]
            out["loss_mask"][r, at:at + m] = trained[1:]
            at += n
    return out


def build_rows(examples: list[dict], tokenizer, data_cfg) -> dict[str, np.ndarray]:
    """The rows of one source's examples, per data.format."""
    L, pad = data_cfg.seq_len, tokenizer.pad_id
    fmt = data_cfg.format
    if fmt == "instruct":
        return rows_of([flatten(example_spans(tokenizer, ex)) for ex in examples], L, pad,
                       data_cfg.pack)
    if fmt == "scored":
        rows = rows_of([flatten(example_spans(tokenizer, ex)) for ex in examples], L, pad, False)
        return rows | {"score": np.array([ex["score"] for ex in examples], np.float32)}
    out = {}
    for side in ("chosen", "rejected"):
        seqs = [flatten(prompt_spans(tokenizer, ex["prompt"])
                        + [(tokenizer.encode(ex[side]) + [tokenizer.eos_id], True)])
                for ex in examples]
        out |= {f"{side}_{k}": v for k, v in rows_of(seqs, L, pad, False).items()}
    return out


def _take(rows: dict, idx) -> dict:
    return {k: v[idx] for k, v in rows.items()}


class ExampleData:
    """Train and eval batches of post-training rows: dicts of host-local numpy arrays."""

    def __init__(self, data_cfg, tokenizer, *, batch_size: int, seed: int, process_index: int = 0,
                 process_count: int = 1):
        self.cfg, self.tokenizer = data_cfg, tokenizer
        self.batch_size, self.seed = batch_size, seed
        self.process_index, self.process_count = process_index, process_count
        per_source, self.skipped = read_examples(data_cfg)
        if data_cfg.weights and len(data_cfg.weights) != len(per_source):
            raise DataError(f"data.weights: {len(data_cfg.weights)} weights for "
                            f"{len(per_source)} sources")
        self.train_rows, evals = [], []
        for examples in per_source:  # the eval split is taken per source, by example hash
            tr, ev = split_documents(len(examples), data_cfg.eval_fraction)
            self.train_rows.append(build_rows([examples[i] for i in tr], tokenizer, data_cfg))
            if len(ev):
                evals.append(build_rows([examples[i] for i in ev], tokenizer, data_cfg))
        self.eval_rows = ({k: np.concatenate([e[k] for e in evals]) for k in evals[0]}
                          if evals else None)
        self.num_examples = sum(len(e) for e in per_source)

    @classmethod
    def from_config(cls, data_cfg, *, run_dir, batch_size: int, seed: int, process_index: int = 0,
                    process_count: int = 1) -> "ExampleData":
        if data_cfg.tokenizer.kind == "sentencepiece" and data_cfg.tokenizer.path is None:
            raise DataError("data.tokenizer.path: post-training needs the base model's tokenizer")
        tokenizer = load_tokenizer(data_cfg.tokenizer, run_dir, None)
        return cls(data_cfg, tokenizer, batch_size=batch_size, seed=seed,
                   process_index=process_index, process_count=process_count)

    @property
    def summary(self) -> str:
        n = [len(next(iter(r.values()))) for r in self.train_rows]
        ev = 0 if self.eval_rows is None else len(next(iter(self.eval_rows.values())))
        return (f"{self.num_examples} examples ({self.skipped} malformed skipped) -> "
                f"{sum(n)} train rows {n} / {ev} eval rows of {self.cfg.seq_len} tokens")

    def train_iterator(self) -> ResumableIterator:
        local, glob = self.batch_size, self.batch_size * self.process_count
        first = self.process_index * local
        shuffle_seed = int(mix64(self.seed, 1) % np.uint64(2**32))
        sources = []
        for s, rows in enumerate(self.train_rows):
            n = len(next(iter(rows.values())))
            sources.append(grain.MapDataset.range(n).shuffle(seed=shuffle_seed + s).repeat()
                           .map(lambda i, s=s: (s, i)))
        mixed = (sources[0] if len(sources) == 1 else
                 grain.MapDataset.mix(sources, list(self.cfg.weights) or None))
        rows = self.train_rows

        def stack(pairs):
            src, idx = pairs
            picked = list(zip(src[first:first + local], idx[first:first + local]))
            batch = {k: np.stack([rows[s][k][i] for s, i in picked]) for k in rows[0]}
            return batch | {"valid": np.ones(local, np.float32)}

        batches = mixed.batch(glob).map(stack)
        return ResumableIterator(iter(batches.to_iter_dataset()), {
            "train_rows": [len(next(iter(r.values()))) for r in rows], "global_batch": glob,
            "seq_len": self.cfg.seq_len, "seed": self.seed})

    def eval_batches(self, n: int) -> list[dict[str, np.ndarray]]:
        """Up to n global batches of held-out rows; the last filled with masked copies."""
        if self.eval_rows is None:
            return []
        rows, local = self.eval_rows, self.batch_size
        total, glob = len(rows["tokens" if "tokens" in rows else "chosen_tokens"]), local * self.process_count
        out = []
        for b in range(min(n, -(-total // glob))):
            first = b * glob + self.process_index * local
            idx = np.arange(first, first + local)
            real = idx < total
            batch = _take(rows, np.minimum(idx, total - 1))
            for k in batch:  # filler rows count for nothing
                if k.endswith("loss_mask"):
                    batch[k] = batch[k] * real[:, None]
            batch["valid"] = real.astype(np.float32)
            out.append(batch)
        return out
