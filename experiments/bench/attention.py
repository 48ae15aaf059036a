"""Flash attention: GPU timings, or TPU per-chip memory plans compiled on any host.

    python experiments/bench/attention.py                      # on a GPU: time fwd+bwd
    python experiments/bench/attention.py --tpu-aot v5e:2x2    # any host with libtpu

GPU: causal fwd+bwd, bf16, batch 8 x 16 heads x head_dim 128, for several lengths: ours
(Triton), XLA's attention on the jnp reference, cuDNN through jax.nn.dot_product_attention,
and the Triton kernel that ships in jax (jax.experimental.pallas.ops.gpu.attention), all in
this one process. TPU: per-chip arguments and temporaries of the compiled fwd+bwd, ours vs
XLA's, for the same shapes on the given topology."""
from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from jaxllm.kernels.flash_attention import flash_attention, reference_attention


def _inputs(batch, heads, kv_heads, seq, d, seed=0):
    ks = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(ks[0], (batch, seq, heads, d), jnp.bfloat16)
    k = jax.random.normal(ks[1], (batch, seq, kv_heads, d), jnp.bfloat16)
    v = jax.random.normal(ks[2], (batch, seq, kv_heads, d), jnp.bfloat16)
    return q, k, v


def _impls(heads, kv_heads):
    def ours(q, k, v):
        return flash_attention(q, k, v, causal=True)

    def xla(q, k, v):
        return reference_attention(q, k, v, causal=True)[0]

    def cudnn(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")

    impls = {"jaxllm flash (Triton)": ours, "XLA (jnp reference)": xla, "cuDNN": cudnn}
    if heads == kv_heads:  # jax's bundled kernel is wrong for grouped heads (REFERENCES.md)
        from jax.experimental.pallas.ops.gpu import attention as jax_mha

        def bundled(q, k, v):
            return jax_mha.mha(q, k, v, segment_ids=None, causal=True)
        impls["jax bundled Triton mha"] = bundled
    return impls


def time_gpu(args):
    flops_note = "TFLOP/s counts causal fwd+bwd as 3.5 x 4 x B x H x S^2 x D / 2 (7 matmuls, half masked)"
    print(f"{'seq':>6} {'implementation':<26} {'ms fwd+bwd':>11} {'TFLOP/s':>8}")
    for seq in args.seqs:
        q, k, v = _inputs(args.batch, args.heads, args.kv_heads, seq, args.head_dim)
        flops = 3.5 * 4 * args.batch * args.heads * seq * seq * args.head_dim / 2
        for name, fn in _impls(args.heads, args.kv_heads).items():
            step = jax.jit(jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32)),
                                    argnums=(0, 1, 2)))
            try:
                jax.block_until_ready(step(q, k, v))
            except Exception as e:  # e.g. cuDNN absent: report, keep going
                print(f"{seq:>6} {name:<26} {'failed: ' + str(e).splitlines()[0][:60]}")
                continue
            t0 = time.perf_counter()
            for _ in range(args.iters):
                out = step(q, k, v)
            jax.block_until_ready(out)
            ms = (time.perf_counter() - t0) / args.iters * 1e3
            print(f"{seq:>6} {name:<26} {ms:>11.2f} {flops / ms / 1e9:>8.1f}")
    print(flops_note)


def tpu_memory(args):
    from jaxllm.kernels.flash_attention.aot import compile_attention_grad

    print(f"per-chip memory of causal fwd+bwd on {args.tpu_aot}, batch {args.batch} sharded "
          f"over chips, {args.heads} heads / {args.kv_heads} kv heads, head_dim {args.head_dim}, bf16")
    print(f"{'seq':>6} {'implementation':<16} {'arguments MiB':>14} {'temporaries MiB':>16} "
          f"{'compile s':>10}")
    for seq in args.seqs:
        for impl in ("flash", "xla"):
            t0 = time.perf_counter()
            try:
                m = compile_attention_grad(impl, args.tpu_aot, batch=args.batch, heads=args.heads,
                                           kv_heads=args.kv_heads, seq=seq,
                                           head_dim=args.head_dim).memory_analysis()
            except Exception as e:  # XLA's out-of-memory at compile time is an answer too
                print(f"{seq:>6} {impl:<16} {'does not compile: ' + str(e).splitlines()[0][:70]}")
                continue
            print(f"{seq:>6} {impl:<16} {m.argument_size_in_bytes / 2**20:>14.1f} "
                  f"{m.temp_size_in_bytes / 2**20:>16.1f} {time.perf_counter() - t0:>10.1f}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tpu-aot", metavar="TOPOLOGY", help="compile for a TPU topology, e.g. v5e:2x2")
    p.add_argument("--seqs", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--iters", type=int, default=20)
    args = p.parse_args()
    if args.tpu_aot:
        tpu_memory(args)
    elif jax.default_backend() == "gpu":
        time_gpu(args)
    else:
        raise SystemExit("no GPU here: run on a GPU, or pass --tpu-aot TOPOLOGY (needs libtpu)")


if __name__ == "__main__":
    main()
