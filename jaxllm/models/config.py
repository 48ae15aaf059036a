"""ModelConfig: the shape and numerics of one decoder (Llama / Qwen2 / Mistral family)."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency scaling ("llama3" in Hugging Face configs)."""
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclass(frozen=True)
class ModelConfig:
    preset: str | None = None  # name this config started from (informational once resolved)
    # Start training from these weights: "hf:DIR" (a Hugging Face model directory, whose
    # config.json also supplies the shape) or "run:DIR" (a jaxllm run's latest checkpoint).
    init_from: str | None = None
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 768
    num_layers: int = 4
    num_heads: int = 8
    num_kv_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_heads
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    rms_norm_eps: float = 1e-5
    qkv_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None  # keys further back than this many positions are masked
    init_std: float = 0.02
    # Numerics and memory.
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    compute_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal["none", "full", "save_dots", "save_qkv"] = "none"
    # Training losses form each row's logits in this many strided blocks, each recomputed in
    # the backward pass, so one block's [B, S/n, V] logits is live instead of all of them.
    loss_chunks: int = 1
    scan_layers: bool = True  # False: the same stacked params, the layer loop unrolled
    attention_impl: Literal["reference", "flash", "cudnn"] = "reference"
    flash_interpret: bool = False  # run the Pallas kernel in interpret mode (CPU tests)

    @property
    def dim_per_head(self) -> int:
        return self.head_dim or self.hidden_size // self.num_heads

    def replace(self, **kw) -> "ModelConfig":
        return dataclasses.replace(self, **kw)

    def validate(self, where: str = "model") -> None:
        def bad(key, msg):
            raise ValueError(f"{where}.{key}: {msg}")
        for key in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "max_seq_len", "loss_chunks"):
            if getattr(self, key) <= 0:
                bad(key, f"must be positive, got {getattr(self, key)}")
        if self.num_heads % self.num_kv_heads:
            bad("num_kv_heads", f"{self.num_kv_heads} does not divide num_heads={self.num_heads}")
        if self.head_dim is None and self.hidden_size % self.num_heads:
            bad("num_heads", f"{self.num_heads} does not divide hidden_size={self.hidden_size}; "
                "set head_dim explicitly")
        if self.dim_per_head % 2:
            bad("head_dim", f"RoPE needs an even head_dim, got {self.dim_per_head}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            bad("sliding_window", f"must be positive or null, got {self.sliding_window}")
