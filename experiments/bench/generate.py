"""Generation throughput: jaxllm's jitted KV-cache sampler (with its fused CPU decode kernels,
and with XLA's ops only) vs Hugging Face `generate`, on the same weights (a random HF Llama
imported through our converter), greedy; then the decode loop's roofline measured in the run.

    python experiments/bench/generate.py [--batch 8] [--prompt 64] [--new 128] [--reps 5]
        [--preset bench-7m] [--checkpoint-dtype float32|bfloat16]

With --checkpoint-dtype bfloat16 the checkpoint is saved in bfloat16, as published ones are.
jaxllm keeps those weights in bfloat16 (half the bytes to read) and computes in float32;
transformers loads them into float32 (the same values, the same float32 math: its greedy
tokens must equal ours) and, in one more row, runs them in bfloat16.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm import models
from jaxllm.generate import generate
from jaxllm.interop import hf
from jaxllm.kernels import cpu_decode


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--preset", default="bench-7m")
    ap.add_argument("--checkpoint-dtype", choices=("float32", "bfloat16"), default="float32")
    args = ap.parse_args()
    import torch
    import transformers

    shape = models.preset(args.preset)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=shape.vocab_size, hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_seq_len))
    bf16 = args.checkpoint_dtype == "bfloat16"
    with tempfile.TemporaryDirectory() as d:
        model.to(getattr(torch, args.checkpoint_dtype)).save_pretrained(d)
        cfg, params = hf.load(d, dtype=args.checkpoint_dtype)  # float32 math either way
        model = transformers.LlamaForCausalLM.from_pretrained(d, torch_dtype=torch.float32).eval()
        model_bf16 = (transformers.LlamaForCausalLM.from_pretrained(
            d, torch_dtype=torch.bfloat16).eval() if bf16 else None)
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.prompt))
    new_tokens = args.batch * args.new

    def ours():
        return generate(params, cfg, prompts.tolist(), max_new_tokens=args.new)["tokens"]

    def xla_only():  # the same sampler with the fused CPU kernels turned off
        with kernels_off():
            return ours()

    def theirs(hf_model=model):
        with torch.no_grad():
            return hf_model.generate(torch.tensor(prompts), max_new_tokens=args.new,
                                     do_sample=False, min_new_tokens=args.new,
                                     pad_token_id=0).numpy()[:, args.prompt:]

    prefill = lambda: generate(params, cfg, prompts.tolist(), max_new_tokens=1)["tokens"]  # noqa: E731
    runs = {"ours": ours, "xla": xla_only, "theirs": theirs, "prefill": prefill}
    if bf16:
        runs["theirs_bf16"] = lambda: theirs(model_bf16)
    timings = {name: [] for name in runs}
    outs = {}
    for rep in range(args.reps + 1):  # interleaved rounds; the first one compiles / warms up
        for name, fn in runs.items():
            t = time.perf_counter()
            outs[name] = np.asarray(fn())
            if rep:
                timings[name].append(time.perf_counter() - t)
    best = {name: min(t) for name, t in timings.items()}
    a_t, b_t = best["ours"], best["theirs"]
    same = float((outs["ours"] == outs["theirs"]).mean())
    same_xla = float((outs["xla"] == outs["theirs"]).mean())
    print(f"\n{args.preset} ({models.count_params(cfg)['total']:,} params), {args.checkpoint_dtype} "
          f"checkpoint, batch {args.batch}, prompt {args.prompt}, {args.new} new tokens, greedy; "
          f"{jax.devices()[0].platform}, best of {args.reps} interleaved rounds")
    print(f"| {'implementation':<68} | {'seconds':>8} | {'new tokens/s':>12} | {'speed-up':>8} |")
    print(f"|{'-' * 70}|{'-' * 10}|{'-' * 14}|{'-' * 10}|")
    fused = "fused CPU kernels" if cpu_decode.available() else "kernels UNAVAILABLE, XLA ops"
    held = f"{args.checkpoint_dtype} weights, float32 math"
    rows = [(f"jaxllm generate ({fused}; {held})", a_t),
            (f"jaxllm generate (XLA ops only; {held})", best["xla"]),
            (f"HF transformers generate (torch {torch.__version__}; float32)", b_t)]
    if bf16:
        rows.append(("HF transformers generate (bfloat16 weights and math)", best["theirs_bf16"]))
    for name, t in rows:
        print(f"| {name:<68} | {t:8.3f} | {new_tokens / t:12,.0f} | {b_t / t:7.2f}x |")
    roofline(cfg, params, args, a_t, b_t, best["prefill"])
    print(f"greedy tokens identical to HF in float32: {100 * same:.1f}% (XLA ops only: "
          f"{100 * same_xla:.1f}%)")


@contextlib.contextmanager
def kernels_off():
    before = os.environ.get("JAXLLM_CPU_KERNELS")
    os.environ["JAXLLM_CPU_KERNELS"] = "0"
    try:
        yield
    finally:
        if before is None:
            del os.environ["JAXLLM_CPU_KERNELS"]
        else:
            os.environ["JAXLLM_CPU_KERNELS"] = before


def stream_rates(dtype: str) -> dict[str, float]:
    """Bytes/s at which kernels too big for the caches stream through a batch-8 product (what
    a decode step does with its weights), 16 kernels of 2M weights: XLA:CPU's dot, and our
    packed product (cpu_decode.matmul) where it is available."""
    kernels = [jnp.full((256, 8192), i, dtype) for i in range(16)]
    x = jnp.ones((8, 256), jnp.float32)
    products = {"XLA:CPU's dot": (jax.jit(lambda x, ks: sum(x @ k for k in ks)), kernels)}
    if cpu_decode.available():
        packed = [cpu_decode.pack(k) for k in kernels]
        products["our packed cpu_decode.matmul"] = (
            jax.jit(lambda x, ks: sum(cpu_decode.matmul(x, k, 8192) for k in ks)), packed)
    rates = {}
    for name, (step, ks) in products.items():
        step(x, ks).block_until_ready()
        best = min(_timed(lambda: step(x, ks).block_until_ready()) for _ in range(10))
        rates[f"{dtype} weights through a batch-8 product: {name}"] = (
            sum(k.nbytes for k in kernels) / best)
    return rates


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
    the KV cache (float32) up to its position, so no sampler can run its steps faster than
    those bytes stream."""
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    if not cfg.tie_embeddings:
        weights -= params["embed_tokens"]["embedding"].nbytes
    slots = -(-args.prompt // 16) * 16 + args.new / 2  # prompts padded to a multiple of 16
    kv = 2 * cfg.num_layers * args.batch * cfg.num_kv_heads * slots * cfg.dim_per_head * 4
    steps = args.new - 1
    print(f"\nRoofline: a decode step reads {(weights + kv) / 1e6:.1f} MB (weights "
          f"{weights / 1e6:.1f} MB, KV cache {kv / 1e6:.1f} MB on average); prefill measured "
          f"{prefill_s:.3f} s; "
          f"our {steps} decode steps took {ours_s - prefill_s:.3f} s.")
    print(f"| {'bandwidth (measured now)':<72} | {'GB/s':>5} | {'steps >=':>8} | "
          f"{'+ prefill':>9} | {'max vs HF':>9} |")
    print(f"|{'-' * 74}|{'-' * 7}|{'-' * 10}|{'-' * 11}|{'-' * 11}|")
    rates = stream_rates(args.checkpoint_dtype) | {"memory read, all threads (torch sum of 256 MiB)": read_rate()}
    for name, rate in rates.items():
        floor = steps * (weights + kv) / rate
        print(f"| {name:<72} | {rate / 1e9:5.1f} | {floor:8.3f} | {prefill_s + floor:9.3f} | "
              f"{theirs_s / (prefill_s + floor):8.1f}x |")


if __name__ == "__main__":
    main()
