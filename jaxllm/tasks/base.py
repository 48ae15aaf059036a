"""What a task gives the loop, and the trainable/frozen split every task shares.

Trained params are the model's params, or over a frozen base either LoRA adapters
{"lora": ...} (lora.rank > 0) or a soft prompt {"soft_prompt": [N, D]} (prompt tuning); a task
may add heads of its own (`extra_params`, e.g. a reward model's "score").
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
        if exp.lora.rank and exp.prompt_tuning.num_tokens:
            raise ValueError("lora.rank and prompt_tuning.num_tokens: choose one method")
        if exp.prompt_tuning.num_tokens:
            n, d = exp.prompt_tuning.num_tokens, exp.model.hidden_size
            abs_ = {"soft_prompt": jax.ShapeDtypeStruct((n, d), m_abs["embed_tokens"]["embedding"].dtype)}
            log_ = {"soft_prompt": (None, "embed")}
        elif exp.lora.rank:
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
        if exp.prompt_tuning.num_tokens:  # start from the embeddings of random vocabulary tokens
            emb = base["embed_tokens"]["embedding"]
            ids = jax.random.randint(k_lora, (exp.prompt_tuning.num_tokens,), 0, emb.shape[0])
            params = {"soft_prompt": emb[ids]}
        elif exp.lora.rank:
            params = {"lora": lora.init(lora.abstract(base, exp.lora), k_lora)}
        else:
            params = dict(base)
        for i, (name, (init, _)) in enumerate(sorted(self.extra_params(exp).items())):
            params[name] = init(jax.random.fold_in(k_extra, i))
        return params

    def needs_frozen(self, exp: Experiment) -> bool:
        return _frozen_base(exp)

    def frozen(self, exp: Experiment, base, mesh):
        """Frozen trees built from the base params (when needs_frozen)."""
        return {"base": lora.quantize(base, exp.lora.base_dtype)} if _frozen_base(exp) else None

    def prepare_data(self, exp: Experiment, data, base_fn, frozen, mesh, run_dir,
                     resuming: bool) -> None:
        """Work on the data that needs the starting model, once before training (DPO's
        reference log-probs); base_fn() gives the base params (loading them on resume)."""

    def abstract_batch(self, exp: Experiment, batch_size: int) -> dict:
        """Shapes of one global batch (what make_data's iterator yields), for AOT compiles."""
        return row_shapes(exp, batch_size) | {"valid": abstract_array((batch_size,), "float32")}

    def make_data(self, exp: Experiment, run_dir, local_batch: int):
        """Post-training examples per data.format (pretraining overrides this)."""
        from jaxllm.data.posttrain import ExampleData
        return ExampleData.from_config(exp.data, run_dir=run_dir, batch_size=local_batch,
                                       seed=exp.seed, process_index=jax.process_index(),
                                       process_count=jax.process_count())


def abstract_array(shape, dtype):
    return jax.ShapeDtypeStruct(shape, jax.numpy.dtype(dtype))


def row_shapes(exp: Experiment, batch_size: int, prefixes=("",)) -> dict:
    """[batch, seq_len] rows (tokens, targets, segment_ids, positions, loss_mask) per prefix."""
    from jaxllm.data.posttrain import ROW_KEYS
    shape = (batch_size, exp.data.seq_len)
    return {p + k: abstract_array(shape, "float32" if k == "loss_mask" else "int32")
            for p in prefixes for k in ROW_KEYS}


def pair_shapes(exp: Experiment, batch_size: int) -> dict:
    """Preference batches: chosen_* and rejected_* rows and the valid weights."""
    return (row_shapes(exp, batch_size, ("chosen_", "rejected_"))
            | {"valid": abstract_array((batch_size,), "float32")})


def model_params(exp: Experiment, params, frozen, merged: bool = False):
    """The params the model runs with: the frozen base with the adapters inside its layers or
    a soft prompt prepended (lora.attach: no merged copy), or the trained ones. merged=True:
    plain params with the adapters folded in and an int8 base dequantised (export, sampling)."""
    how = lora.apply if merged else lora.attach
    if exp.prompt_tuning.num_tokens:
        return how(frozen["base"], {}, exp.lora) | {"soft_prompt": params["soft_prompt"]}
    if exp.lora.rank:
        return how(frozen["base"], params["lora"], exp.lora)
    return {k: v for k, v in params.items() if k in _MODEL_KEYS}


_MODEL_KEYS = ("embed_tokens", "layers", "norm", "lm_head")


def reference_params(exp: Experiment, params, frozen):
    """The frozen reference (DPO, KL penalties): the base without adapters under LoRA (no second
    copy in memory), else the frozen copy in frozen["ref"]."""
    if _frozen_base(exp):
        return lora.attach(frozen["base"], {}, exp.lora)  # an int8 base stays int8
    return frozen["ref"]


def _frozen_base(exp) -> bool:
    """LoRA and prompt tuning train beside a frozen base model."""
    return bool(exp.lora.rank or exp.prompt_tuning.num_tokens)
