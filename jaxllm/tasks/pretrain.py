"""Pretraining: next-token cross-entropy on packed rows, with optional z-loss.

Batch format (all [batch, seq]): tokens, targets, segment_ids, positions (int32), loss_mask
(float32; 0 where a position has no next token in its document, and on padding)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm import models
from jaxllm.models.llama import active_dropout
from jaxllm.tasks.base import Task, model_params, row_shapes

BATCH_KEYS = ("tokens", "targets", "segment_ids", "positions", "loss_mask")


def token_cross_entropy(logits, targets):
    """Per-token -log p(target) and log-partition, computed in fp32. logits [..., V].

    The target's logit is picked by a one-hot mask, not a gather: it fuses with the reduction,
    its gradient is elementwise (a gather's is a scatter, ~20% slower on XLA:CPU here), and a
    vocab split over devices needs no all-gather."""
    logits = logits.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1)
    hit = targets[..., None] == jnp.arange(logits.shape[-1], dtype=targets.dtype)
    target_logit = jnp.sum(jnp.where(hit, logits, 0.0), axis=-1)
    return lse - target_logit, lse


def rows_cross_entropy(params, rows: dict, cfg: models.ModelConfig, prefix: str = ""):
    """token_cross_entropy of rows (tokens, targets, positions, segment_ids) -> nll, lse [B, S].

    With cfg.loss_chunks = n > 1 the logits are formed in n blocks of strided positions (block
    i holds i, i+n, i+2n, ..., so a sequence split over devices stays split without moving)
    and each block is recomputed in the backward pass: only [B, S/n, V] logits are live at a
    time. At long context these dominate memory (fp32, 2 GiB per 4k tokens at a 128k vocab)."""
    tokens, targets = rows[prefix + "tokens"], rows[prefix + "targets"]
    args = dict(positions=rows[prefix + "positions"], segment_ids=rows[prefix + "segment_ids"])
    n = cfg.loss_chunks
    if n == 1:
        return token_cross_entropy(models.forward(params, tokens, cfg, **args)[0], targets)
    hidden, _ = models.hidden_states(params, tokens, cfg, **args)
    head = {k: params[k] for k in ("embed_tokens", "lm_head") if k in params}
    b, s, d = hidden.shape
    if s % n:
        raise ValueError(f"model.loss_chunks={n} does not divide the rows' length {s}")
    dropout = active_dropout()

    @jax.checkpoint
    def block(i, h, t):
        if dropout is None:
            return token_cross_entropy(models.unembed(head, h, cfg), t)
        # LoRA dropout on lm_head: each block draws its own masks.
        with models.adapter_dropout(dropout[0], jax.random.fold_in(dropout[1], i)):
            return token_cross_entropy(models.unembed(head, h, cfg), t)
    nll, lse = jax.lax.map(lambda x: block(*x), (
        jnp.arange(n), hidden.reshape(b, s // n, n, d).transpose(2, 0, 1, 3),
        targets.reshape(b, s // n, n).transpose(2, 0, 1)))
    return tuple(x.transpose(1, 2, 0).reshape(b, s) for x in (nll, lse))


def loss(params, batch, cfg: models.ModelConfig, *, z_loss: float = 0.0):
    """Mean cross-entropy over the tokens with loss_mask; metrics carry the token count."""
    nll, lse = rows_cross_entropy(params, batch, cfg)
    mask = batch["loss_mask"].astype(jnp.float32)
    weight = jnp.maximum(mask.sum(), 1.0)
    ce = (nll * mask).sum() / weight
    total = ce + (z_loss * (jnp.square(lse) * mask).sum() / weight if z_loss else 0.0)
    return total, {"ce_loss": ce, "weight": mask.sum()}


class PretrainTask(Task):
    """Packed next-token prediction over a text corpus (all weights, or LoRA adapters)."""

    def abstract_batch(self, exp, batch_size):
        return row_shapes(exp, batch_size)

    def make_data(self, exp, run_dir, local_batch: int):
        from jaxllm import data
        return data.PretrainData.from_config(exp.data, run_dir=run_dir, batch_size=local_batch,
                                             seed=exp.seed, process_index=jax.process_index(),
                                             process_count=jax.process_count())

    def loss_fn(self, exp):
        cfg, z = exp.model, exp.train.z_loss
        return lambda params, batch, frozen: loss(model_params(exp, params, frozen), batch, cfg,
                                                  z_loss=z)
