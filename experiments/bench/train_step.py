"""Training-step throughput: jaxllm vs Hugging Face transformers + torch AdamW, same shapes.

    python experiments/bench/train_step.py [--rounds 5] [--steps 4] [--batch 8] [--seq 256] [--no-hf]

Shape (default): V=8192, d=256, 4 layers, 8 heads, 4 kv heads, MLP 768, batch 8 x 256, fp32,
AdamW. Prints tokens/s, TFLOP/s and MFU for both and the ratio; torch and transformers come with
the `hf` extra. Both sides get the same number of threads (all cores), and are timed in
interleaved rounds (median), so a busy shared machine slows all of them alike."""
from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import numpy as np

from jaxllm import config, models, sharding
from jaxllm.tasks import pretrain
from jaxllm.train import step as step_lib
from jaxllm.train.metrics import peak_flops_per_device
from jaxllm.train.optimizer import make_optimizer, schedule


def batch_of(rng, batch, seq, vocab):
    tokens = rng.integers(0, vocab, (batch, seq + 1)).astype(np.int32)
    return {"tokens": tokens[:, :-1], "targets": tokens[:, 1:],
            "segment_ids": np.ones((batch, seq), np.int32),
            "positions": np.broadcast_to(np.arange(seq, dtype=np.int32), (batch, seq)).copy(),
            "loss_mask": np.ones((batch, seq), np.float32)}


def jaxllm_step(exp, batches):
    """A function running one compiled training step (compiled here)."""
    mesh = sharding.single_device_mesh()
    opt = make_optimizer(exp.optimizer, exp.train.steps)
    abstract = step_lib.abstract_state(exp, opt, mesh)
    state = step_lib.init_state(exp, opt, mesh)
    train_step = step_lib.make_train_step(exp, pretrain.PretrainTask().loss_fn(exp), opt,
                                          schedule(exp.optimizer, exp.train.steps), mesh, abstract)

    def one(i):
        nonlocal state
        state, m = train_step(state, batches[i % len(batches)])
        return m
    jax.block_until_ready(one(0))  # compile
    return lambda i: jax.block_until_ready(one(i))


def hf_step(cfg, batches):
    import torch
    import transformers
    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        max_position_embeddings=cfg.max_seq_len, tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(hf_cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)

    def one(i):
        b = batches[i % len(batches)]
        out = model(input_ids=torch.from_numpy(b["tokens"]).long(),
                    labels=torch.from_numpy(b["targets"]).long())
        # HF shifts labels itself; we pass pre-shifted targets, the cost is the same.
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    one(0)
    return one


def interleaved(fns: dict, rounds: int, steps: int) -> dict:
    """Seconds per step of each function: `rounds` rounds, each timing `steps` steps of every
    function in turn (so load on a shared machine hits all alike); the median round counts."""
    times = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            for i in range(steps):
                fn(i)
            times[name].append((time.perf_counter() - t) / steps)
    return {name: float(np.median(ts)) for name, ts in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="steps per round")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (median reported)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--no-hf", action="store_true")
    args = ap.parse_args()
    exp = config.load(None, ["model.preset=bench-7m", f"data.seq_len={args.seq}",
                             f"train.batch_size={args.batch}", "train.steps=1000"])
    cfg = exp.model
    rng = np.random.default_rng(0)
    batches = [batch_of(rng, args.batch, args.seq, cfg.vocab_size) for _ in range(4)]
    tokens = args.batch * args.seq
    flops = models.flops_per_token(cfg, args.seq) * tokens
    peak = peak_flops_per_device() * jax.device_count()
    fns = {"jaxllm (jit, XLA CPU, scanned layers)": jaxllm_step(exp, batches),
           "jaxllm (jit, XLA CPU, unrolled layers)": jaxllm_step(
               dataclasses.replace(exp, model=cfg.replace(scan_layers=False)), batches)}
    if not args.no_hf:
        import torch
        fns[f"HF transformers + torch {torch.__version__} AdamW"] = hf_step(cfg, batches)
    rows = list(interleaved(fns, args.rounds, args.steps).items())
    print(f"\nmodel bench-7m: {models.count_params(cfg)['total']:,} params, batch {args.batch} x "
          f"{args.seq}, fp32; peak (measured matmul) {peak / 1e9:.1f} GFLOP/s")
    print(f"| {'implementation':<40} | {'step ms':>8} | {'tokens/s':>9} | {'GFLOP/s':>8} | "
          f"{'MFU':>6} | {'vs HF':>6} |")
    print(f"|{'-' * 42}|{'-' * 10}|{'-' * 11}|{'-' * 10}|{'-' * 8}|{'-' * 8}|")
    base = rows[-1][1]
    for name, sec in rows:
        print(f"| {name:<40} | {sec * 1e3:8.1f} | {tokens / sec:9,.0f} | {flops / sec / 1e9:8.1f} | "
              f"{100 * flops / sec / peak:5.1f}% | {base / sec:5.2f}x |")


if __name__ == "__main__":
    main()
