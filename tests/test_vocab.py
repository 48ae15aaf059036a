"""Vocabulary extension: a new domain's pieces appended, embeddings grown, training continues,
and the extended run samples through `jaxllm generate --checkpoint`."""
import random

import jax
import numpy as np
import pytest

from jaxllm import cli, config, models, sharding
from jaxllm.data import SentencePieceTokenizer, train_sentencepiece
from jaxllm.data.sources import builtin_pydoc
from jaxllm.generate import generate
from jaxllm.train import loop
from jaxllm.train.checkpoint import restore_run_params, write_run
from jaxllm.vocab import resize_vocab

BASE = 400  # pieces in the base tokenizer; the model's vocab is padded past it to 416


def new_domain_text(n=400, seed=0):
    """A made-up language: 40 invented words in random sentences."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("qzxkvjwy") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))
             for _ in range(40)]
    return [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(n)]


def random_params(cfg, seed=0):
    """Random params of the model's shapes without compiling its init."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: rng.normal(0, 0.02, s.shape).astype(s.dtype),
                        models.abstract_params(cfg))


def test_resize_vocab_sets_only_the_new_rows_to_the_mean():
    rng = np.random.default_rng(0)
    params = {"embed_tokens": {"embedding": rng.normal(size=(10, 8)).astype(np.float32)},
              "lm_head": {"kernel": rng.normal(size=(8, 10)).astype(np.float32)}}
    out = resize_vocab(params, 12, new_ids=[8, 9, 10, 11], mean_of=8)  # rows 8, 9 were padding
    emb, old = np.asarray(out["embed_tokens"]["embedding"]), params["embed_tokens"]["embedding"]
    np.testing.assert_array_equal(emb[:8], old[:8])
    np.testing.assert_allclose(emb[8:], np.broadcast_to(old[:8].mean(0), (4, 8)), rtol=1e-5)
    head, old = np.asarray(out["lm_head"]["kernel"]), params["lm_head"]["kernel"]
    np.testing.assert_array_equal(head[:, :8], old[:, :8])
    np.testing.assert_allclose(head[:, 8:].T, np.broadcast_to(old[:, :8].mean(1), (4, 8)), rtol=1e-5)
    with pytest.raises(ValueError, match="smaller"):
        resize_vocab(params, 9)


def test_extend_tokenizer_then_continue_pretraining(tmp_path, capsys):
    base_model = train_sentencepiece(builtin_pydoc()[:200], BASE, tmp_path / "base")
    exp = config.load(None, [
        "model.vocab_size=416", "model.hidden_size=64", "model.intermediate_size=128",
        "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1", "model.max_seq_len=64",
        "data.seq_len=64", "data.tokenizer.kind=sentencepiece", f"data.tokenizer.path={base_model}",
        f"data.tokenizer.vocab_size={BASE}", f"run_dir={tmp_path / 'base_run'}"])
    params = random_params(exp.model)
    write_run(exp, params, tmp_path / "base_run")
    new = tmp_path / "new.txt"
    new.write_text("\n\n".join(new_domain_text()))

    with pytest.raises(SystemExit) as e:  # more pieces than the text has: a one-line error
        cli.main(["tokenizer", "extend", str(tmp_path / "base_run"), "--source", str(new),
                  "--pieces", "100000", "--out", str(tmp_path / "too_many")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: tokenizer extend: --pieces 100000") \
        and err.count("\n") == 1

    cli.main(["tokenizer", "extend", str(tmp_path / "base_run"), "--source", str(new),
              "--pieces", "400", "--out", str(tmp_path / "ext")])
    old_tok = SentencePieceTokenizer(base_model)
    new_tok = SentencePieceTokenizer(tmp_path / "ext" / "tokenizer.model")
    sample = " ".join(new_domain_text(50, seed=1))
    assert len(new_tok.encode(sample)) < 0.7 * len(old_tok.encode(sample))
    assert new_tok.vocab_size > BASE
    for i in range(BASE):  # every old id keeps its piece
        assert new_tok.sp.id_to_piece(i) == old_tok.sp.id_to_piece(i)
    english = "The for statement is used to iterate over the elements of a sequence."
    assert new_tok.decode(new_tok.encode(english)) == english

    ext_exp, ext_params = restore_run_params(tmp_path / "ext")
    emb = np.asarray(ext_params["embed_tokens"]["embedding"])
    assert ext_exp.model.vocab_size == new_tok.vocab_size == emb.shape[0]
    np.testing.assert_array_equal(emb[:BASE], params["embed_tokens"]["embedding"][:BASE])
    mean = np.asarray(params["embed_tokens"]["embedding"][:BASE]).mean(0)  # padding rows left out
    np.testing.assert_allclose(emb[BASE:], np.broadcast_to(mean, emb[BASE:].shape), rtol=1e-4, atol=1e-7)
    head = np.asarray(ext_params["lm_head"]["kernel"])
    np.testing.assert_array_equal(head[:, :BASE], params["lm_head"]["kernel"][:, :BASE])

    cont = config.load(tmp_path / "ext" / "resolved.yaml", [
        f"run_dir={tmp_path / 'cont'}", f"model.init_from=run:{tmp_path / 'ext'}",
        f"data.sources=[{new}]", "data.split_paragraphs=true", "train.steps=4",
        "train.batch_size=8", "logging.progress_bar=false", "logging.plot=false",
        "train.eval_batches=0", "checkpoint.async_save=false"])
    last = loop.run(cont)
    assert np.isfinite(last["loss"])
    _, trained = restore_run_params(tmp_path / "cont")
    moved = np.abs(np.asarray(trained["embed_tokens"]["embedding"])[BASE:] - emb[BASE:]).max()
    assert moved > 0  # the new pieces are being learned

    # The continued run samples from the command line with its extended tokenizer.
    capsys.readouterr()
    prompt = " ".join(new_domain_text(1, seed=2)[0].split()[:4])
    cli.main(["generate", "--checkpoint", str(tmp_path / "cont"), "--prompt", prompt,
              "--max-new-tokens", "8"])
    ids = [new_tok.bos_id] + new_tok.encode(prompt)
    with sharding.use(sharding.make_mesh(cont.mesh), cont.mesh.rules):
        out = generate(trained, cont.model, [ids], max_new_tokens=8, stop_tokens=[new_tok.eos_id])
    want = [t for t in out["tokens"][0][:out["lengths"][0]] if t != new_tok.eos_id]
    assert capsys.readouterr().out == f"{prompt!r} -> {new_tok.decode(want)!r}\n"
