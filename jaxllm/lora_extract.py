"""`jaxllm lora extract`: a LoRA adapter of a fine-tune's difference from its base.

    jaxllm lora extract --base run:A --tuned run:B --rank 16 --out adapter/ [--run-dir runs/x]

Models come from run directories (LoRA runs with their adapters applied) or Hugging Face
directories. The adapter (lora.extract: truncated SVD per layer) is written in PEFT's format,
and with --run-dir also as a jaxllm LoRA run over the base (model.init_from), which
`generate`, `convert` and further training (train.resume=true) take like any other run."""
from __future__ import annotations

from pathlib import Path

import jax

from jaxllm import lora
from jaxllm.config import ConfigError, LoraConfig


def load_source(spec: str):
    """(ModelConfig, model params) of "run:DIR" (adapters applied) or "hf:DIR" (sharded over
    all devices along fsdp, as `jaxllm generate --hf` loads it)."""
    from jaxllm.cli_generate import load_hf_sharded, load_model
    kind, _, where = spec.partition(":")
    if kind not in ("run", "hf") or not where:
        raise ConfigError(f"lora extract: expected run:DIR or hf:DIR, got {spec!r}")
    return load_model(where, None)[:2] if kind == "run" else load_hf_sharded(where)[:2]


def report(kept: dict, energy: dict) -> list[str]:
    """One line per module and the overall fraction of the difference's energy (squared
    Frobenius norm, summed over modules) the adapter keeps."""
    lines = [f"{name:32s} {100 * frac:7.2f}% of the difference's energy kept"
             for name, frac in sorted(kept.items())]
    total = sum(energy.values())
    overall = sum(kept[m] * energy[m] for m in kept) / total if total > 0 else 1.0
    return lines + [f"{'overall':32s} {100 * overall:7.2f}% (relative Frobenius error "
                    f"{max(1 - overall, 0) ** 0.5:.3g})"]


def run(base_spec: str, tuned_spec: str, lcfg: LoraConfig, out, run_dir=None) -> str:
    from jaxllm.interop.peft import save_adapter
    from jaxllm.train.checkpoint import CheckpointError
    (cfg, base), (_, tuned) = load_source(base_spec), load_source(tuned_spec)
    shapes = lambda p: jax.tree.map(lambda x: x.shape, p)  # noqa: E731
    if shapes(base) != shapes(tuned):
        raise CheckpointError(f"lora extract: {base_spec} and {tuned_spec} have different shapes")
    adapters, kept = lora.extract(base, tuned, lcfg)
    lines = report(kept, lora.difference_energy(base, tuned, lcfg))
    hf_base = str(Path(base_spec[3:]).resolve()) if base_spec.startswith("hf:") else ""
    save_adapter(adapters, lcfg, out, hf_base, tie_embeddings=cfg.tie_embeddings)
    lines.append(f"wrote {out} (PEFT adapter" + (f" for {hf_base})" if hf_base else
                 f"; its base in Hugging Face format: jaxllm convert --to-hf {base_spec[4:]})"))
    if run_dir is not None:
        write_adapter_run(base_spec, adapters, lcfg, run_dir)
        lines.append(f"wrote {run_dir} (jaxllm LoRA run over {base_spec}, checkpoint step 0)")
    return "\n".join(lines)


def write_adapter_run(base_spec: str, adapters: dict, lcfg: LoraConfig, out) -> Path:
    """A run directory whose step-0 checkpoint holds `adapters` over model.init_from=base."""
    from jaxllm import config
    from jaxllm.tasks import get_task
    from jaxllm.train.checkpoint import CheckpointError
    src = Path(base_spec[base_spec.index(":") + 1:]).resolve()
    over = [f"run_dir={out}", f"lora.rank={lcfg.rank}", f"lora.alpha={lcfg.alpha}",
            f"lora.rslora={str(lcfg.rslora).lower()}", f"lora.targets=[{','.join(lcfg.targets)}]"]
    if base_spec.startswith("run:"):
        base_exp = config.load(src / "resolved.yaml")
        if (base_exp.lora.rank or base_exp.prompt_tuning.num_tokens
                or get_task(base_exp.task).extra_params(base_exp)):
            raise CheckpointError(f"lora extract --run-dir: {src} is not a plain model run, so it "
                                  "cannot be a base (model.init_from); convert it with --to-hf")
        tok = base_exp.data.tokenizer
        if tok.kind == "sentencepiece" and not tok.path and (src / "tokenizer.model").is_file():
            over.append(f"data.tokenizer.path={src / 'tokenizer.model'}")
        exp = config.load(src / "resolved.yaml", [f"model.init_from=run:{src}", *over])
    else:
        from jaxllm.interop.hf import load_config
        seq = min(256, load_config(src).max_seq_len)
        exp = config.load(None, [f"model.init_from=hf:{src}", f"data.seq_len={seq}", *over,
                                 "data.tokenizer.kind=hf", f"data.tokenizer.path={src}"])
    return write_task_run(exp, {"lora": adapters}, out)


def write_task_run(exp, params: dict, out) -> Path:
    """A run directory (resolved.yaml, step-0 checkpoint) holding what exp's task trains:
    train.checkpoint.write_run for any trained tree (adapters, a soft prompt, heads)."""
    from jaxllm import config, sharding
    from jaxllm.tasks import get_task
    from jaxllm.train import step as step_lib
    from jaxllm.train.checkpoint import Checkpointer
    from jaxllm.train.optimizer import make_optimizer
    mesh = sharding.make_mesh(exp.mesh)
    state = step_lib.init_state(exp, make_optimizer(exp.optimizer, exp.train.steps), mesh, params,
                                spec=get_task(exp.task).param_spec(exp),
                                make_params=lambda _, given: given)
    config.save_resolved(exp, out)
    ckpt = Checkpointer(Path(out) / "checkpoints", exp.checkpoint)
    ckpt.save(0, state, {}, force=True)
    ckpt.close()
    return Path(out)
