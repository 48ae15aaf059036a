"""LoRA adapters in PEFT's format: adapter_config.json + adapter_model.safetensors, so that
`peft.PeftModel.from_pretrained(base, DIR)` on the exported base gives our logits.

PEFT stores per layer lora_A.weight [r, in] and lora_B.weight [out, r] (torch Linear layout)
and scales by lora_alpha / r (or / sqrt(r) with use_rslora), as jaxllm.lora does; our stacked
A [L, in, r] and B [L, r, out] are transposed and split by layer."""
from __future__ import annotations

import json
from pathlib import Path

import jax
import numpy as np

from jaxllm.config import LoraConfig

# Our module path under "layers" -> PEFT's module name under the decoder layer.
MODULES = {("self_attn", n): f"self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
MODULES |= {("mlp", n): f"mlp.{n}" for n in ("gate_proj", "up_proj", "down_proj")}


def save_adapter(adapters: dict, lcfg: LoraConfig, path: str | Path, base_model: str = "") -> Path:
    from safetensors.numpy import save_file
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    adapters = jax.device_get(adapters)
    unsupported = set(adapters) - {"layers"}
    if unsupported:
        raise ValueError(f"PEFT export: adapters on {sorted(unsupported)} are not supported "
                         "(only the decoder layers' projections)")
    tensors, targets = {}, set()
    for group, mods in adapters["layers"].items():
        for name, ab in mods.items():
            module = MODULES[(group, name)]
            targets.add(name)
            for i in range(ab["a"].shape[0]):
                prefix = f"base_model.model.model.layers.{i}.{module}"
                tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(np.asarray(ab["a"][i], np.float32).T)
                tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(np.asarray(ab["b"][i], np.float32).T)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
              "r": lcfg.rank, "lora_alpha": lcfg.alpha, "use_rslora": lcfg.rslora,
              "target_modules": sorted(targets), "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "inference_mode": True, "modules_to_save": None}
    (path / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return path
