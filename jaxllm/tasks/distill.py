"""Token-level distillation from a frozen teacher with the same tokenizer (it may be larger).

Forward KL(teacher || student) or reverse KL(student || teacher) over the vocabulary at a
temperature T (scaled by T^2 so gradients keep their size), averaged over the loss_mask tokens,
optionally mixed with the data's next-token cross-entropy."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm import models
from jaxllm.config import DistillConfig, Experiment
from jaxllm.tasks.base import Task, model_params
from jaxllm.tasks.pretrain import head_params, over_blocks, token_cross_entropy


def token_kl(student_logits, teacher_logits, cfg: DistillConfig):
    """KL per position [..] at temperature cfg.temperature, times T^2."""
    t = cfg.temperature
    s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
    q = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
    if cfg.kl == "forward":
        kl = jnp.sum(jnp.exp(q) * (q - s), axis=-1)
    else:
        kl = jnp.sum(jnp.exp(s) * (s - q), axis=-1)
    return kl * t * t


class DistillTask(Task):
    """Trains on text (data.format=text, packed like pretraining) or instructions."""

    def __init__(self):
        self.teacher_cfg = None

    def make_data(self, exp, run_dir, local_batch):
        if exp.data.format == "text":
            from jaxllm.tasks.pretrain import PretrainTask
            return PretrainTask().make_data(exp, run_dir, local_batch)
        return super().make_data(exp, run_dir, local_batch)

    def needs_frozen(self, exp):
        return True

    def frozen(self, exp, base, mesh):
        from jaxllm.interop import hf
        from jaxllm.train.checkpoint import restore_run_params
        src = exp.distill.teacher
        if not src or not src.startswith(("hf:", "run:")):
            raise ValueError(f"distill.teacher: expected hf:DIR or run:DIR, got {src!r}")
        if src.startswith("hf:"):
            self.teacher_cfg, teacher = hf.load(src[3:], mesh=mesh, rules=exp.mesh.rules)
        else:
            teacher_exp, teacher = restore_run_params(src[4:])
            self.teacher_cfg = teacher_exp.model
        if self.teacher_cfg.vocab_size != exp.model.vocab_size:
            raise ValueError(f"distill.teacher: vocab {self.teacher_cfg.vocab_size} differs from "
                             f"the student's {exp.model.vocab_size} (same tokenizer needed)")
        out = super().frozen(exp, base, mesh) or {}
        return out | {"teacher": teacher}

    def loss_fn(self, exp: Experiment):
        cfg, dcfg = exp.model, exp.distill

        def loss(params, batch, frozen):
            args = dict(positions=batch["positions"], segment_ids=batch["segment_ids"])
            student, teacher = model_params(exp, params, frozen), frozen["teacher"]
            hidden, _ = models.hidden_states(student, batch["tokens"], cfg, **args)
            t_hidden, _ = models.hidden_states(teacher, batch["tokens"], self.teacher_cfg, **args)
            head, t_head = head_params(student), head_params(teacher)

            def per_token(h, t_h, targets):  # both models' logits, model.loss_chunks at a time
                logits = models.unembed(head, h, cfg)
                t_logits = jax.lax.stop_gradient(models.unembed(t_head, t_h, self.teacher_cfg))
                return token_kl(logits, t_logits, dcfg), token_cross_entropy(logits, targets)[0]
            kl, ce = over_blocks(cfg.loss_chunks, per_token, hidden,
                                 jax.lax.stop_gradient(t_hidden), batch["targets"])
            mask = batch["loss_mask"].astype(jnp.float32)
            w = jnp.maximum(mask.sum(), 1.0)
            kl, ce = (kl * mask).sum() / w, (ce * mask).sum() / w
            total = kl + dcfg.sft_weight * ce if dcfg.sft_weight else kl
            return total, {"kl": kl, "ce_loss": ce, "weight": mask.sum()}
        return loss
