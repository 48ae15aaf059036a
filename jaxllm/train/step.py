"""Train state and the jitted train/eval steps, shared by every task.

The state is a plain dict {params, opt_state, step, rng}; params are sharded by their logical
axes, the optimizer state follows the params (XLA's propagation, read back from the compiled
init), and the step is jitted with explicit in/out shardings and a donated state."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from jaxllm import models, sharding
from jaxllm.config import Experiment

LossFn = Callable  # (params, batch) -> (loss, metrics with "weight")


def abstract_state(exp: Experiment, optimizer, mesh):
    """ShapeDtypeStructs with NamedShardings for the whole train state (no allocation)."""
    rules = exp.mesh.rules
    p_abs = models.abstract_params(exp.model)
    p_sh = sharding.tree_shardings(models.logical_axes(exp.model), p_abs, mesh, rules)
    p_abs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), p_abs, p_sh)
    opt_abs = jax.eval_shape(optimizer.init, p_abs)
    rep = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    # Optimizer moments are laid out like their params (ZeRO: sharded with them); scalars such
    # as Adam's count are replicated.
    opt_sh = optax.tree_utils.tree_map_params(
        optimizer, lambda _, s: s, opt_abs, p_sh, transform_non_params=lambda _: rep,
        is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))
    opt_abs = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           opt_abs, opt_sh)
    return {"params": p_abs, "opt_state": opt_abs,
            "step": jax.ShapeDtypeStruct((), jnp.int32, sharding=rep),
            "rng": jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)}


def shardings_of(abstract):
    return jax.tree.map(lambda a: a.sharding, abstract)


def init_state(exp: Experiment, optimizer, mesh, params=None):
    """A fresh state created directly in its shards (params from `params` when given)."""
    abstract = abstract_state(exp, optimizer, mesh)
    key = jax.random.key(exp.seed)
    init_key, rng = jax.random.split(key)

    def make(init_key, rng, params):
        if params is None:
            params = models.init(exp.model, init_key)
        return {"params": params, "opt_state": optimizer.init(params),
                "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(rng)}
    with sharding.use(mesh, exp.mesh.rules):
        return jax.jit(make, out_shardings=shardings_of(abstract))(init_key, rng, params)


def _split_micro(batch, n):
    """[B, ...] -> [n, B/n, ...], micro-batch j taking rows j, j+n, ... so each stays spread
    over all batch shards."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(exp: Experiment, loss_fn: LossFn, optimizer, lr_schedule, mesh, abstract):
    accum = exp.train.grad_accum

    def weighted(params, batch):
        loss, metrics = loss_fn(params, batch)
        w = jax.lax.stop_gradient(metrics["weight"])
        return loss * w, metrics

    grad_fn = jax.value_and_grad(weighted, has_aux=True)

    def step(state, batch):
        params = state["params"]
        if accum == 1:
            (lw, metrics), grads = grad_fn(params, batch)
            w = metrics.pop("weight")
        else:
            # Sum loss x weight and its gradient over micro-batches, divide once at the end, so
            # the result equals one big batch whatever the token count of each micro-batch.
            def body(carry, mb):
                (lw, m), g = grad_fn(params, mb)
                g_acc, lw_acc, m_acc = carry
                mw = m.pop("weight")
                m_acc = {k: m_acc.get(k, 0.0) + v * mw for k, v in m.items()} | {
                    "weight": m_acc["weight"] + mw}
                return (jax.tree.map(jnp.add, g_acc, g), lw_acc + lw, m_acc), None
            micro = _split_micro(batch, accum)
            m_shape = jax.eval_shape(lambda: loss_fn(params, jax.tree.map(lambda x: x[0], micro))[1])
            m0 = {k: jnp.zeros((), jnp.float32) for k in m_shape}
            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, lw, msum), _ = jax.lax.scan(body, (zeros, jnp.float32(0), m0), micro)
            w = msum.pop("weight")
            metrics = {k: v / jnp.maximum(w, 1.0) for k, v in msum.items()}
        denom = jnp.maximum(w, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = optimizer.update(grads, state["opt_state"], params)
        new_state = {"params": optax.apply_updates(params, updates), "opt_state": opt_state,
                     "step": state["step"] + 1, "rng": state["rng"]}
        metrics.update(loss=lw / denom, grad_norm=optax.tree.norm(grads),
                       lr=lr_schedule(state["step"]), tokens=w)
        return new_state, metrics

    sh = shardings_of(abstract)
    bsh = sharding.batch_sharding(mesh, exp.mesh.rules)
    jitted = jax.jit(step, in_shardings=(sh, bsh), out_shardings=(sh, None), donate_argnums=0)
    return _under_mesh(jitted, mesh, exp)


def make_eval_step(exp: Experiment, loss_fn: LossFn, mesh, abstract):
    """(params, batch) -> (sum of loss x weight, weight), to be summed over eval batches."""
    def step(params, batch):
        loss, metrics = loss_fn(params, batch)
        return loss * metrics["weight"], metrics["weight"]
    bsh = sharding.batch_sharding(mesh, exp.mesh.rules)
    jitted = jax.jit(step, in_shardings=(shardings_of(abstract)["params"], bsh))
    return _under_mesh(jitted, mesh, exp)


def _under_mesh(fn, mesh, exp):
    @functools.wraps(fn)
    def call(*args):
        with sharding.use(mesh, exp.mesh.rules):
            return fn(*args)
    call.jitted = fn
    return call
