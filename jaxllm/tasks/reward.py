"""Reward models: a scalar head on the final hidden state of each sequence's last real token.

Pairwise loss -log sigmoid(r_chosen - r_rejected - margin) (+ c * mean((r_c + r_r)^2) to keep
rewards centred), or squared error against scalar labels ("scored" data). The head is the
trained param "score" [hidden, 1], named as Hugging Face's *ForSequenceClassification."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm import models
from jaxllm.config import Experiment, RewardConfig
from jaxllm.tasks.base import Task, abstract_array, model_params, pair_shapes
from jaxllm.tasks.sequences import last_index, pair_rows


def score(params, cfg: models.ModelConfig, tokens, segment_ids=None, positions=None):
    """Rewards [B] for right-padded rows (segment id 0 on padding; all real when None).
    `params` are the model's params plus {"score": {"kernel": [hidden, 1]}}."""
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    hidden, _ = models.hidden_states(params, tokens, cfg, positions=positions,
                                     segment_ids=segment_ids)
    last = jnp.take_along_axis(hidden, last_index(segment_ids)[:, None, None], axis=1)[:, 0]
    return (last.astype(jnp.float32) @ params["score"]["kernel"].astype(jnp.float32))[:, 0]


def pairwise_losses(r_chosen, r_rejected, cfg: RewardConfig):
    loss = -jax.nn.log_sigmoid(r_chosen - r_rejected - cfg.margin)
    if cfg.center_coef:
        loss = loss + cfg.center_coef * jnp.square(r_chosen + r_rejected)
    return loss


def loss(params, batch, frozen, exp: Experiment):
    cfg, rcfg = exp.model, exp.reward
    full = model_params(exp, params, frozen) | {"score": params["score"]}
    valid = batch["valid"]
    w = jnp.maximum(valid.sum(), 1.0)
    mean = lambda x: (x * valid).sum() / w
    if rcfg.loss == "regression":
        r = score(full, cfg, batch["tokens"], batch["segment_ids"], batch["positions"])
        return mean(jnp.square(r - batch["score"])), {
            "rewards/mean": mean(r), "weight": valid.sum()}
    rows = pair_rows(batch)
    r = score(full, cfg, rows["tokens"], rows["segment_ids"], rows["positions"])
    n = batch["chosen_tokens"].shape[0]
    rc, rr = r[:n], r[n:]
    both = jnp.concatenate([rc, rr])
    metrics = {"accuracy": mean((rc > rr).astype(jnp.float32)), "margin": mean(rc - rr),
               "rewards/mean": both.mean(), "rewards/std": both.std(), "weight": valid.sum()}
    return mean(pairwise_losses(rc, rr, rcfg)), metrics


class RewardTask(Task):
    def extra_params(self, exp):
        cfg = exp.model

        def init(key):
            w = jax.random.normal(key, (cfg.hidden_size, 1), jnp.dtype(cfg.param_dtype))
            return {"kernel": w * cfg.init_std}
        return {"score": (init, {"kernel": ("embed", None)})}

    def abstract_batch(self, exp, batch_size):
        if exp.reward.loss == "regression":
            score = abstract_array((batch_size,), "float32")
            return super().abstract_batch(exp, batch_size) | {"score": score}
        return pair_shapes(exp, batch_size)

    def loss_fn(self, exp):
        return lambda params, batch, frozen: loss(params, batch, frozen, exp)
