"""Generation throughput: jaxllm's jitted KV-cache sampler (with its fused CPU decode kernels,
and with XLA's ops only) vs Hugging Face `generate`, on the same weights (a random HF Llama
imported through our converter), greedy; then what bounds the decode loop, measured in the run.

    python experiments/bench/generate.py [--batch 8] [--prompt 64] [--new 128] [--reps 5]
        [--preset bench-7m] [--checkpoint-dtype float32|bfloat16]

With --checkpoint-dtype bfloat16 the checkpoint is saved in bfloat16, as published ones are,
and each side runs it twice:
- in float32 math: jaxllm keeps the weights in bfloat16 (half the bytes to read) and computes
  in float32; transformers loads them into float32 (the same values, the same math: its greedy
  tokens must equal ours);
- as a bfloat16 model (compute_dtype bfloat16, torch_dtype bfloat16): bfloat16 products summed
  in float32 on both sides; jaxllm keeps its KV cache, like HF, in bfloat16, and its norms,
  attention and residual stream in float32 within a decode step.
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
    ap.add_argument("--batch", type=_positive, default=8)
    ap.add_argument("--prompt", type=_positive, default=64)
    ap.add_argument("--new", type=_positive, default=128)
    ap.add_argument("--reps", type=_positive, default=5)
    ap.add_argument("--preset", choices=sorted(models.PRESETS), default="bench-7m")
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
    cfg_bf16 = cfg.replace(compute_dtype="bfloat16")
    prompts = np.random.default_rng(0).integers(3, cfg.vocab_size, (args.batch, args.prompt))
    new_tokens = args.batch * args.new

    def ours(cfg=cfg):
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
        runs["ours_bf16"] = lambda: ours(cfg_bf16)
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
    fused = "fused CPU kernels" if cpu_decode.available() else "kernels UNAVAILABLE, XLA ops"
    held = f"{args.checkpoint_dtype} weights, float32 math"
    rows = [(f"jaxllm generate ({fused}; {held})", a_t),
            (f"jaxllm generate (XLA ops only; {held})", best["xla"]),
            (f"HF transformers generate (torch {torch.__version__}; float32)", b_t)]
    ratios = {"vs HF float32": b_t}
    if bf16:
        rows[1:1] = [(f"jaxllm generate ({fused}; bfloat16 model)", best["ours_bf16"])]
        rows.append(("HF transformers generate (bfloat16 model)", best["theirs_bf16"]))
        ratios["vs HF bfloat16"] = best["theirs_bf16"]
    print(f"| {'implementation':<68} | {'seconds':>8} | {'new tokens/s':>12} | "
          + " | ".join(f"{r:>14}" for r in ratios) + " |")
    print(f"|{'-' * 70}|{'-' * 10}|{'-' * 14}|" + "|".join("-" * 16 for _ in ratios) + "|")
    for name, t in rows:
        print(f"| {name:<68} | {t:8.3f} | {new_tokens / t:12,.0f} | "
              + " | ".join(f"{ref / t:13.2f}x" for ref in ratios.values()) + " |")
    roofline(cfg, params, args, a_t, b_t, best["prefill"])
    print(f"greedy tokens identical to HF in float32: {100 * same:.1f}% (XLA ops only: "
          f"{100 * same_xla:.1f}%)")
    if bf16:
        same_bf16 = float((outs["ours_bf16"] == outs["theirs_bf16"]).mean())
        print(f"bfloat16 models' greedy tokens, jaxllm's equal to HF's: {100 * same_bf16:.1f}% "
              f"(bfloat16 rounds differently in each; HF float32 vs HF bfloat16: "
              f"{100 * float((outs['theirs'] == outs['theirs_bf16']).mean()):.1f}%)")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


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
        rates[f"bytes from memory: {dtype} weights through {name}"] = (
            sum(k.nbytes for k in kernels) / best)
    return rates


def fma_rate(dtype: str) -> float:
    """Multiply-adds/s of our packed product, batch 8, on a kernel that stays in the caches
    (2 MB in float32), best of 20: what these cores' vector units deliver to a decode step."""
    w = cpu_decode.pack(jnp.full((256, 2048), 0.5, dtype))
    loops = 100

    @jax.jit
    def run(x, w):  # each product feeds the next, so none can be skipped or merged
        body = lambda _, x: x + 1e-9 * cpu_decode.matmul(x, w, 2048)[:, :256]  # noqa: E731
        return jax.lax.fori_loop(0, loops, body, x)
    x = jnp.ones((8, 256), jnp.float32)
    run(x, w).block_until_ready()
    best = min(_timed(lambda: run(x, w).block_until_ready()) for _ in range(20))
    return loops * 8 * 256 * 2048 / best


def read_rate() -> float:
    """Bytes/s this machine's memory delivers to a plain multi-threaded read (torch sum over
    256 MiB)."""
    import torch
    data = torch.rand(64 * 2**20)
    best = min(_timed(data.sum) for _ in range(5))
    return data.numel() * 4 / best


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def roofline(cfg, params, args, ours_s, theirs_s, prefill_s):
    """What bounds the decode loop on this machine, measured in this run. Each step multiplies
    every weight but the embedding table's (its B rows are a gather; a tied table is the output
    projection) into all B rows, and reads the KV cache (float32) up to its position.
    - The multiply-adds, at the rate our product reaches on weights in cache, are close to a
      floor for any float32 sampler on these cores (whose vector units do at most 16 per cycle
      each).
    - The bytes, at the rates they stream from memory when nothing stays in cache, are not: the
      steps' working set (~25 MB on bench-7m) partly stays in this CPU's L3 between steps."""
    weights = sum(x.nbytes for x in jax.tree.leaves(params))
    n_weights = sum(x.size for x in jax.tree.leaves(params))
    if not cfg.tie_embeddings:
        weights -= params["embed_tokens"]["embedding"].nbytes
        n_weights -= params["embed_tokens"]["embedding"].size
    slots = -(-args.prompt // 16) * 16 + args.new / 2  # prompts padded to a multiple of 16
    kv = 2 * cfg.num_layers * args.batch * cfg.num_kv_heads * slots * cfg.dim_per_head * 4
    fmas = args.batch * n_weights + kv / 4 * (cfg.num_heads // cfg.num_kv_heads)
    steps = args.new - 1
    print(f"\nRoofline: a decode step does {fmas / 1e6:.0f} M multiply-adds and reads "
          f"{(weights + kv) / 1e6:.1f} MB (weights {weights / 1e6:.1f} MB, KV cache "
          f"{kv / 1e6:.1f} MB on average); prefill measured {prefill_s:.3f} s; our {steps} "
          f"decode steps took {ours_s - prefill_s:.3f} s.")
    print(f"| {'limit (measured now)':<72} | {'rate':>10} | {'steps >=':>8} | "
          f"{'+ prefill':>9} | {'max vs HF':>9} |")
    print(f"|{'-' * 74}|{'-' * 12}|{'-' * 10}|{'-' * 11}|{'-' * 11}|")
    limits = {}
    if cpu_decode.available():
        rate = fma_rate(args.checkpoint_dtype)
        limits["multiply-adds: our packed product, weights in cache (~ a floor)"] = (
            f"{rate / 1e9:.0f} GFMA/s", steps * fmas / rate)
    rates = stream_rates(args.checkpoint_dtype) | {
        "bytes from memory: a plain read, all threads (torch sum of 256 MiB)": read_rate()}
    for name, rate in rates.items():
        limits[name] = (f"{rate / 1e9:.1f} GB/s", steps * (weights + kv) / rate)
    for name, (rate, floor) in limits.items():
        print(f"| {name:<72} | {rate:>10} | {floor:8.3f} | {prefill_s + floor:9.3f} | "
              f"{theirs_s / (prefill_s + floor):8.1f}x |")


if __name__ == "__main__":
    main()
