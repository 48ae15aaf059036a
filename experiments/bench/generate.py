"""Generation throughput: jaxllm's jitted KV-cache sampler vs Hugging Face `generate`, on the
same weights (a random HF Llama imported through our converter), greedy.

    python experiments/bench/generate.py [--batch 8] [--prompt 64] [--new 128] [--reps 3]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import jax
import numpy as np

from jaxllm import models
from jaxllm.generate import generate
from jaxllm.interop import hf


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import torch
    import transformers

    shape = models.preset("bench-7m")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_seq_len)).eval()
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        cfg, params = hf.load(d)
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.prompt))
    new_tokens = args.batch * args.new

    def ours():
        return generate(params, cfg, prompts.tolist(), max_new_tokens=args.new)["tokens"]

    def theirs():
        with torch.no_grad():
            return model.generate(torch.tensor(prompts), max_new_tokens=args.new, do_sample=False,
                                  min_new_tokens=args.new, pad_token_id=0).numpy()[:, args.prompt:]

    results = {}
    for name, fn in (("jaxllm generate (jit, while_loop)", ours),
                     (f"HF transformers generate (torch {torch.__version__})", theirs)):
        out = fn()  # warm-up / compile
        best = float("inf")
        for _ in range(args.reps):
            t = time.perf_counter()
            out = fn()
            best = min(best, time.perf_counter() - t)
        results[name] = (best, np.asarray(out))
    (a_name, (a_t, a_out)), (b_name, (b_t, b_out)) = results.items()
    same = float((a_out == b_out).mean())
    print(f"\nbench-7m ({models.count_params(cfg)['total']:,} params), batch {args.batch}, prompt "
          f"{args.prompt}, {args.new} new tokens, greedy; {jax.devices()[0].platform}")
    print(f"| {'implementation':<44} | {'seconds':>8} | {'new tokens/s':>12} | {'speed-up':>8} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 14}|{'-' * 10}|")
    for name, t in ((a_name, a_t), (b_name, b_t)):
        print(f"| {name:<44} | {t:8.3f} | {new_tokens / t:12,.0f} | {b_t / t:7.2f}x |")
    print(f"greedy tokens identical: {100 * same:.1f}%")


if __name__ == "__main__":
    main()
