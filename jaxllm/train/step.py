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

LossFn = Callable  # (params, batch, frozen) -> (loss, metrics with "weight")


def model_spec(exp: Experiment):
    """(abstract params, logical axes) of the model itself: what pretraining trains."""
    return models.abstract_params(exp.model), models.logical_axes(exp.model)


def with_shardings(abstract_tree, logical_tree, mesh, rules):
    sh = sharding.tree_shardings(logical_tree, abstract_tree, mesh, rules)
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                        abstract_tree, sh)


def abstract_state(exp: Experiment, optimizer, mesh, spec=None):
    """ShapeDtypeStructs with NamedShardings for the whole train state (no allocation).

    spec: (abstract params, logical axes) of what is trained; the model's by default (a task
    training adapters or an extra head gives its own)."""
    rules = exp.mesh.rules
    p_abs = with_shardings(*(spec or model_spec(exp)), mesh, rules)
    p_sh = shardings_of(p_abs)
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


def init_state(exp: Experiment, optimizer, mesh, base=None, *, spec=None, make_params=None):
    """A fresh state created directly in its shards. Params are make_params(key, base) (a
    task's adapters or heads over the base model) or, by default, `base` itself or a fresh
    model init."""
    abstract = abstract_state(exp, optimizer, mesh, spec)
    key = jax.random.key(exp.seed)
    init_key, rng = jax.random.split(key)

    def default(key, base):
        return models.init(exp.model, key) if base is None else base

    def make(init_key, rng, base):
        params = (make_params or default)(init_key, base)
        return {"params": params, "opt_state": optimizer.init(params),
                "step": jnp.zeros((), jnp.int32), "rng": jax.random.key_data(rng)}
    with sharding.use(mesh, exp.mesh.rules):
        return jax.jit(make, out_shardings=shardings_of(abstract))(init_key, rng, base)


def base_key(exp: Experiment):
    """The key a fresh model init uses (the same one init_state's default uses)."""
    return jax.random.split(jax.random.key(exp.seed))[0]


def _split_micro(batch, n):
    """[B, ...] -> [n, B/n, ...], micro-batch j taking rows j, j+n, ... so each stays spread
    over all batch shards."""
    return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def make_train_step(exp: Experiment, loss_fn: LossFn, optimizer, lr_schedule, mesh, abstract,
                    frozen=None):
    """step(state, batch) -> (state, metrics). `frozen` (e.g. a LoRA base, a DPO reference, a
    teacher) is passed to loss_fn(params, batch, frozen) as a jit argument, never trained."""
    accum = exp.train.grad_accum

    def weighted(params, batch, frozen):
        loss, metrics = loss_fn(params, batch, frozen)
        w = jax.lax.stop_gradient(metrics["weight"])
        return loss * w, metrics

    grad_fn = jax.value_and_grad(weighted, has_aux=True)

    def step(state, batch, frozen):
        params = state["params"]
        # Randomness of a step (LoRA dropout) from the checkpointed rng and the step: a resumed
        # run draws the same masks.
        key = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), state["step"])
        if accum == 1:
            with models.adapter_dropout(exp.lora.dropout, key):
                (lw, metrics), grads = grad_fn(params, batch, frozen)
            w = metrics.pop("weight")
        else:
            # Sum loss x weight and its gradient over micro-batches, divide once at the end, so
            # the result equals one big batch whatever the token count of each micro-batch.
            def body(carry, mb_j):
                mb, j = mb_j
                with models.adapter_dropout(exp.lora.dropout, jax.random.fold_in(key, j)):
                    (lw, m), g = grad_fn(params, mb, frozen)
                g_acc, lw_acc, m_acc = carry
                mw = m.pop("weight")
                m_acc = {k: m_acc.get(k, 0.0) + v * mw for k, v in m.items()} | {
                    "weight": m_acc["weight"] + mw}
                return (jax.tree.map(jnp.add, g_acc, g), lw_acc + lw, m_acc), None
            micro = _split_micro(batch, accum)
            m_shape = jax.eval_shape(
                lambda: loss_fn(params, jax.tree.map(lambda x: x[0], micro), frozen)[1])
            m0 = {k: jnp.zeros((), jnp.float32) for k in m_shape}
            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, lw, msum), _ = jax.lax.scan(body, (zeros, jnp.float32(0), m0),
                                                (micro, jnp.arange(accum)))
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
    jitted = jax.jit(step, in_shardings=(sh, bsh, _shardings_of_arrays(frozen)),
                     out_shardings=(sh, None), donate_argnums=0)
    return _under_mesh(jitted, mesh, exp, frozen)


def make_eval_step(exp: Experiment, loss_fn: LossFn, mesh, abstract, frozen=None):
    """(params, batch) -> {"loss" and each metric times the batch's weight, "weight"}, to be
    summed over eval batches (loop.evaluate divides once)."""
    def step(params, batch, frozen):
        loss, metrics = loss_fn(params, batch, frozen)
        w = metrics.pop("weight")
        return {k: v * w for k, v in (metrics | {"loss": loss}).items()} | {"weight": w}
    bsh = sharding.batch_sharding(mesh, exp.mesh.rules)
    jitted = jax.jit(step, in_shardings=(shardings_of(abstract)["params"], bsh,
                                         _shardings_of_arrays(frozen)))
    return _under_mesh(jitted, mesh, exp, frozen)


def _shardings_of_arrays(tree):
    return None if tree is None else jax.tree.map(lambda x: x.sharding, tree)


def _under_mesh(fn, mesh, exp, frozen=None):
    @functools.wraps(fn)
    def call(*args):
        with sharding.use(mesh, exp.mesh.rules):
            return fn(*args, frozen)
    call.jitted = fn
    return call
