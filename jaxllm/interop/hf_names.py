"""The one table between jaxllm param paths and Hugging Face tensor names (Llama, Qwen2,
Mistral), plus config.json <-> ModelConfig. Dense kernels are stored [in, out] here and
[out, in] in HF; layer tensors are stacked on axis 0 here and numbered in HF."""
from __future__ import annotations

from typing import Callable, Iterator

import numpy as np

from jaxllm.models.config import ModelConfig, RopeScaling

# (our path under params, HF name with {i} for the layer, transpose?)
_LAYER = [
    (("self_attn", "q_proj", "kernel"), "self_attn.q_proj.weight", True),
    (("self_attn", "k_proj", "kernel"), "self_attn.k_proj.weight", True),
    (("self_attn", "v_proj", "kernel"), "self_attn.v_proj.weight", True),
    (("self_attn", "o_proj", "kernel"), "self_attn.o_proj.weight", True),
    (("mlp", "gate_proj", "kernel"), "mlp.gate_proj.weight", True),
    (("mlp", "up_proj", "kernel"), "mlp.up_proj.weight", True),
    (("mlp", "down_proj", "kernel"), "mlp.down_proj.weight", True),
    (("input_layernorm", "scale"), "input_layernorm.weight", False),
    (("post_attention_layernorm", "scale"), "post_attention_layernorm.weight", False),
]
_BIAS = [
    (("self_attn", "q_proj", "bias"), "self_attn.q_proj.bias", False),
    (("self_attn", "k_proj", "bias"), "self_attn.k_proj.bias", False),
    (("self_attn", "v_proj", "bias"), "self_attn.v_proj.bias", False),
]


def name_table(cfg: ModelConfig) -> Iterator[tuple[tuple, str | None, str, bool]]:
    """Rows (our path, layer index or None, HF name, transpose)."""
    yield ("embed_tokens", "embedding"), None, "model.embed_tokens.weight", False
    yield ("norm", "scale"), None, "model.norm.weight", False
    if not cfg.tie_embeddings:
        yield ("lm_head", "kernel"), None, "lm_head.weight", True
    for path, hf, t in _LAYER + (_BIAS if cfg.qkv_bias else []):
        for i in range(cfg.num_layers):
            yield ("layers", *path), i, f"model.layers.{i}.{hf}", t


def grouped_table(cfg: ModelConfig) -> dict[tuple, list[tuple[int | None, str, bool]]]:
    """Our param path -> [(layer, HF name, transpose)] (one entry, or one per layer)."""
    rows: dict[tuple, list] = {}
    for path, layer, hf, t in name_table(cfg):
        rows.setdefault(path, []).append((layer, hf, t))
    return rows


def read_param(get: Callable[[str], np.ndarray], entries) -> np.ndarray:
    """One of our params as a host array, built from its HF tensor(s)."""
    parts = [np.asarray(get(hf)).T if t else np.asarray(get(hf)) for _, hf, t in entries]
    return parts[0] if entries[0][0] is None else np.stack(parts)


def params_from_hf(get: Callable[[str], np.ndarray], cfg: ModelConfig, dtype=None) -> dict:
    """Nested numpy params from a getter of HF tensors (e.g. a state dict's __getitem__)."""
    params: dict = {}
    for path, entries in grouped_table(cfg).items():
        x = read_param(get, entries)
        put(params, path, x.astype(dtype) if dtype is not None else x)
    return params


def params_to_hf(params: dict, cfg: ModelConfig) -> Iterator[tuple[str, np.ndarray]]:
    """(HF name, numpy array) pairs, one tensor at a time."""
    for path, layer, hf, t in name_table(cfg):
        x = get_path(params, path)
        x = np.asarray(x if layer is None else x[layer])
        yield hf, np.ascontiguousarray(x.T if t else x)


def put(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def get_path(tree: dict, path: tuple):
    for p in path:
        tree = tree[p]
    return tree


_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "MistralForCausalLM": "mistral"}


def config_from_hf(hf: dict, where: str = "config.json") -> ModelConfig:
    """ModelConfig from a HF config.json dict; unsupported settings are refused by name."""
    arch = (hf.get("architectures") or [None])[0]
    family = _ARCHS.get(arch) if arch else hf.get("model_type")
    if family not in _ARCHS.values():
        raise ValueError(f"{where}: architectures={hf.get('architectures')!r} / model_type="
                         f"{hf.get('model_type')!r} is not supported (supported: {', '.join(_ARCHS)})")
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    rtype = rope.get("rope_type", rope.get("type", "default"))
    scaling = None
    if rtype == "llama3":
        scaling = RopeScaling(float(rope["factor"]), float(rope["low_freq_factor"]),
                              float(rope["high_freq_factor"]),
                              int(rope["original_max_position_embeddings"]))
    elif rtype != "default":
        raise ValueError(f"{where}: rope scaling type {rtype!r} is not supported "
                         "(supported: default, llama3)")
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act={hf['hidden_act']!r} is not supported (silu only)")
    window = hf.get("sliding_window") if (family == "mistral" or hf.get("use_sliding_window")) else None
    return ModelConfig(
        vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"], num_layers=hf["num_hidden_layers"],
        num_heads=hf["num_attention_heads"],
        num_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=None if hf.get("head_dim") == hf["hidden_size"] // hf["num_attention_heads"]
        else hf.get("head_dim"), max_seq_len=hf.get("max_position_embeddings", 2048),
        rope_theta=float(theta), rope_scaling=scaling, rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        qkv_bias=family == "qwen2" or bool(hf.get("attention_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), sliding_window=window)


def config_to_hf(cfg: ModelConfig, torch_dtype: str = "float32") -> dict:
    """A config.json dict for the matching transformers architecture."""
    if cfg.qkv_bias:  # Llama's attention_bias would also add an o_proj bias: Qwen2 it is
        arch, model_type = "Qwen2ForCausalLM", "qwen2"
    elif cfg.sliding_window is not None:
        arch, model_type = "MistralForCausalLM", "mistral"
    else:
        arch, model_type = "LlamaForCausalLM", "llama"
    out = {
        "architectures": [arch], "model_type": model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size, "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers, "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads, "head_dim": cfg.dim_per_head,
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_act": "silu", "torch_dtype": torch_dtype, "attention_bias": False,
    }
    if cfg.rope_scaling is not None:
        rs = cfg.rope_scaling
        out["rope_scaling"] = {"rope_type": "llama3", "factor": rs.factor,
                               "low_freq_factor": rs.low_freq_factor,
                               "high_freq_factor": rs.high_freq_factor,
                               "original_max_position_embeddings": rs.original_max_position_embeddings}
    if model_type == "mistral":
        out["sliding_window"] = cfg.sliding_window
    if model_type == "qwen2":
        out.pop("attention_bias")
        out["use_sliding_window"] = cfg.sliding_window is not None
        out["sliding_window"] = cfg.sliding_window
        out["max_window_layers"] = cfg.num_layers
    return out
