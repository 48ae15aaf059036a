"""LoRA as a transform over the params pytree, and a QLoRA-style int8 base.

Adapters mirror the params tree: for every targeted projection (by module name, e.g. q_proj)
there is {"a": [..., in, r], "b": [..., r, out]}, stacked over layers like the kernel they
adapt. `attach` puts them beside their kernels for the model's layers to add x A B in the
forward pass (no merged copy of the weights in memory; training uses it); `apply`/`merge`
return params whose targeted kernels are W + scale * A @ B (export, generation). A is random
and B zero, so step 0 equals the base model. The base is frozen: only the adapters reach the
optimizer."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from jaxllm.config import LoraConfig

ADAPTABLE = ("kernel", "embedding")


def scale(lcfg: LoraConfig) -> float:
    return lcfg.alpha / (math.sqrt(lcfg.rank) if lcfg.rslora else lcfg.rank)


def _targets(tree, lcfg: LoraConfig):
    """{path tuple: leaf} of the adaptable leaves whose module name is targeted."""
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree, is_leaf=_is_quantized)[0]:
        keys = tuple(p.key for p in path)  # an int8 kernel's dict sits at the kernel's path
        if keys[-1] in ADAPTABLE and len(keys) >= 2 and keys[-2] in lcfg.targets:
            out[keys[:-1]] = leaf
    return out


def _nested(flat: dict) -> dict:
    out: dict = {}
    for keys, value in flat.items():
        node = out
        for k in keys[:-1]:
            node = node.setdefault(k, {})
        node[keys[-1]] = value
    return out


def _flat(tree: dict, prefix=()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, dict) and not ({"a", "b"} == set(v)):
            out.update(_flat(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def _shape(leaf):
    return leaf["int8"].shape if _is_quantized(leaf) else leaf.shape


def abstract(abstract_params, lcfg: LoraConfig, dtype=jnp.float32) -> dict:
    """ShapeDtypeStructs of the adapters for a params tree (or its abstract version)."""
    flat = {}
    for keys, leaf in _targets(abstract_params, lcfg).items():
        *lead, n_in, n_out = _shape(leaf)
        flat[keys] = {"a": jax.ShapeDtypeStruct((*lead, n_in, lcfg.rank), dtype),
                      "b": jax.ShapeDtypeStruct((*lead, lcfg.rank, n_out), dtype)}
    if not flat:
        raise ValueError(f"lora.targets={list(lcfg.targets)}: no such projection in the model")
    return _nested(flat)


def logical_axes(model_logical, lcfg: LoraConfig) -> dict:
    """Adapters shard like the kernels they adapt: A along its input, B along its output."""
    flat = {}
    leaves = jax.tree_util.tree_flatten_with_path(
        model_logical, is_leaf=lambda x: isinstance(x, tuple))[0]
    for path, names in leaves:
        keys = tuple(p.key for p in path)
        if keys[-1] in ADAPTABLE and len(keys) >= 2 and keys[-2] in lcfg.targets:
            *lead, n_in, n_out = names
            flat[keys[:-1]] = {"a": (*lead, n_in, None), "b": (*lead, None, n_out)}
    return _nested(flat)


def init(abstract_adapters, key) -> dict:
    """A ~ U(-1/sqrt(in), 1/sqrt(in)) (PEFT's default bound), B = 0."""
    flat = _flat(abstract_adapters)
    keys = jax.random.split(key, len(flat))
    out = {}
    for k, (path, ab) in zip(keys, sorted(flat.items())):
        bound = 1.0 / math.sqrt(ab["a"].shape[-2])
        out[path] = {"a": jax.random.uniform(k, ab["a"].shape, ab["a"].dtype, -bound, bound),
                     "b": jnp.zeros(ab["b"].shape, ab["b"].dtype)}
    return _nested(out)


def delta(adapter, s: float):
    return s * jnp.einsum("...ir,...ro->...io", adapter["a"].astype(jnp.float32),
                          adapter["b"].astype(jnp.float32))


def apply(base, adapters, lcfg: LoraConfig, sign: float = 1.0):
    """Params with W + sign * scale * A @ B on every adapted kernel (int8 bases dequantised)."""
    flat_adapters = _flat(adapters)
    s = sign * scale(lcfg) if flat_adapters else 0.0

    def visit(path, leaf):
        keys = tuple(p.key for p in path)
        w = dequantize(leaf) if _is_quantized(leaf) else leaf
        ad = flat_adapters.get(keys[:-1])
        if ad is None or keys[-1] not in ADAPTABLE:  # a module's bias is not adapted
            return w
        return (w.astype(jnp.float32) + delta(ad, s)).astype(w.dtype)
    return jax.tree_util.tree_map_with_path(visit, base, is_leaf=_is_quantized)


def attach(base, adapters, lcfg: LoraConfig):
    """Params for the forward pass with the adapters inside the layers: beside each adapted
    kernel W go lora_a = A and lora_b = scale * B, and the model's Dense computes x W + (x A) B
    (models/llama.py _TokenDense), so W + scale A B, a second copy of every adapted weight, is
    never formed. An int8 kernel stays int8 beside its kernel_scale (dequantised in the product).
    Embedding adapters are merged (a lookup has no low-rank product). The same model as
    apply() gives."""
    flat_adapters = _flat(adapters)
    s = scale(lcfg) if flat_adapters else 0.0
    out = base
    if ("embed_tokens",) in flat_adapters:
        emb = base["embed_tokens"]["embedding"]
        merged = emb.astype(jnp.float32) + delta(flat_adapters[("embed_tokens",)], s)
        out = base | {"embed_tokens": {"embedding": merged.astype(emb.dtype)}}

    def visit(node, path):
        if not isinstance(node, dict) or _is_quantized(node):
            return node
        if "kernel" in node:
            w, node = node["kernel"], dict(node)
            if _is_quantized(w):
                node["kernel"], node["kernel_scale"] = w["int8"], w["scale"]
            ad = flat_adapters.get(path)
            if ad is not None:
                node["lora_a"], node["lora_b"] = ad["a"], s * ad["b"]
            return node
        return {k: visit(v, path + (k,)) for k, v in node.items()}
    return visit(out, ())


def merge(base, adapters, lcfg: LoraConfig):
    """Plain params with the adapters folded in (e.g. for export)."""
    return apply(base, adapters, lcfg)


def unmerge(merged, adapters, lcfg: LoraConfig):
    """The base back from merged params (up to rounding in the params' dtype)."""
    return apply(merged, adapters, lcfg, sign=-1.0)


# ----------------------------------------------------------------------------- int8 base

def _is_quantized(x) -> bool:
    return isinstance(x, dict) and set(x) == {"int8", "scale"}


def quantize(params, dtype: str):
    """The frozen base in `dtype`: "param" (as is), "bfloat16", or "int8" (every projection
    kernel as int8 with one fp32 scale per output channel; embeddings and norms kept)."""
    if dtype == "param":
        return params
    if dtype == "bfloat16":
        return jax.tree.map(lambda w: w.astype(jnp.bfloat16), params)

    def visit(path, w):
        if path[-1].key != "kernel" or w.ndim < 2:
            return w
        s = jnp.maximum(jnp.max(jnp.abs(w.astype(jnp.float32)), axis=-2, keepdims=True), 1e-12) / 127
        return {"int8": jnp.round(w / s).astype(jnp.int8), "scale": s}
    return jax.tree_util.tree_map_with_path(visit, params)


def dequantize(leaf, dtype=jnp.float32):
    return (leaf["int8"].astype(jnp.float32) * leaf["scale"]).astype(dtype)


def param_count(tree) -> int:
    return sum(x.size for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- extraction

def extract(base, tuned, lcfg: LoraConfig):
    """Adapters of rank lcfg.rank approximating tuned - base on the targeted kernels, by
    truncated SVD per layer (singular values split as sqrt into A and B). Returns (adapters,
    {module path: fraction of the difference's squared Frobenius norm kept}); the best rank-r
    approximation keeps the r largest squared singular values (Eckart-Young). One layer's
    difference is in host memory (float64) at a time."""
    import numpy as np
    s = scale(lcfg)
    flat_base, flat_tuned = _targets(base, lcfg), _targets(tuned, lcfg)
    out, kept = {}, {}
    for path, w in flat_base.items():
        t = flat_tuned[path]
        lead = w.shape[:-2]
        a_parts, b_parts, sq_kept, sq_total = [], [], 0.0, 0.0
        for i in np.ndindex(*lead):
            diff = np.asarray(t[i], np.float64) - np.asarray(w[i], np.float64)
            u, sv, vt = np.linalg.svd(diff, full_matrices=False)
            r = min(lcfg.rank, sv.shape[0])  # past the matrix's rank, A and B are zero-padded
            root = np.sqrt(sv[:r])
            a, b = np.zeros((diff.shape[0], lcfg.rank)), np.zeros((lcfg.rank, diff.shape[1]))
            a[:, :r], b[:r] = u[:, :r] * root, root[:, None] * vt[:r] / s
            a_parts.append(a)
            b_parts.append(b)
            sq_kept, sq_total = sq_kept + (sv[:r] ** 2).sum(), sq_total + (sv ** 2).sum()
        kept["/".join(path)] = float(sq_kept / sq_total) if sq_total > 0 else 1.0
        out[path] = {"a": jnp.asarray(np.stack(a_parts).reshape(*lead, *a.shape), jnp.float32),
                     "b": jnp.asarray(np.stack(b_parts).reshape(*lead, *b.shape), jnp.float32)}
    return _nested(out), kept


def difference_energy(base, tuned, lcfg: LoraConfig) -> dict:
    """{module path: squared Frobenius norm of tuned - base} on the targeted kernels: weights
    for an overall fraction kept, sum(kept[m] * energy[m]) / sum(energy.values())."""
    flat_tuned = _targets(tuned, lcfg)
    return {"/".join(p): float(jnp.sum(jnp.square(flat_tuned[p].astype(jnp.float32)
                                                  - w.astype(jnp.float32))))
            for p, w in _targets(base, lcfg).items()}
