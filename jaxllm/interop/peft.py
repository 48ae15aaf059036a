"""Parameter-efficient runs in Hugging Face PEFT's format: LoRA adapters and soft prompts.

    save_adapter(adapters, lcfg, "adapter/")          # adapter_config.json + adapter_model.safetensors
    adapters, lcfg = load_adapter("adapter/")          # and back (e.g. an adapter trained with peft)
    save_prompt(soft_prompt, cfg, "prompt/")           # prompt tuning (peft_type PROMPT_TUNING)
    export_run("runs/sft_lora", "adapter/")            # `jaxllm convert --to-peft`

`peft.PeftModel.from_pretrained(base, DIR)` on the base in Hugging Face format then gives our
logits. PEFT stores each module's lora_A.weight [r, in] and lora_B.weight [out, r] (torch Linear
layout; embeddings: lora_embedding_A [r, vocab], lora_embedding_B [hidden, r]) and scales by
lora_alpha / r (or / sqrt(r) with use_rslora), as jaxllm.lora does; our stacked A [L, in, r] and
B [L, r, out] are transposed and split by layer. Module names are our param paths, which are
Hugging Face's by design (interop/hf_names.py)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.config import LoraConfig
from jaxllm.interop.hf import HFFormatError

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
_PREFIX = "base_model.model."
_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(\w+)\.(\w+)\.lora_([AB])\.weight")
_TOP_KEY = re.compile(r"(?:model\.(embed_tokens)\.lora_embedding_([AB])|(lm_head)\.lora_([AB])\.weight)")


def _module(path: tuple, layer: int | None) -> str:
    """The Hugging Face module name of our adapter path (e.g. model.layers.3.mlp.up_proj)."""
    if path[0] == "layers":
        return f"model.layers.{layer}." + ".".join(path[1:])
    if path == ("embed_tokens",):
        return "model.embed_tokens"
    if path == ("lm_head",):
        return "lm_head"
    raise HFFormatError(f"PEFT export: no Hugging Face module for adapters on {'/'.join(path)}")


def _flat_adapters(tree, prefix=()):
    for k, v in tree.items():
        if set(v) == {"a", "b"}:
            yield prefix + (k,), v
        else:
            yield from _flat_adapters(v, prefix + (k,))


def save_adapter(adapters: dict, lcfg: LoraConfig, path: str | Path, base_model: str = "",
                 *, tie_embeddings: bool = False) -> Path:
    """Write adapters (jaxllm.lora's tree) as a PEFT LoRA adapter directory."""
    from safetensors.numpy import save_file
    path = Path(path)
    adapters = jax.device_get(adapters)
    tensors, targets = {}, set()
    for ours, ab in _flat_adapters(adapters):
        a, b = np.asarray(ab["a"], np.float32), np.asarray(ab["b"], np.float32)
        targets.add(ours[-1])
        if ours == ("embed_tokens",):
            if tie_embeddings:  # PEFT adapts the input lookup only; ours also moves the tied output
                raise HFFormatError("PEFT export: LoRA on embed_tokens with tied embeddings has "
                                    "no PEFT equivalent (the tied output projection changes too)")
            name = _PREFIX + _module(ours, None)
            tensors[name + ".lora_embedding_A"] = np.ascontiguousarray(a.T)
            tensors[name + ".lora_embedding_B"] = np.ascontiguousarray(b.T)
            continue
        layers = range(a.shape[0]) if ours[0] == "layers" else [None]
        for i in layers:
            name = _PREFIX + _module(ours, i)
            ai, bi = (a, b) if i is None else (a[i], b[i])
            tensors[name + ".lora_A.weight"] = np.ascontiguousarray(ai.T)
            tensors[name + ".lora_B.weight"] = np.ascontiguousarray(bi.T)
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": lcfg.rank, "lora_alpha": lcfg.alpha, "use_rslora": lcfg.rslora,
              "target_modules": sorted(targets), "lora_dropout": lcfg.dropout, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None,
              "use_dora": False, "rank_pattern": {}, "alpha_pattern": {}}
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return path


def load_adapter(path: str | Path) -> tuple[dict, LoraConfig]:
    """(adapters, LoraConfig) from a PEFT LoRA adapter directory of a Llama/Qwen2/Mistral
    causal LM. Settings jaxllm.lora cannot express (DoRA, per-module ranks, some layers only,
    fan_in_fan_out, biases) are refused by name."""
    from safetensors.numpy import load_file
    path = Path(path)
    if not (path / ADAPTER_CONFIG).is_file() or not (path / ADAPTER_WEIGHTS).is_file():
        raise HFFormatError(f"{path}: no {ADAPTER_CONFIG} + {ADAPTER_WEIGHTS} (not a PEFT adapter?)")
    c = json.loads((path / ADAPTER_CONFIG).read_text())
    if c.get("peft_type") != "LORA":
        raise HFFormatError(f"{path}: peft_type {c.get('peft_type')!r}, expected 'LORA'")
    unsupported = {k: c[k] for k, ok in (
        ("use_dora", False), ("fan_in_fan_out", False), ("bias", "none"), ("rank_pattern", {}),
        ("alpha_pattern", {}), ("layers_to_transform", None), ("lora_bias", False),
        ("modules_to_save", None)) if c.get(k) not in (None, ok, [], {})}
    if unsupported:
        raise HFFormatError(f"{path}: {ADAPTER_CONFIG}: {unsupported} is not supported")
    per_layer: dict = {}
    top: dict = {}
    for key, w in load_file(str(path / ADAPTER_WEIGHTS)).items():
        name = key.removeprefix(_PREFIX)
        if m := _LAYER_KEY.fullmatch(name):
            i, group, mod, ab = m.groups()
            per_layer.setdefault((group, mod), {}).setdefault(ab.lower(), {})[int(i)] = w.T
        elif m := _TOP_KEY.fullmatch(name):
            mod, ab = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
            top.setdefault(mod, {})[ab.lower()] = w.T
        elif not name.endswith(".base_layer.weight"):  # base weights PEFT may save beside
            raise HFFormatError(f"{path}: tensor {key!r} is not a LoRA weight jaxllm reads")
    adapters: dict = {mod: {k: jnp.asarray(v, jnp.float32) for k, v in ab.items()}
                      for mod, ab in top.items()}
    for (group, mod), ab in per_layer.items():
        n = {len(ab[k]) for k in ab} | {max(ab[k]) + 1 for k in ab}
        if set(ab) != {"a", "b"} or len(n) != 1:
            raise HFFormatError(f"{path}: {group}.{mod} is not adapted in every layer (A and B)")
        stacked = {k: jnp.asarray(np.stack([v[i] for i in range(len(v))]), jnp.float32)
                   for k, v in ab.items()}
        adapters.setdefault("layers", {}).setdefault(group, {})[mod] = stacked
    if not adapters:
        raise HFFormatError(f"{path}: no LoRA weights in {ADAPTER_WEIGHTS}")
    lcfg = LoraConfig(rank=int(c["r"]), alpha=float(c["lora_alpha"]),
                      rslora=bool(c.get("use_rslora", False)),
                      dropout=float(c.get("lora_dropout") or 0.0),
                      targets=tuple(sorted({p[-1] for p, _ in _flat_adapters(adapters)})))
    return adapters, lcfg


def save_prompt(soft_prompt, cfg, path: str | Path, base_model: str = "") -> Path:
    """Write a soft prompt [N, hidden] as a PEFT prompt-tuning adapter. PEFT prepends it to the
    input embeddings with positions 0..N-1 before the tokens', as models.forward does; its
    logits then carry N extra leading positions."""
    from safetensors.numpy import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    prompt = np.ascontiguousarray(np.asarray(jax.device_get(soft_prompt), np.float32))
    save_file({"prompt_embeddings": prompt}, str(path / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM",
              "base_model_name_or_path": base_model, "num_virtual_tokens": int(prompt.shape[0]),
              "token_dim": int(prompt.shape[1]), "num_transformer_submodules": 1,
              "num_attention_heads": cfg.num_heads, "num_layers": cfg.num_layers,
              "prompt_tuning_init": "RANDOM", "inference_mode": True}
    (path / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2))
    return path


def export_run(run_dir: str | Path, out: str | Path, step: int | None = None) -> str:
    """A LoRA or prompt-tuning run's adapter as a PEFT directory `out`. When the run's base is
    not a Hugging Face directory (model.init_from=run:DIR, or a fresh init), the base is written
    in Hugging Face format to out/base, for peft to load the adapter onto. Returns a summary."""
    from jaxllm import sharding
    from jaxllm.interop import hf
    from jaxllm.tasks import get_task
    from jaxllm.train.checkpoint import CheckpointError, restore_run_params
    from jaxllm.train.loop import base_and_frozen
    exp, params = restore_run_params(run_dir, step)
    if not (exp.lora.rank or exp.prompt_tuning.num_tokens):
        raise CheckpointError(f"convert --to-peft: {run_dir} trains all weights (neither lora.rank "
                              "nor prompt_tuning.num_tokens): export it with --to-hf")
    if set(params) - {"lora", "soft_prompt"}:
        raise CheckpointError(f"convert --to-peft: {run_dir} also trains "
                              f"{sorted(set(params) - {'lora', 'soft_prompt'})} (a task head), "
                              "which a causal-LM adapter cannot hold: export it merged with --to-hf")
    out = Path(out)
    src = exp.model.init_from
    if src and src.startswith("hf:"):
        base_model, wrote = str(Path(src[3:]).resolve()), ""
    else:
        base, _ = base_and_frozen(exp, get_task(exp.task), sharding.make_mesh(exp.mesh), True)
        base_model = str(hf.save(exp.model, base, out / "base").resolve())
        tok = Path(run_dir) / "tokenizer.model"
        if tok.is_file():
            import shutil
            shutil.copy(tok, out / "base" / "tokenizer.model")
        wrote = f" and its base ({src or 'a fresh init'}) in Hugging Face format to {out / 'base'}"
    if exp.lora.rank:
        save_adapter(params["lora"], exp.lora, out, base_model,
                     tie_embeddings=exp.model.tie_embeddings)
        targets = sorted({p[-1] for p, _ in _flat_adapters(params["lora"])})
        kind = f"LoRA adapter (r={exp.lora.rank} on {', '.join(targets)})"
    else:
        save_prompt(params["soft_prompt"], exp.model, out, base_model)
        kind = f"soft prompt ({exp.prompt_tuning.num_tokens} virtual tokens)"
    return f"wrote {out}: PEFT {kind}{wrote}"
