"""Data: sources, packing invariants, seeded shuffling, exact iterator resume, process shards,
sentencepiece training, and bad input."""
import json

import jax
import numpy as np
import pytest

from jaxllm import config, data, sharding
from jaxllm.data import DataError, pack_row
from jaxllm.data.pretrain import PretrainData, split_documents, token_stream


def data_cfg(tmp_path, docs, *extra):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return config.load(None, [f"data.sources=[{path}]", "data.seq_len=16",
                              "data.tokenizer.kind=byte", *extra]).data


def corpus(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return ["".join(rng.choice(list("abcdefgh "), rng.integers(3, 50))) for _ in range(n)]


def make(tmp_path, batch=4, seed=0, n=60, **kw):
    cfg = data_cfg(tmp_path, corpus(n))
    return PretrainData.from_config(cfg, run_dir=tmp_path, batch_size=batch, seed=seed, **kw)


def test_packing_never_crosses_documents():
    tokens, owners = token_stream([[5, 6, 7], [8, 9], [10, 11, 12, 13]], bos=1, eos=2)
    assert tokens.tolist() == [1, 5, 6, 7, 2, 1, 8, 9, 2, 1, 10, 11, 12, 13, 2]
    row = pack_row(tokens[3:12], owners[3:12])  # starts mid-document 0, ends inside document 2
    assert row["tokens"].tolist() == [7, 2, 1, 8, 9, 2, 1, 10]
    assert row["targets"].tolist() == [2, 1, 8, 9, 2, 1, 10, 11]
    assert row["segment_ids"].tolist() == [1, 1, 2, 2, 2, 2, 3, 3]
    assert row["positions"].tolist() == [0, 1, 0, 1, 2, 3, 0, 1]
    # The EOS of a document predicts nothing of the next one.
    assert row["loss_mask"].tolist() == [1, 0, 1, 1, 1, 0, 1, 1]


def test_batches_have_consistent_segments(tmp_path):
    d = make(tmp_path)
    b = next(d.train_iterator())
    assert {k: v.shape for k, v in b.items()} == {k: (4, 16) for k in b}
    seg, pos, mask = b["segment_ids"], b["positions"], b["loss_mask"]
    assert (seg >= 1).all()  # concat-then-split packing needs no padding
    starts = np.concatenate([np.ones((4, 1), bool), seg[:, 1:] != seg[:, :-1]], 1)
    assert (pos[starts] == 0).all() and (pos[~starts] == (pos[:, :-1] + 1)[~starts[:, 1:]]).all()
    # Where the mask is on, the target is the next input of the same segment.
    same = (seg[:, 1:] == seg[:, :-1])
    np.testing.assert_array_equal(b["targets"][:, :-1][same], b["tokens"][:, 1:][same])
    assert mask[:, :-1][~same].sum() == 0


def test_seeded_order_and_exact_resume(tmp_path):
    d = make(tmp_path, seed=3)
    it = d.train_iterator()
    first = [next(it) for _ in range(5)]
    state = json.loads(json.dumps(it.get_state()))  # JSON round trip, as in a checkpoint
    more = [next(it) for _ in range(12)]  # past an epoch boundary too
    resumed = make(tmp_path, seed=3).train_iterator()
    resumed.set_state(state)
    for a, b in zip(more, [next(resumed) for _ in range(12)]):
        np.testing.assert_array_equal(a["tokens"], b["tokens"])
    again = [next(make(tmp_path, seed=3).train_iterator())]
    np.testing.assert_array_equal(again[0]["tokens"], first[0]["tokens"])
    other = next(make(tmp_path, seed=4).train_iterator())
    assert not np.array_equal(other["tokens"], first[0]["tokens"])


def test_eval_split_and_process_shards_are_disjoint(tmp_path):
    train, held = split_documents(500, 0.1, seed=0)
    assert len(set(train) & set(held)) == 0 and len(train) + len(held) == 500
    assert 20 < len(held) < 80
    shards = [make(tmp_path, process_index=i, process_count=2) for i in range(2)]
    rows = [{tuple(r) for b in _epoch(s) for r in b["tokens"]} for s in shards]
    assert rows[0] and rows[1] and not rows[0] & rows[1]
    assert shards[0].eval_batches(2) and shards[0].eval_batches(2)[0]["tokens"].shape == (4, 16)


def _epoch(d):
    n = len(d.train_rows) // 2 // d.batch_size
    it = d.train_iterator()
    return [next(it) for _ in range(n)]


def test_to_global_places_rows_on_the_mesh():
    mesh = sharding.make_mesh(sharding.with_sizes(config.MeshConfig(), data=2, fsdp=4))
    bsh = sharding.batch_sharding(mesh, config.ShardingRules())
    local = {"tokens": np.arange(8 * 16, dtype=np.int32).reshape(8, 16)}
    g = data.to_global(local, bsh)["tokens"]
    assert g.shape == (8, 16) and len(g.addressable_shards) == 8
    assert g.addressable_shards[0].data.shape == (1, 16)
    np.testing.assert_array_equal(np.asarray(g), local["tokens"])


def test_sentencepiece_training_is_deterministic_and_round_trips(tmp_path):
    texts = corpus(200) + ["the quick brown fox jumps over the lazy dog"] * 20
    a = data.train_sentencepiece(texts, 300, tmp_path / "a")
    b = data.train_sentencepiece(texts, 300, tmp_path / "b")
    tok, tok_b = data.SentencePieceTokenizer(a), data.SentencePieceTokenizer(b)
    pieces = [tok.sp.id_to_piece(i) for i in range(tok.vocab_size)]
    assert pieces == [tok_b.sp.id_to_piece(i) for i in range(tok_b.vocab_size)]
    assert tok.vocab_size == 300 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)
    ids = tok.encode("the lazy dog")
    assert tok.decode(ids) == "the lazy dog" and len(ids) < len("the lazy dog")
    assert tok.decode(tok.encode("ünïcode ✓")) == "ünïcode ✓"  # byte fallback


def test_bad_data_errors(tmp_path):
    with pytest.raises(DataError, match="nope.jsonl: file not found"):
        data.read_documents(config.load(None, [f"data.sources=[{tmp_path / 'nope.jsonl'}]"]).data)
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\n\n{"text": 1}\n')
    with pytest.raises(DataError, match=r"bad.jsonl:3: field 'text' is int"):
        data.read_documents(config.load(None, [f"data.sources=[{tmp_path / 'bad.jsonl'}]"]).data)
    (tmp_path / "nofield.jsonl").write_text('{"body": "a"}\n')
    with pytest.raises(DataError, match=r"nofield.jsonl:1: missing text field 'text'"):
        data.read_documents(config.load(None, [f"data.sources=[{tmp_path / 'nofield.jsonl'}]"]).data)
    with pytest.raises(DataError, match="fewer than one global batch"):
        make(tmp_path, batch=64, n=5)
    with pytest.raises(DataError, match=r"here: token id 300 is outside the model vocab \[0, 300\)"):
        data.check_vocab(np.array([[1, 300]]), 300, "here")
