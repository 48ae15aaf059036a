"""Parameter counts, training FLOPs per token and memory estimates, from the config alone."""
from __future__ import annotations

from jaxllm.models.config import ModelConfig


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts by group; 'total' is what a checkpoint holds."""
    d, hd, L = cfg.hidden_size, cfg.dim_per_head, cfg.num_layers
    q, kv = cfg.num_heads * hd, cfg.num_kv_heads * hd
    attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if cfg.qkv_bias else 0)
    mlp = 3 * d * cfg.intermediate_size
    norms = 2 * d
    embed = cfg.vocab_size * d
    head = 0 if cfg.tie_embeddings else cfg.vocab_size * d
    total = embed + head + L * (attn + mlp + norms) + d
    return {"embedding": embed, "lm_head": head, "attention": L * attn, "mlp": L * mlp,
            "norms": L * norms + d, "total": total}


def matmul_params(cfg: ModelConfig) -> int:
    """Weights that take part in a matmul per token: everything but norms, biases and the
    embedding lookup, plus the unembedding (whether tied or not)."""
    c = count_params(cfg)
    bias = cfg.num_layers * (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.dim_per_head * cfg.qkv_bias
    return c["attention"] - bias + c["mlp"] + cfg.vocab_size * cfg.hidden_size


def flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token: 6N plus attention scores and values (halved when causal).

    Attention per layer and token: forward 2 matmuls x 2 FLOPs x seq x heads x head_dim, times
    3 for forward + backward."""
    window = min(seq_len, cfg.sliding_window or seq_len)
    attn = 12 * cfg.num_layers * window * cfg.num_heads * cfg.dim_per_head
    return 6 * matmul_params(cfg) + (attn / 2 if causal else attn)


_BYTES = {"float32": 4, "bfloat16": 2}


def memory_estimate(cfg: ModelConfig) -> dict[str, int]:
    """Bytes for params, grads and AdamW moments (fp32), before sharding and activations."""
    n = count_params(cfg)["total"]
    p = _BYTES[cfg.param_dtype]
    return {"params": n * p, "grads": n * p, "optimizer": 2 * n * 4,
            "total": n * (2 * p + 8)}
