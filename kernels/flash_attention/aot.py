"""Compile attention forward+backward for a TPU topology on any host with libtpu: proves the
Mosaic kernels lower (interpret mode does not check Mosaic's rules) and gives per-chip memory."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from .api import flash_attention
from .reference import attention as reference_attention


def compile_attention_grad(impl: str, topology: str, batch=8, heads=16, kv_heads=16, seq=2048,
                           head_dim=128, dtype=jnp.bfloat16, causal=True):
    """Compiled grad of sum(attention(q, k, v)^2) w.r.t. q, k, v on `topology`, batch sharded
    over its chips inside shard_map. impl: "flash" (our TPU kernel) or "xla" (the jnp
    reference, left to XLA). Returns the jax Compiled object."""
    from jaxllm.compile_plan import topology_devices

    mesh = Mesh(topology_devices(topology), ("data",))
    x_spec, seg_spec = P("data", None, None, None), P("data", None)

    def attend(q, k, v, seg):
        if impl == "flash":
            return flash_attention(q, k, v, seg, causal=causal, backend="tpu")
        return reference_attention(q, k, v, seg, causal=causal)[0]

    def loss(q, k, v, seg):
        out = jax.shard_map(attend, mesh=mesh, in_specs=(x_spec, x_spec, x_spec, seg_spec),
                            out_specs=x_spec, check_vma=False)(q, k, v, seg)
        return jnp.sum(jnp.square(out.astype(jnp.float32)))

    sharded = NamedSharding(mesh, P("data"))
    args = [jax.ShapeDtypeStruct((batch, seq, heads, head_dim), dtype, sharding=sharded),
            *[jax.ShapeDtypeStruct((batch, seq, kv_heads, head_dim), dtype, sharding=sharded)] * 2,
            jax.ShapeDtypeStruct((batch, seq), jnp.int32, sharding=sharded)]
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
