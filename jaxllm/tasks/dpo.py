"""Direct preference optimisation (sigmoid with label smoothing, hinge, IPO, reference-free).

The reference is the frozen base without adapters under LoRA (no second copy in memory), or a
frozen copy of the starting weights for full fine-tuning. With dpo.precompute_reference the
reference runs once over the data before training (tasks/reference_logps.py) and the loss
reads the stored log-probs: full fine-tuning then holds no frozen copy at all."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.config import DPOConfig, Experiment
from jaxllm.tasks import reference_logps
from jaxllm.tasks.base import (Task, _frozen_base, abstract_array, model_params, pair_shapes,
                               reference_params)
from jaxllm.tasks.sequences import pair_rows, sequence_logps


def dpo_losses(pi_chosen, pi_rejected, ref_chosen, ref_rejected, cfg: DPOConfig,
               chosen_len=None, rejected_len=None):
    """Per-pair losses from summed log-probs. d = (pi_c - ref_c) - (pi_r - ref_r);
    sigmoid: -(1-e) logsigmoid(b d) - e logsigmoid(-b d); hinge: relu(1 - b d);
    IPO: (d' - 1/(2b))^2 with d' from per-token averaged log-probs."""
    if cfg.loss == "ipo":
        pi_chosen, ref_chosen = pi_chosen / chosen_len, ref_chosen / chosen_len
        pi_rejected, ref_rejected = pi_rejected / rejected_len, ref_rejected / rejected_len
    d = (pi_chosen - ref_chosen) - (pi_rejected - ref_rejected)
    b = cfg.beta
    if cfg.loss == "sigmoid":
        e = cfg.label_smoothing
        return -(1 - e) * jax.nn.log_sigmoid(b * d) - e * jax.nn.log_sigmoid(-b * d)
    if cfg.loss == "hinge":
        return jax.nn.relu(1 - b * d)
    return jnp.square(d - 1 / (2 * b))


def loss(params, batch, frozen, exp: Experiment):
    cfg, dcfg = exp.model, exp.dpo
    rows = pair_rows(batch)
    n = batch["chosen_tokens"].shape[0]
    logps, lens = sequence_logps(model_params(exp, params, frozen), cfg, rows)
    if dcfg.reference_free:
        ref = jnp.zeros_like(logps)
    elif reference_logps.KEYS[0] in batch:  # precomputed
        ref = jnp.concatenate([batch[k] for k in reference_logps.KEYS])
    else:
        ref = jax.lax.stop_gradient(sequence_logps(reference_params(exp, params, frozen), cfg, rows)[0])
    pc, pr, rc, rr = logps[:n], logps[n:], ref[:n], ref[n:]
    per_pair = dpo_losses(pc, pr, rc, rr, dcfg, lens[:n], lens[n:])
    if dcfg.sft_weight:  # keeps the chosen answers' likelihood from sinking with the rejected
        per_pair = per_pair - dcfg.sft_weight * pc / jnp.maximum(lens[:n], 1.0)
    valid = batch["valid"]
    w = jnp.maximum(valid.sum(), 1.0)
    mean = lambda x: (x * valid).sum() / w
    chosen_r, rejected_r = dcfg.beta * (pc - rc), dcfg.beta * (pr - rr)
    metrics = {"rewards/chosen": mean(chosen_r), "rewards/rejected": mean(rejected_r),
               "rewards/accuracies": mean((chosen_r > rejected_r).astype(jnp.float32)),
               "rewards/margins": mean(chosen_r - rejected_r),
               "logps/chosen": mean(pc), "logps/rejected": mean(pr), "weight": valid.sum()}
    return mean(per_pair), metrics


class DPOTask(Task):
    def needs_frozen(self, exp):
        needs_ref = not (exp.dpo.reference_free or exp.dpo.precompute_reference)
        return needs_ref or super().needs_frozen(exp)

    def abstract_batch(self, exp, batch_size):
        refs = ({k: abstract_array((batch_size,), "float32") for k in reference_logps.KEYS}
                if exp.dpo.precompute_reference else {})
        return pair_shapes(exp, batch_size) | refs

    def prepare_data(self, exp, data, base_fn, frozen, mesh, run_dir, resuming):
        if exp.dpo.precompute_reference:
            ref = (lambda: reference_params(exp, None, frozen)) if _frozen_base(exp) else base_fn
            reference_logps.attach(exp, data, ref, mesh, run_dir, resuming)

    def frozen(self, exp, base, mesh):
        if super().needs_frozen(exp):  # LoRA or prompt tuning: the base is the reference
            return super().frozen(exp, base, mesh)
        return {"ref": base}  # the trained copy is made by the state's init; this one stays

    def loss_fn(self, exp):
        return lambda params, batch, frozen: loss(params, batch, frozen, exp)
