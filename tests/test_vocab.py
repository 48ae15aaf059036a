"""Vocabulary extension: a new domain's pieces appended, embeddings grown, training continues."""
import random

import jax
import numpy as np

from jaxllm import cli, config, models
from jaxllm.data import SentencePieceTokenizer, train_sentencepiece
from jaxllm.data.sources import builtin_pydoc
from jaxllm.train import loop
from jaxllm.train.checkpoint import restore_run_params, write_run


def new_domain_text(n=400, seed=0):
    """A made-up language: 40 invented words in random sentences."""
    rng = random.Random(seed)
    words = ["".join(rng.choice("qzxkvjwy") + rng.choice("aeiou") for _ in range(rng.randint(2, 4)))
             for _ in range(40)]
    return [" ".join(rng.choice(words) for _ in range(12)) + "." for _ in range(n)]


def test_extend_tokenizer_then_continue_pretraining(tmp_path):
    base_model = train_sentencepiece(builtin_pydoc()[:200], 400, tmp_path / "base")
    exp = config.load(None, [
        "model.vocab_size=400", "model.hidden_size=64", "model.intermediate_size=128",
        "model.num_layers=2", "model.num_heads=2", "model.num_kv_heads=1", "model.max_seq_len=64",
        "data.seq_len=64", "data.tokenizer.kind=sentencepiece", f"data.tokenizer.path={base_model}",
        "data.tokenizer.vocab_size=400", f"run_dir={tmp_path / 'base_run'}"])
    params = models.init(exp.model, jax.random.key(0))
    write_run(exp, params, tmp_path / "base_run")
    new = tmp_path / "new.txt"
    new.write_text("\n\n".join(new_domain_text()))

    cli.main(["tokenizer", "extend", str(tmp_path / "base_run"), "--source", str(new),
              "--pieces", "400", "--out", str(tmp_path / "ext")])
    old_tok = SentencePieceTokenizer(base_model)
    new_tok = SentencePieceTokenizer(tmp_path / "ext" / "tokenizer.model")
    sample = " ".join(new_domain_text(50, seed=1))
    assert len(new_tok.encode(sample)) < 0.7 * len(old_tok.encode(sample))
    assert new_tok.vocab_size > 400
    english = "The for statement is used to iterate over the elements of a sequence."
    assert new_tok.decode(new_tok.encode(english)) == english

    ext_exp, ext_params = restore_run_params(tmp_path / "ext")
    emb = np.asarray(ext_params["embed_tokens"]["embedding"])
    assert ext_exp.model.vocab_size == new_tok.vocab_size == emb.shape[0]
    np.testing.assert_array_equal(emb[:400], params["embed_tokens"]["embedding"])
    np.testing.assert_allclose(emb[400:], np.broadcast_to(emb[:400].mean(0), emb[400:].shape),
                               rtol=1e-4, atol=1e-7)
    head = np.asarray(ext_params["lm_head"]["kernel"])
    np.testing.assert_array_equal(head[:, :400], params["lm_head"]["kernel"])

    cont = config.load(tmp_path / "ext" / "resolved.yaml", [
        f"run_dir={tmp_path / 'cont'}", f"model.init_from=run:{tmp_path / 'ext'}",
        f"data.sources=[{new}]", "data.split_paragraphs=true", "train.steps=4",
        "train.batch_size=8", "logging.progress_bar=false", "logging.plot=false",
        "train.eval_batches=0", "checkpoint.async_save=false"])
    last = loop.run(cont)
    assert np.isfinite(last["loss"])
    _, trained = restore_run_params(tmp_path / "cont")
    moved = np.abs(np.asarray(trained["embed_tokens"]["embedding"])[400:] - emb[400:]).max()
    assert moved > 0  # the new pieces are being learned
