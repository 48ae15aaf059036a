"""Fused one-token decode steps for XLA:CPU: a whole decoder layer per call (cpu_decode.cc),
and the output head with each row's argmax and log-sum-exp, over weights packed once per set
of params: float32, or bfloat16 widened exactly as it is read (float32 products), or, for a
model that computes in bfloat16, bfloat16 pairs for bfloat16 products (summed in float32).

The C++ source is compiled on first use with the system's C++ compiler (g++, or $CXX) for
this CPU (-march=native) and cached under $JAXLLM_CACHE_DIR (default ~/.cache/jaxllm), keyed
by the source, the jax version and the CPU's feature flags. Without a compiler, or with
JAXLLM_CPU_KERNELS=0, `available()` is False and sampling keeps XLA's path; both paths are
the same math (tests compare them), the fused one 2.5-3x faster per decode step on bench-7m.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

PANEL = 32  # columns per packed panel (kPanel in cpu_decode.cc)
_SOURCE = Path(__file__).with_name("cpu_decode.cc")
_TARGETS = {"jaxllm_packed_matmul": "JaxllmPackedMatmul",
            "jaxllm_decode_layer": "JaxllmDecodeLayer", "jaxllm_decode_head": "JaxllmDecodeHead"}


def _flags() -> list[str]:
    arm = platform.machine().lower() in ("arm64", "aarch64")
    native = "-mcpu=native" if arm else "-march=native"
    return ["-O3", native, "-ffp-contract=fast", "-std=c++17", "-shared", "-fPIC", "-w"]


def _cpu_signature() -> str:
    """What -march=native compiled for: a cached build is reused only on a CPU like this one."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        return "".join(sorted({ln for ln in lines if ln.startswith(("flags", "model name"))}))
    except OSError:
        return platform.processor() + platform.machine()


def _build() -> Path:
    """The compiled library's path, compiling it unless a matching build is cached. The
    compiler writes a temporary file that is renamed into place, so concurrent first uses
    (pytest workers, processes of one job) never load a half-written library."""
    key = hashlib.sha256(b"\0".join([_SOURCE.read_bytes(), jax.__version__.encode(),
                                     _cpu_signature().encode(), " ".join(_flags()).encode()]))
    cache = Path(os.environ.get("JAXLLM_CACHE_DIR", Path.home() / ".cache" / "jaxllm"))
    lib = cache / f"cpu_decode-{key.hexdigest()[:16]}.so"
    if lib.exists():
        return lib
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        raise RuntimeError(f"no C++ compiler ({os.environ.get('CXX', 'g++')}) on PATH")
    cache.mkdir(parents=True, exist_ok=True)
    tmp = lib.with_suffix(f".{os.getpid()}.tmp")
    done = subprocess.run([compiler, *_flags(), "-I", jax.ffi.include_dir(), str(_SOURCE),
                           "-o", str(tmp)], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RuntimeError(f"{compiler} failed on {_SOURCE.name}:\n{done.stderr[-2000:]}")
    os.replace(tmp, lib)
    return lib


def available() -> bool:
    """True where the kernels are compiled, loaded and registered with XLA:CPU, and not turned
    off by JAXLLM_CPU_KERNELS=0 (read at each call, so a benchmark can compare both paths). A
    failed build warns once, naming why, and leaves sampling on XLA's path."""
    return os.environ.get("JAXLLM_CPU_KERNELS", "1") != "0" and _load()


@functools.cache
def _load() -> bool:
    try:
        lib = ctypes.cdll.LoadLibrary(str(_build()))
    except (OSError, RuntimeError, subprocess.SubprocessError) as e:
        warnings.warn(f"jaxllm: CPU decode kernels unavailable, sampling uses XLA's slower "
                      f"path ({e})", RuntimeWarning, stacklevel=2)
        return False
    for target, symbol in _TARGETS.items():
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, symbol)),
                                    platform="cpu")
    return True


def pack(w: jax.Array, bf16_products: bool = False) -> jax.Array:
    """A [K, N] kernel as panels of PANEL columns, [ceil(N/PANEL), K, PANEL], the last one
    zero-padded: the layout the kernels read front to back. bfloat16 stays bfloat16 (half the
    bytes; the kernels widen it exactly), each panel row ordered c0, c16, c1, c17, ..., c15,
    c31 so that one 32-bit lane holds a column of each half; anything else becomes float32.

    With bf16_products, the kernel is rounded to bfloat16 and its rows paired for products
    of bfloat16 activations (what a bfloat16 model computes; AVX512-BF16 does two per lane):
    [ceil(N/PANEL), ceil(K/2), PANEL] uint32, the low half of each holding row 2i, the high
    half row 2i + 1 (zero past K)."""
    k, n = w.shape
    panels = -(-n // PANEL)
    if bf16_products:
        w = jnp.pad(w.astype(jnp.bfloat16), ((0, k % 2), (0, panels * PANEL - n)))
        w = w.reshape(-1, 2, panels, PANEL).transpose(2, 0, 3, 1)  # [panels, K/2, PANEL, 2]
        return jax.lax.bitcast_convert_type(w, jnp.uint32)
    bf16 = w.dtype == jnp.bfloat16
    w = jnp.pad(w.astype(jnp.bfloat16 if bf16 else jnp.float32), ((0, 0), (0, panels * PANEL - n)))
    w = w.reshape(k, panels, PANEL).transpose(1, 0, 2)
    if bf16:
        w = w.reshape(panels, k, 2, PANEL // 2).swapaxes(2, 3).reshape(panels, k, PANEL)
    return w


def _registered():
    if not _load():
        raise RuntimeError("jaxllm: the CPU decode kernels could not be built here (see the "
                           "warning above); check cpu_decode.available() before calling them")


def matmul(x: jax.Array, w_packed: jax.Array, n: int) -> jax.Array:
    """x [M, K] float32 times a packed [K, n] kernel -> [M, n] float32 (x rounded to bfloat16
    first for a kernel packed for bfloat16 products)."""
    _registered()
    out = jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32)
    return jax.ffi.ffi_call("jaxllm_packed_matmul", out)(x, w_packed)


def head(x: jax.Array, scale: jax.Array, w_packed: jax.Array, n: int, *, eps: float):
    """A decode step's output: logits = rms_norm(x) * scale times a packed [D, n] kernel,
    [B, n], and each row's first argmax [B] int32 and log-sum-exp [B] of them."""
    _registered()
    b = x.shape[0]
    out = (jax.ShapeDtypeStruct((b, n), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.int32),
           jax.ShapeDtypeStruct((b,), jnp.float32))
    return jax.ffi.ffi_call("jaxllm_decode_head", out)(x, scale, w_packed, eps=np.float32(eps))


def layer(x, weights, k_cache, v_cache, cos, sin, mask, start, *, heads: int, kv_heads: int,
          mlp: int, eps: float):
    """One decoder layer for one new token per row -> (x, k_cache, v_cache), the caches
    updated in place at `start`.

    x [B, D]; weights = (input norm scale, packed q|k|v, q|k|v bias, packed o, post-attention
    norm scale, packed gate|up, packed down; `mlp` the MLP's width), the norms and bias
    float32, the kernels packed alike (pack); caches [B, KV, S, hd], both float32 or both
    bfloat16; cos/sin [B, hd/2] of each row's position; mask [B, S] (which cache slots each
    row attends to)."""
    _registered()
    out = (jax.ShapeDtypeStruct(x.shape, jnp.float32),
           jax.ShapeDtypeStruct(k_cache.shape, k_cache.dtype),
           jax.ShapeDtypeStruct(v_cache.shape, v_cache.dtype))
    call = jax.ffi.ffi_call("jaxllm_decode_layer", out, input_output_aliases={8: 1, 9: 2})
    return call(x, *weights, k_cache, v_cache, cos, sin, mask, jnp.asarray(start, jnp.int32),
                heads=np.int64(heads), kv_heads=np.int64(kv_heads), mlp=np.int64(mlp),
                eps=np.float32(eps))
