"""Data: sources, packing invariants, the eval split, seeded shuffling, exact iterator resume,
process shards, global arrays, sentencepiece training, and bad input."""
import dataclasses
import json

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

from jaxllm import data
from jaxllm.config import DataConfig, TokenizerConfig
from jaxllm.data import ByteTokenizer, DataError, PackedRows, PretrainData, token_stream

BYTE = ByteTokenizer()


def corpus(n=60, seed=0):
    """Distinct random documents of 3..60 characters."""
    rng = np.random.default_rng(seed)
    return [f"{i}:" + "".join(rng.choice(list("abcdefgh \n"), rng.integers(1, 58)))
            for i in range(n)]


def cfg_for(tmp_path, docs, **kw):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return DataConfig(sources=(str(path),), seq_len=16, tokenizer=TokenizerConfig(kind="byte"), **kw)


def make(tmp_path, batch=4, seed=0, n=60, cfg_kw=None, **kw):
    return PretrainData.from_config(cfg_for(tmp_path, corpus(n), **(cfg_kw or {})),
                                    run_dir=tmp_path, batch_size=batch, seed=seed, **kw)


def take(it, n):
    return [next(it) for _ in range(n)]


def assert_same(batches_a, batches_b):
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def segments(batch):
    """(row, segment id, token slice, target slice, mask slice) for every non-padding segment."""
    for r in range(batch["tokens"].shape[0]):
        seg = batch["segment_ids"][r]
        for s in np.unique(seg[seg > 0]):
            at = seg == s
            yield (r, s, batch["tokens"][r][at], batch["targets"][r][at], batch["loss_mask"][r][at],
                   batch["positions"][r][at], np.flatnonzero(at))


# ----------------------------------------------------------------------------- sources

def test_sources_txt_jsonl_parquet_globs_and_pydoc(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    (tmp_path / "b.txt").write_text("para one\nstill one\n\n   \npara two\n")
    (tmp_path / "a.txt").write_text("\ufeffwhole file\n")
    (tmp_path / "c.jsonl").write_text('{"text": "j1", "id": 1}\n\n{"text": "j2"}\n{"text": " "}\n')
    pq.write_table(pa.table({"text": ["p1", "p2"], "id": [1, 2]}), tmp_path / "d.parquet")
    one = DataConfig(sources=(str(tmp_path / "*.txt"), str(tmp_path / "c.jsonl"),
                              str(tmp_path / "d.parquet")))
    assert data.read_documents(one) == ["whole file\n", "para one\nstill one\n\n   \npara two\n", "j1",
                                      "j2", "p1", "p2"]
    split = dataclasses.replace(one, split_paragraphs=True)
    assert data.read_documents(split) == ["whole file", "para one\nstill one", "para two", "j1", "j2",
                                          "p1", "p2"]
    pydoc = data.read_documents(DataConfig(sources=("builtin:pydoc",)))
    assert len(pydoc) > 50 and pydoc == data.read_documents(DataConfig())
    assert any(d.startswith("The \"for\" statement") for d in pydoc)


# ----------------------------------------------------------------------------- packing

def test_packing_layout_by_hand():
    tokens, owners = token_stream([[5, 6, 7], [8, 9], [10, 11, 12, 13]], bos=1, eos=2)
    assert tokens.tolist() == [1, 5, 6, 7, 2, 1, 8, 9, 2, 1, 10, 11, 12, 13, 2]
    rows = PackedRows(tokens, owners, seq_len=6, pad_id=0)
    assert len(rows) == 3  # 14 targets in rows of 6: the last row is padded
    b = rows.batch([0, 1, 2])
    assert b["tokens"].tolist() == [[1, 5, 6, 7, 2, 1], [8, 9, 2, 1, 10, 11], [12, 13, 2, 0, 0, 0]]
    # The EOS of a document predicts nothing of the next one: target pad, mask 0.
    assert b["targets"].tolist() == [[5, 6, 7, 2, 0, 8], [9, 2, 0, 10, 11, 12], [13, 2, 0, 0, 0, 0]]
    assert b["loss_mask"].tolist() == [[1, 1, 1, 1, 0, 1], [1, 1, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0]]
    # A document continued from the previous row is a new segment with positions from 0.
    assert b["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 2], [1, 1, 1, 2, 2, 2], [1, 1, 1, 0, 0, 0]]
    assert b["positions"].tolist() == [[0, 1, 2, 3, 4, 0], [0, 1, 2, 0, 1, 2], [0, 1, 2, 0, 0, 0]]
    assert all(v.dtype == (np.float32 if k == "loss_mask" else np.int32) for k, v in b.items())


def test_packed_rows_hold_every_document_whole_and_unmixed(tmp_path):
    docs = corpus(40)
    d = PretrainData(cfg_for(tmp_path, docs, eval_fraction=0.0), BYTE, batch_size=2, seed=0)
    rows = d.train_rows
    batch = rows.batch(np.arange(len(rows)))  # every row, in stream order
    pieces = []
    for r, s, toks, tgts, mask, pos, cols in segments(batch):
        # Within a segment: one document (BOS only first, EOS only last), positions 0, 1, ...
        assert (toks[1:] != BYTE.bos_id).all() and (toks[:-1] != BYTE.eos_id).all()
        np.testing.assert_array_equal(pos, np.arange(len(toks)))
        np.testing.assert_array_equal(np.diff(cols), 1)
        # Targets are the next token of the segment; the last one is masked only at a doc's end.
        np.testing.assert_array_equal(tgts[:-1], toks[1:])
        assert mask[:-1].all() and bool(mask[-1]) == (toks[-1] != BYTE.eos_id)
        pieces.append(toks)
    pad = batch["segment_ids"] == 0
    assert (batch["tokens"][pad] == BYTE.pad_id).all() and (batch["loss_mask"][pad] == 0).all()
    assert pad[:-1].sum() == 0  # padding only in the very last row
    # Stitched back together, the segments are exactly BOS + doc + EOS for each document.
    stream = np.concatenate(pieces)
    want = np.concatenate([[BYTE.bos_id, *BYTE.encode(t), BYTE.eos_id] for t in docs])
    np.testing.assert_array_equal(stream, want)


def test_train_batches_keep_the_invariants(tmp_path):
    it = make(tmp_path, batch=4).train_iterator()
    for b in take(it, 10):
        assert {k: v.shape for k, v in b.items()} == {k: (4, 16) for k in b}
        for _, _, toks, tgts, mask, pos, _ in segments(b):
            np.testing.assert_array_equal(pos, np.arange(len(toks)))
            np.testing.assert_array_equal(tgts[:-1], toks[1:])
        assert (b["loss_mask"][b["segment_ids"] == 0] == 0).all()
        assert (b["targets"][b["loss_mask"] == 0] == BYTE.pad_id).all()


# ----------------------------------------------------------------------------- split, order, resume

def test_eval_split_is_seeded_disjoint_and_stable():
    train, held = data.split_documents(1000, 0.1)
    assert not set(train) & set(held) and len(train) + len(held) == 1000
    assert 60 < len(held) < 140
    np.testing.assert_array_equal(held, data.split_documents(1000, 0.1)[1])
    assert not np.array_equal(held, data.split_documents(1000, 0.1, seed=1)[1])
    # Membership is per document index: appending documents moves no existing one.
    assert set(data.split_documents(300, 0.1)[1]) == {i for i in held if i < 300}
    assert len(data.split_documents(3, 0.01)[1]) == 1 and len(data.split_documents(2, 0.99)[0]) == 1


def test_eval_batches_hold_only_held_out_documents(tmp_path):
    docs = corpus(60)
    d = PretrainData(cfg_for(tmp_path, docs, eval_fraction=0.2), BYTE, batch_size=4, seed=0)
    train, held = data.split_documents(len(docs), 0.2)
    assert data.train_split(d.cfg) == [docs[i] for i in train]  # what a tokenizer trains on
    evals = d.eval_batches(100)
    assert len(evals) == -(-len(d.eval_rows) // 4)
    stream = np.concatenate([s[2] for b in evals for s in segments(b)])
    want = np.concatenate([[BYTE.bos_id, *BYTE.encode(docs[i]), BYTE.eos_id] for i in held])
    np.testing.assert_array_equal(stream, want)  # the held-out documents, whole, in order
    assert_same(evals, d.eval_batches(100))
    assert len(d.eval_batches(1)) == 1
    last = evals[-1]
    assert (last["loss_mask"][last["segment_ids"] == 0] == 0).all()


def test_shuffle_is_seeded_and_reshuffles_each_epoch(tmp_path):
    d = make(tmp_path, seed=3)
    n = len(d.train_rows)
    a = take(d.train_iterator(), -(-2 * n // 4))
    assert_same(a, take(make(tmp_path, seed=3).train_iterator(), len(a)))
    other = take(make(tmp_path, seed=4).train_iterator(), 2)
    assert not np.array_equal(other[0]["tokens"], a[0]["tokens"])
    # Row order: each epoch is a permutation of all rows, and the second differs from the first.
    index = {r.tobytes(): i for i, r in enumerate(d.train_rows.batch(np.arange(n))["tokens"])}
    order = [index[r.tobytes()] for b in a for r in b["tokens"]]
    assert sorted(order[:n]) == sorted(order[n:2 * n]) == list(range(n))
    assert order[:n] != order[n:2 * n] and order[:n] != list(range(n))


@pytest.mark.parametrize("workers", [0, 2])
def test_iterator_resumes_exactly(tmp_path, workers):
    kw = {"cfg_kw": {"num_workers": workers}}
    it = make(tmp_path, seed=5, **kw).train_iterator()
    take(it, 7)
    state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as in a checkpoint
    more = take(it, 20)  # crosses an epoch boundary
    resumed = make(tmp_path, seed=5, **kw).train_iterator()
    resumed.set_state(state)
    assert_same(more, take(resumed, 20))


def test_resume_refuses_a_different_stream(tmp_path):
    it = make(tmp_path, seed=5).train_iterator()
    take(it, 3)
    state = it.get_state()
    with pytest.raises(DataError, match="checkpoint's seed is 5, this run's is 6"):
        make(tmp_path, seed=6).train_iterator().set_state(state)
    with pytest.raises(DataError, match="checkpoint's global_batch is 4, this run's is 8"):
        make(tmp_path, batch=8, seed=5).train_iterator().set_state(state)
    fresh = make(tmp_path, seed=5).train_iterator()
    fresh.set_state({})  # a checkpoint with no data state starts from the beginning
    assert_same(take(fresh, 1), take(make(tmp_path, seed=5).train_iterator(), 1))


def test_process_shards_are_disjoint_and_add_up_to_one_process(tmp_path):
    one = take(make(tmp_path, batch=8, seed=1).train_iterator(), 12)
    shards = [take(make(tmp_path, batch=4, seed=1, process_index=p, process_count=2)
                   .train_iterator(), 12) for p in range(2)]
    for whole, a, b in zip(one, *shards):
        rows_a = {r.tobytes() for r in a["tokens"]}
        assert not rows_a & {r.tobytes() for r in b["tokens"]}
        for k in whole:  # the global batch does not depend on the number of processes
            np.testing.assert_array_equal(whole[k], np.concatenate([a[k], b[k]]))
    ev = [make(tmp_path, batch=4, process_index=p, process_count=2).eval_batches(3)
          for p in range(2)]
    assert len(ev[0]) == len(ev[1]) > 0
    assert not {r.tobytes() for b in ev[0] for r in b["tokens"] if r.any()} & \
        {r.tobytes() for b in ev[1] for r in b["tokens"] if r.any()}


def test_to_global_places_rows_on_the_mesh():
    mesh = jax.make_mesh((2, 4), ("data", "fsdp"), devices=jax.devices()[:8])
    sharding = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None))
    local = {"tokens": np.arange(8 * 16, dtype=np.int32).reshape(8, 16),
             "loss_mask": np.ones((8, 16), np.float32)}
    g = data.to_global(local, sharding)
    assert g["tokens"].shape == (8, 16) and g["loss_mask"].dtype == np.float32
    assert len(g["tokens"].addressable_shards) == 8 and g["tokens"].sharding == sharding
    for shard in g["tokens"].addressable_shards:
        assert shard.data.shape == (1, 16)
        np.testing.assert_array_equal(shard.data, local["tokens"][shard.index])


# ----------------------------------------------------------------------------- tokenizers

def test_byte_tokenizer():
    assert BYTE.vocab_size == 259 and {BYTE.pad_id, BYTE.bos_id, BYTE.eos_id} == {0, 1, 2}
    ids = BYTE.encode("héllo\n")
    assert min(ids) >= 3 and len(ids) == 7 and BYTE.decode(ids) == "héllo\n"
    assert BYTE.decode([1, *ids, 2, 0]) == "héllo\n"  # specials decode to nothing


def test_sentencepiece_training_is_deterministic_and_lossless(tmp_path):
    texts = corpus(200) + ["def the_lazy(dog):\n    return 'quick brown fox'\n"] * 30
    a = data.train_sentencepiece(texts, 300, tmp_path / "a")
    b = data.train_sentencepiece(iter(texts), 300, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes() and a.name == "a.model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.model", "b.model"]  # no temp files
    tok = data.SentencePieceTokenizer(a)
    assert tok.vocab_size == 300 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    text = "def the_lazy(dog):\n    return 'quick brown fox'\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and len(ids) < len(text)  # merges learned, spaces kept
    assert tok.pad_id not in ids and tok.bos_id not in ids
    assert tok.decode(tok.encode("ünïcode ✓  \t x")) == "ünïcode ✓  \t x"  # byte fallback

    # load_tokenizer trains into the run directory once, then reuses that model.
    cfg = TokenizerConfig(kind="sentencepiece", vocab_size=300)
    calls = []
    texts_fn = lambda: calls.append(1) or texts  # noqa: E731
    first = data.load_tokenizer(cfg, tmp_path / "run", texts_fn)
    again = data.load_tokenizer(cfg, tmp_path / "run", texts_fn)
    assert len(calls) == 1 and first.path == again.path == tmp_path / "run" / "tokenizer.model"
    with pytest.raises(DataError, match=r"tokenizer.model: has 300 pieces but data.tokenizer.vocab_size=400"):
        data.load_tokenizer(dataclasses.replace(cfg, vocab_size=400), tmp_path / "run", texts_fn)
    with pytest.raises(DataError, match="vocab_size: 5000 is too large for this corpus"):
        data.train_sentencepiece(["abc abd"] * 5, 5000, tmp_path / "c")
    with pytest.raises(DataError, match="kind hf needs a tokenizer.json"):
        data.load_tokenizer(TokenizerConfig(kind="hf"), None, None)


# ----------------------------------------------------------------------------- bad input

def read(tmp_path, name, text=None, **kw):
    if text is not None:
        (tmp_path / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return data.read_documents(DataConfig(sources=(str(tmp_path / name),), **kw))


@pytest.mark.parametrize("name, text, message", [
    ("nope.jsonl", None, r"data.sources: .*nope.jsonl: file not found"),
    ("*.nothing", None, r"data.sources: '.*\*.nothing' matches no files"),
    ("empty.txt", "  \n\n", r"hold no text \(empty corpus\)"),
    ("bad.jsonl", '{"text": "a"}\n\n{"text": oops}\n', r"bad.jsonl:3: not valid JSON \(Expecting value"),
    ("nofield.jsonl", '{"text": "a"}\n{"body": "b"}\n',
     r"nofield.jsonl:2: missing text field 'text' \(fields: body; set data.text_field\)"),
    ("list.jsonl", '["text"]\n', r"list.jsonl:1: expected a JSON object with a 'text' field, got list"),
    ("int.jsonl", '{"text": 3}\n', r"int.jsonl:1: field 'text' is int, expected a string"),
    ("latin1.txt", b"caf\xe9\n", r"latin1.txt: not UTF-8 text \(bad byte at offset 3\)"),
    ("data.json", "[]", r"data.json: .json is not a supported format"),
])
def test_bad_sources_are_one_line_errors(tmp_path, name, text, message):
    with pytest.raises(DataError, match=message) as e:
        read(tmp_path, name, text)
    assert "\n" not in str(e.value)


def test_bad_batches_are_errors(tmp_path):
    with pytest.raises(DataError, match=r"at step 3, tokens: token id 300 is outside the model "
                                        r"vocab \[0, 300\)"):
        data.check_vocab(np.array([[1, 300]]), 300, "at step 3, tokens")
    with pytest.raises(DataError, match=r"eval, targets: token id -1 is outside"):
        data.check_vocab({"tokens": np.ones((2, 2)), "targets": -np.ones((2, 2))}, 300, "eval")
    data.check_vocab({"tokens": np.full((2, 2), 299)}, 300, "fine")
    with pytest.raises(DataError, match=r"packs into \d+ training rows of 16 tokens, fewer "
                                        r"than one global batch of 64"):
        make(tmp_path, batch=64, n=3)
    with pytest.raises(DataError, match="unknown built-in corpus 'builtin:wiki'"):
        data.read_documents(DataConfig(sources=("builtin:wiki",)))
