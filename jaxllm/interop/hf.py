"""Hugging Face model directories <-> jaxllm params (Llama, Qwen2, Mistral).

    cfg, params = load("path/to/hf_dir", dtype="bfloat16", mesh=mesh)
    save(cfg, params, "out_dir", tokenizer_from="path/to/hf_dir")

Tensors are read one at a time from (possibly sharded) safetensors files and placed straight
into their shards when a mesh is given; the name mapping lives in hf_names."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open

from jaxllm.interop.hf_names import (config_from_hf, config_to_hf, get_path,  # noqa: F401
                                     grouped_table, params_to_hf, put, read_param)
from jaxllm.models.config import ModelConfig

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "generation_config.json", "chat_template.jinja")


class HFFormatError(ValueError):
    pass


def _weight_files(path: Path) -> dict[str, Path]:
    """HF tensor name -> the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: path / f for name, f in weight_map.items()}
    single = path / "model.safetensors"
    if not single.is_file():
        raise HFFormatError(f"{path}: no model.safetensors or model.safetensors.index.json "
                            "(only safetensors checkpoints are read; no pickle)")
    with safe_open(single, framework="flax") as f:
        return {name: single for name in f.keys()}


def load_config(path: str | Path) -> ModelConfig:
    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise HFFormatError(f"{path}: no config.json (not a Hugging Face model directory?)")
    try:
        return config_from_hf(json.loads(cfg_file.read_text()), str(cfg_file))
    except ValueError as e:
        raise HFFormatError(str(e)) from None


def load(path: str | Path, dtype=None, mesh=None, rules=None) -> tuple[ModelConfig, dict]:
    """(ModelConfig, params) from a local HF directory; params sharded on `mesh` when given."""
    from jaxllm import models, sharding
    path = Path(path)
    cfg = load_config(path)
    if dtype is not None:
        cfg = cfg.replace(param_dtype=jnp.dtype(dtype).name)
    files = _weight_files(path)
    handles: dict[Path, object] = {}

    def tensor(name: str) -> np.ndarray:
        if name not in files:
            raise HFFormatError(f"{path}: tensor {name!r} is missing from the checkpoint")
        f = files[name]
        if f not in handles:
            handles[f] = safe_open(f, framework="flax")
        return np.asarray(handles[f].get_tensor(name).astype(jnp.dtype(cfg.param_dtype)))

    shardings = None
    if mesh is not None:
        from jaxllm.config import ShardingRules
        shardings = sharding.tree_shardings(models.logical_axes(cfg), models.abstract_params(cfg),
                                            mesh, rules or ShardingRules())
    params: dict = {}
    for our, entries in grouped_table(cfg).items():
        # One parameter at a time: its layers are read, stacked, placed, and the host copy freed.
        host = read_param(tensor, entries)
        target = get_path(shardings, our) if shardings is not None else None
        put(params, our, jax.device_put(host, target) if target is not None else jnp.asarray(host))
        del host
    expected = jax.tree.map(lambda a: a.shape, models.abstract_params(cfg))
    got = jax.tree.map(lambda a: a.shape, params)
    if expected != got:
        raise HFFormatError(f"{path}: tensor shapes do not match config.json")
    return cfg, params


def save(cfg: ModelConfig, params: dict, path: str | Path, *, tokenizer_from=None,
         max_shard_bytes: int = 5 * 1024**3, dtype=None, pad_token_id: int | None = None) -> Path:
    """Write config.json + safetensors (sharded with an index past max_shard_bytes) that
    transformers.AutoModelForCausalLM.from_pretrained loads; copy tokenizer files if given.

    Params with a reward head ("score": {"kernel": [hidden, 1]}) are written as the matching
    *ForSequenceClassification with one label (score.weight, no lm_head); transformers scores
    the last token that is not pad_token_id, as jaxllm.tasks.reward.score does."""
    from safetensors.flax import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    dtype = jnp.dtype(dtype or cfg.param_dtype)
    shards: list[dict] = [{}]
    size = 0
    params = jax.device_get(params)
    head = params.get("score")
    named = list(params_to_hf({k: v for k, v in params.items() if k != "score"}, cfg))
    if head is not None:
        named = [(n, a) for n, a in named if not n.startswith("lm_head")]
        named.append(("score.weight", np.asarray(head["kernel"]).T))
    for name, array in named:
        arr = jnp.asarray(array, dtype)
        if size and size + arr.nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    names = ["model.safetensors"] if len(shards) == 1 else [
        f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for fname, shard in zip(names, shards):
        save_file(shard, str(path / fname), metadata={"format": "pt"})
        weight_map.update({k: fname for k in shard})
    if len(shards) > 1:
        total = sum(int(np.prod(a.shape)) * a.dtype.itemsize for s in shards for a in s.values())
        (path / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    hf_cfg = config_to_hf(cfg, torch_dtype=dtype.name)
    if head is not None:
        hf_cfg["architectures"] = [hf_cfg["architectures"][0].replace("ForCausalLM",
                                                                      "ForSequenceClassification")]
        hf_cfg.update(num_labels=1, pad_token_id=pad_token_id, id2label={"0": "LABEL_0"},
                      label2id={"LABEL_0": 0})
    (path / "config.json").write_text(json.dumps(hf_cfg, indent=2))
    if tokenizer_from is not None:
        for f in TOKENIZER_FILES:
            src = Path(tokenizer_from) / f
            if src.is_file():
                shutil.copy(src, path / f)
    return path
