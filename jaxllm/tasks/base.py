"""What a task gives the loop, and the trainable/frozen split every task shares.

Trained params are the model's params, or (lora.rank > 0) LoRA adapters {"lora": ...} over a
frozen base; a task may add heads of its own (`extra_params`, e.g. a reward model's "score").
Frozen trees (the LoRA base, a DPO reference, a distillation teacher) go to the loss as a jit
argument: never in the optimizer, never checkpointed (they are rebuilt from their source)."""
from __future__ import annotations

import jax

from jaxllm import lora, models
from jaxllm.config import Experiment


class Task:
    """Base: subclasses give make_data and loss_fn(exp) -> f(params, batch, frozen)."""

    def extra_params(self, exp: Experiment) -> dict:
        """{name: (init_fn(key) -> array, logical axes)} trained beside the model or adapters."""
        return {}

    def param_spec(self, exp: Experiment):
        """(abstract, logical axes) of the trained params."""
        m_abs, m_log = models.abstract_params(exp.model), models.logical_axes(exp.model)
        if exp.lora.rank:
            abs_, log_ = {"lora": lora.abstract(m_abs, exp.lora)}, {"lora": lora.logical_axes(m_log, exp.lora)}
        else:
            abs_, log_ = dict(m_abs), dict(m_log)
        for name, (init, names) in self.extra_params(exp).items():
            abs_[name] = jax.eval_shape(init, jax.random.key(0))
            log_[name] = names
        return abs_, log_

    def init_params(self, exp: Experiment, key, base):
        """Trained params at step 0 (traced under jit) from the base model's params (a fresh
        init from `key` when there is no base)."""
        if base is None:
            base = models.init(exp.model, key)
        k_lora, k_extra = jax.random.split(key)
        params = ({"lora": lora.init(lora.abstract(base, exp.lora), k_lora)} if exp.lora.rank
                  else dict(base))
        for i, (name, (init, _)) in enumerate(sorted(self.extra_params(exp).items())):
            params[name] = init(jax.random.fold_in(k_extra, i))
        return params

    def needs_frozen(self, exp: Experiment) -> bool:
        return bool(exp.lora.rank)

    def frozen(self, exp: Experiment, base, mesh):
        """Frozen trees built from the base params (when needs_frozen)."""
        return {"base": lora.quantize(base, exp.lora.base_dtype)} if exp.lora.rank else None

    def make_data(self, exp: Experiment, run_dir, local_batch: int):
        """Post-training examples per data.format (pretraining overrides this)."""
        from jaxllm.data.posttrain import ExampleData
        return ExampleData.from_config(exp.data, run_dir=run_dir, batch_size=local_batch,
                                       seed=exp.seed, process_index=jax.process_index(),
                                       process_count=jax.process_count())


def model_params(exp: Experiment, params, frozen):
    """The params the model runs with: the base with adapters applied, or the trained ones."""
    if exp.lora.rank:
        return lora.apply(frozen["base"], params["lora"], exp.lora)
    return {k: v for k, v in params.items() if k in _MODEL_KEYS}


_MODEL_KEYS = ("embed_tokens", "layers", "norm", "lm_head")


def reference_params(exp: Experiment, params, frozen):
    """The frozen reference (DPO, KL penalties): the base without adapters under LoRA (no second
    copy in memory), else the frozen copy in frozen["ref"]."""
    if exp.lora.rank:
        return lora.apply(frozen["base"], {}, exp.lora) if _quantized(exp) else frozen["base"]
    return frozen["ref"]


def _quantized(exp):
    return exp.lora.base_dtype == "int8"
