"""Post-training end to end on a task with checkable answers: pretrain -> SFT -> reward model
-> DPO, with a held-out metric after each stage.

    python experiments/pipeline/run.py [--out runs/pipeline] [--quick]

The task (jaxllm.data.synthetic): "Reverse: <word>\\nAnswer: " -> the word reversed, random
letters (3-5), byte-level tokens. Held-out words are never trained on. Stages:
  1. pretrain a tiny model from scratch on Python's pydoc text (general text, no task data);
  2. SFT (all weights) on the instructions;
  3. sample the SFT model on the training prompts; preference pairs = correct answer vs the
     model's own wrong answer (a near miss where it was right);
  4. a reward model (from the SFT weights) on those pairs;
  5. DPO from the SFT weights on the same pairs, the SFT model as the frozen reference, with
     the chosen answers' NLL added (dpo.sft_weight, RPO) so they do not sink with the rejected.
Metrics on held-out words: exact match of greedy answers; the reward model's pairwise accuracy
on held-out pairs; DPO's implicit-reward preference accuracy on the same pairs."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import config, generate
from jaxllm.data import ByteTokenizer, synthetic
from jaxllm.data.posttrain import build_rows
from jaxllm.tasks.reward import score
from jaxllm.tasks.sequences import pair_rows, sequence_logps
from jaxllm.train import loop
from jaxllm.train.checkpoint import restore_run_params

MODEL = ["model.preset=tiny", "model.vocab_size=259", "model.hidden_size=192",
         "model.num_layers=3", "model.num_heads=6", "model.num_kv_heads=2",
         "model.intermediate_size=512", "model.max_seq_len=128"]
COMMON = ["data.tokenizer.kind=byte", "logging.progress_bar=false", "logging.every_steps=50",
          "logging.plot=false", "checkpoint.every_steps=100000", "checkpoint.async_save=false"]


def train(out: Path, name: str, overrides: list[str]) -> Path:
    run_dir = out / name
    exp = config.load(None, [f"name={name}", f"run_dir={run_dir}", *MODEL, *COMMON, *overrides])
    t0 = time.perf_counter()
    last = loop.run(exp)
    print(f"[{name}] {time.perf_counter() - t0:.0f}s, final loss {last['loss']:.3f}", flush=True)
    return run_dir


def answers(params, cfg, words: list[str], tok, temperature=0.0, seed=0) -> list[str]:
    prompts = [[tok.bos_id] + tok.encode(synthetic.prompt(w)) for w in words]
    out = generate.generate(params, cfg, prompts, max_new_tokens=8, temperature=temperature,
                            key=jax.random.key(seed), stop_tokens=[tok.eos_id])
    return [tok.decode(t[:n]).split("\n")[0].strip() for t, n in zip(out["tokens"], out["lengths"])]


def exact_match(params, cfg, words, tok) -> float:
    return float(np.mean([a == synthetic.answer(w) for a, w in zip(answers(params, cfg, words, tok), words)]))


def pair_batch(rows, tok, data_cfg):
    return {k: jnp.asarray(v) for k, v in build_rows(rows, tok, data_cfg).items()}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/pipeline")
    p.add_argument("--quick", action="store_true", help="a few steps per stage (a smoke test)")
    args = p.parse_args()
    out = Path(args.out)
    k = 0.05 if args.quick else 1.0
    steps = {s: max(4, int(n * k)) for s, n in
             {"pretrain": 300, "sft": 1000, "reward": 600, "dpo": 120}.items()}
    tok = ByteTokenizer()
    train_words, test_words = synthetic.split(8000, 200, seed=0)
    data = out / "data"
    synthetic.write_jsonl(data / "sft.jsonl", synthetic.instruct_rows(train_words))
    t_start = time.perf_counter()

    base_dir = train(out, "base", [
        "task=pretrain", "data.sources=[builtin:pydoc]", "data.seq_len=128",
        "train.batch_size=16", f"train.steps={steps['pretrain']}", "optimizer.lr=3e-3",
        "optimizer.warmup_steps=20"])
    sft_dir = train(out, "sft", [
        "task=sft", "data.format=instruct", f"data.sources=[{data / 'sft.jsonl'}]",
        "data.seq_len=64", "data.eval_fraction=0.02", f"model.init_from=run:{base_dir}",
        "train.batch_size=16", f"train.steps={steps['sft']}", "optimizer.lr=2e-3",
        "optimizer.warmup_steps=20", "optimizer.weight_decay=0.0"])

    exp_sft, sft_params = restore_run_params(sft_dir)
    cfg = exp_sft.model
    # On-policy pairs: the SFT model's own sampled mistakes are the rejected answers.
    pair_words = train_words
    sampled = answers(sft_params, cfg, pair_words, tok, temperature=1.0, seed=1)
    wrong = {w: a for w, a in zip(pair_words, sampled) if a != synthetic.answer(w) and a}
    synthetic.write_jsonl(data / "pairs.jsonl", synthetic.preference_rows(pair_words, wrong, seed=1))
    test_sampled = answers(sft_params, cfg, test_words, tok, temperature=1.0, seed=2)
    test_pairs = synthetic.preference_rows(
        test_words, {w: a for w, a in zip(test_words, test_sampled) if a != synthetic.answer(w)}, seed=2)
    print(f"pairs: {len(wrong)} of {len(pair_words)} rejected answers are the SFT model's own")

    pref = ["data.format=preference", f"data.sources=[{data / 'pairs.jsonl'}]", "data.seq_len=32",
            "data.eval_fraction=0.02", f"model.init_from=run:{sft_dir}", "train.batch_size=16",
            "optimizer.warmup_steps=10", "optimizer.weight_decay=0.0"]
    rm_dir = train(out, "reward", ["task=reward", *pref, f"train.steps={steps['reward']}",
                                   "optimizer.lr=3e-4", "reward.center_coef=0.01"])
    dpo_dir = train(out, "dpo", ["task=dpo", *pref, f"train.steps={steps['dpo']}",
                                 "optimizer.lr=1e-4", "dpo.beta=0.1", "dpo.sft_weight=1.0"])

    # Held-out metrics.
    exp_rm, rm_params = restore_run_params(rm_dir)
    exp_dpo, dpo_params = restore_run_params(dpo_dir)
    _, base_params = restore_run_params(base_dir)
    pairs = pair_batch([{"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]}
                        for r in test_pairs], tok, exp_rm.data)
    rows, n = pair_rows(pairs), len(test_pairs)
    r = score(rm_params, cfg, rows["tokens"], rows["segment_ids"], rows["positions"])
    rm_acc = float(jnp.mean(r[:n] > r[n:]))

    def implicit_acc(params):
        pol = sequence_logps(params, cfg, rows)[0]
        ref = sequence_logps(sft_params, cfg, rows)[0]
        d = (pol[:n] - ref[:n]) - (pol[n:] - ref[n:])
        return float(jnp.mean(d > 0))

    table = [("base (pretrained)", exact_match(base_params, cfg, test_words, tok), None, None),
             ("SFT", exact_match(sft_params, cfg, test_words, tok), None, None),
             ("reward model", None, rm_acc, None),
             ("DPO", exact_match(dpo_params, cfg, test_words, tok), None, implicit_acc(dpo_params))]
    fmt = lambda v: "-" if v is None else f"{100 * v:.1f}%"
    lines = ["| stage | exact match (held-out, greedy) | RM pairwise acc | DPO preference acc |",
             "|---|---|---|---|"]
    lines += [f"| {s} | {fmt(a)} | {fmt(b)} | {fmt(c)} |" for s, a, b, c in table]
    report = "\n".join(lines) + f"\n\n{len(test_words)} held-out words; total {time.perf_counter() - t_start:.0f}s\n"
    (out / "results.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
