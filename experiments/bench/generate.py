"""Generation throughput: jaxllm's jitted KV-cache sampler vs Hugging Face `generate`, on the
same weights (a random HF Llama imported through our converter), greedy.

    python experiments/bench/generate.py [--batch 8] [--prompt 64] [--new 128] [--reps 5] [--preset bench-7m]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import models
from jaxllm.generate import generate
from jaxllm.interop import hf


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--preset", default="bench-7m")
    args = ap.parse_args()
    import torch
    import transformers

    shape = models.preset(args.preset)
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

    timings = {"ours": [], "theirs": [], "prefill": []}
    outs = {}
    prefill = lambda: generate(params, cfg, prompts.tolist(), max_new_tokens=1)["tokens"]  # noqa: E731
    for rep in range(args.reps + 1):  # interleaved rounds; the first one compiles / warms up
        for name, fn in (("ours", ours), ("theirs", theirs), ("prefill", prefill)):
            t = time.perf_counter()
            outs[name] = np.asarray(fn())
            if rep:
                timings[name].append(time.perf_counter() - t)
    a_t, b_t, p_t = (min(timings[k]) for k in ("ours", "theirs", "prefill"))
    same = float((outs["ours"] == outs["theirs"]).mean())
    print(f"\n{args.preset} ({models.count_params(cfg)['total']:,} params), batch {args.batch}, prompt "
          f"{args.prompt}, {args.new} new tokens, greedy; {jax.devices()[0].platform}, best of "
          f"{args.reps} interleaved rounds")
    print(f"| {'implementation':<44} | {'seconds':>8} | {'new tokens/s':>12} | {'speed-up':>8} |")
    print(f"|{'-' * 46}|{'-' * 10}|{'-' * 14}|{'-' * 10}|")
    for name, t in (("jaxllm generate (jit, while_loop)", a_t),
                    (f"HF transformers generate (torch {torch.__version__})", b_t)):
        print(f"| {name:<44} | {t:8.3f} | {new_tokens / t:12,.0f} | {b_t / t:7.2f}x |")
    roofline(cfg, params, args, a_t, b_t, p_t)
    print(f"greedy tokens identical: {100 * same:.1f}%")


def stream_rate() -> float:
    """Bytes/s at which XLA:CPU streams fp32 kernels it cannot keep in cache through a batch-8
    product (what a decode step does with its weights): 16 kernels of 8 MiB, 128 MiB in all."""
    kernels = [jnp.full((256, 8192), i, jnp.float32) for i in range(16)]
    x = jnp.ones((8, 256), jnp.float32)
    step = jax.jit(lambda x, ks: sum(x @ k for k in ks))
    step(x, kernels).block_until_ready()
    best = min(_timed(lambda: step(x, kernels).block_until_ready()) for _ in range(10))
    return sum(k.nbytes for k in kernels) / best


def read_rate() -> float:
    """Bytes/s this machine's memory delivers to a plain multi-threaded read (torch sum over
    256 MiB): the bandwidth ceiling whatever the matmul kernels."""
    import torch
    data = torch.rand(64 * 2**20)
    best = min(_timed(data.sum) for _ in range(5))
    return data.numel() * 4 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def roofline(cfg, params, args, ours_s, theirs_s, prefill_s):
    """The decode loop's floor on this machine: every step reads all weights but the embedding
    table (its B rows are a gather; a tied table is read whole as the output projection) and
    the whole KV buffer, so no fp32 sampler can run its steps faster than those bytes stream."""
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    if not cfg.tie_embeddings:
        weights -= params["embed_tokens"]["embedding"].nbytes
    slots = -(-args.prompt // 16) * 16 + args.new  # generate() pads prompts to a multiple of 16
    kv = 2 * cfg.num_layers * args.batch * cfg.num_kv_heads * slots * cfg.dim_per_head * 4
    steps = args.new - 1
    print(f"\nRoofline: a decode step reads {(weights + kv) / 1e6:.1f} MB (weights "
          f"{weights / 1e6:.1f} MB, KV cache {kv / 1e6:.1f} MB); prefill measured {prefill_s:.3f} s; "
          f"our {steps} decode steps took {ours_s - prefill_s:.3f} s.")
    print(f"| {'bandwidth (measured now)':<52} | {'GB/s':>5} | {'steps >=':>8} | "
          f"{'+ prefill':>9} | {'max vs HF':>9} |")
    print(f"|{'-' * 54}|{'-' * 7}|{'-' * 10}|{'-' * 11}|{'-' * 11}|")
    for name, rate in (("XLA:CPU streaming fp32 kernels through a batch-8 dot", stream_rate()),
                       ("memory read, all threads (torch sum of 256 MiB)", read_rate())):
        floor = steps * (weights + kv) / rate
        print(f"| {name:<52} | {rate / 1e9:5.1f} | {floor:8.3f} | {prefill_s + floor:9.3f} | "
              f"{theirs_s / (prefill_s + floor):8.1f}x |")


if __name__ == "__main__":
    main()
