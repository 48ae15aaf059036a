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


def over_blocks(n: int, fn, *xs):
    """fn(*parts) -> per-position outputs, applied to n blocks of strided positions of xs
    ([B, S, ...] each; block i holds positions i, i+n, i+2n, ..., so a sequence split over
    devices stays split without moving) and reassembled to [B, S, ...]. Each block runs under
    jax.checkpoint, so its intermediates (the logits) are live one block at a time and
    recomputed in the backward pass; LoRA dropout draws its own masks per block."""
    if n == 1:
        return fn(*xs)
    b, s = xs[0].shape[:2]
    if s % n:
        raise ValueError(f"model.loss_chunks={n} does not divide the rows' length {s}")
    dropout = active_dropout()

    @jax.checkpoint
    def block(i, *parts):
        if dropout is None:
            return fn(*parts)
        with models.adapter_dropout(dropout[0], jax.random.fold_in(dropout[1], i)):
            return fn(*parts)
    split = lambda x: jnp.moveaxis(x.reshape(b, s // n, n, *x.shape[2:]), 2, 0)  # noqa: E731
    outs = jax.lax.map(lambda a: block(*a), (jnp.arange(n), *map(split, xs)))
    return jax.tree.map(lambda y: jnp.moveaxis(y, 0, 2).reshape(b, s, *y.shape[3:]), outs)


def head_params(params) -> dict:
    """The params the output projection reads (models.unembed), tied or not."""
    return {k: params[k] for k in ("embed_tokens", "lm_head") if k in params}


def rows_cross_entropy(params, rows: dict, cfg: models.ModelConfig, prefix: str = ""):
    """token_cross_entropy of rows (tokens, targets, positions, segment_ids) -> nll, lse [B, S],
    the logits formed cfg.loss_chunks blocks at a time (over_blocks): at long context they
    dominate memory (fp32, 2 GiB per 4k tokens at a 128k vocabulary)."""
    hidden, _ = models.hidden_states(params, rows[prefix + "tokens"], cfg,
                                     positions=rows[prefix + "positions"],
                                     segment_ids=rows[prefix + "segment_ids"])
    head = head_params(params)
    return over_blocks(cfg.loss_chunks, lambda h, t: token_cross_entropy(
        models.unembed(head, h, cfg), t), hidden, rows[prefix + "targets"])


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
