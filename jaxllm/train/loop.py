"""The one training loop. A task supplies its data and loss; the loop does the rest:
mesh, sharded state, jitted steps, eval, metrics, checkpoints, resume and clean shutdown."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import jax
import numpy as np

from jaxllm import config as config_lib
from jaxllm import models, sharding
from jaxllm.config import Experiment
from jaxllm.data import check_vocab, to_global
from jaxllm.train import metrics as metrics_lib
from jaxllm.train import step as step_lib
from jaxllm.train.checkpoint import Checkpointer
from jaxllm.train.optimizer import make_optimizer, schedule


class _StopFlag:
    """SIGTERM sets it; the loop then saves a final checkpoint and returns."""

    def __init__(self):
        self.requested = False
        self._old = None

    def __enter__(self):
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._old = None
        return self

    def _handle(self, *_):
        self.requested = True

    def __exit__(self, *exc):
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _batch_checks(exp: Experiment, mesh) -> int:
    """Host-local batch size, after checking the global batch splits over hosts and shards."""
    b, procs = exp.train.batch_size, jax.process_count()
    shards = sharding.batch_shards(mesh, exp.mesh.rules)
    if b % procs or b % shards or (b // exp.train.grad_accum) % shards:
        raise config_lib.ConfigError(
            f"train.batch_size={b} (grad_accum={exp.train.grad_accum}) must split evenly over "
            f"{procs} process(es) and {shards} batch shard(s) of mesh {sharding.describe(mesh)}")
    return b // procs


def run(exp: Experiment, *, task=None) -> dict:
    """Train per `exp`; returns the last logged metrics (with eval results when run)."""
    from jaxllm.tasks import get_task
    task = task or get_task(exp.task)
    run_dir = Path(exp.run_dir)
    mesh = sharding.make_mesh(exp.mesh)
    local_batch = _batch_checks(exp, mesh)
    data = task.make_data(exp, run_dir, local_batch)
    ckpt = Checkpointer(run_dir / "checkpoints", exp.checkpoint) if exp.checkpoint.enabled else None

    optimizer = make_optimizer(exp.optimizer, exp.train.steps)
    lr_schedule = schedule(exp.optimizer, exp.train.steps)
    spec = task.param_spec(exp)
    abstract = step_lib.abstract_state(exp, optimizer, mesh, spec)
    latest = ckpt.latest_step() if ckpt is not None and exp.train.resume else None
    base, frozen = base_and_frozen(exp, task, mesh, need_base=latest is None)
    task.prepare_data(exp, data, lambda: base if base is not None else load_base(exp, mesh),
                      frozen, mesh, run_dir, resuming=latest is not None)
    train_iter = data.train_iterator()
    if latest is not None:
        state, data_state = ckpt.restore(latest, abstract)
        train_iter.set_state(data_state)
    else:
        state = step_lib.init_state(exp, optimizer, mesh, base, spec=spec,
                                    make_params=lambda key, b: task.init_params(exp, key, b))
    del base  # what the state does not hold may be freed now
    if jax.process_index() == 0:
        config_lib.save_resolved(exp, run_dir)

    loss_fn = task.loss_fn(exp)
    train_step = step_lib.make_train_step(exp, loss_fn, optimizer, lr_schedule, mesh, abstract,
                                          frozen)
    eval_step = step_lib.make_eval_step(exp, loss_fn, mesh, abstract, frozen)
    eval_batches = data.eval_batches(exp.train.eval_batches)
    bsh = sharding.batch_sharding(mesh, exp.mesh.rules)

    start = int(jax.device_get(state["step"]))
    tokens_per_step = exp.train.batch_size * exp.data.seq_len
    flops_per_step = models.flops_per_token(exp.model, exp.data.seq_len) * tokens_per_step
    peak = metrics_lib.peak_flops_per_device(exp.train.peak_flops_per_device) * jax.device_count()
    logger = metrics_lib.MetricsLogger(run_dir, exp.train.steps, start,
                                       tensorboard=exp.logging.tensorboard,
                                       progress_bar=exp.logging.progress_bar)
    last: dict = {}
    t_mark, steps_since = None, 0
    with _StopFlag() as stop:
        for step in range(start, exp.train.steps):
            batch = _to_device(next(train_iter), exp, bsh, f"train batch at step {step + 1}")
            state, m = train_step(state, batch)
            done = step + 1
            if t_mark is None:  # the first step includes compilation: time from its end
                jax.block_until_ready(m)
                t_mark, steps_since = time.perf_counter(), 0
            else:
                steps_since += 1
            stopping = stop.requested  # read once: a signal arriving later waits a step
            final = done == exp.train.steps or stopping
            if done % exp.logging.every_steps == 0 or final:
                m = jax.device_get(m)
                now = time.perf_counter()
                rate = steps_since / (now - t_mark) if steps_since else float("nan")
                t_mark, steps_since = now, 0
                last = {k: float(np.asarray(v)) for k, v in m.items() if k != "tokens"}
                last.update(tokens_per_sec=rate * tokens_per_step,
                            tflops_per_device=rate * flops_per_step / jax.device_count() / 1e12,
                            mfu=rate * flops_per_step / peak)
                if (exp.train.eval_every and done % exp.train.eval_every == 0) or final:
                    last.update(evaluate(eval_step, state["params"], eval_batches, bsh))
                    t_mark = time.perf_counter()  # eval time is not training throughput
                logger.log(done, last)
            logger.advance(done)
            if ckpt is not None and (done % exp.checkpoint.every_steps == 0 or final):
                ckpt.save(done, state, train_iter.get_state(), force=True)
            if stopping:
                logger.write(f"SIGTERM: saved a checkpoint at step {done}, exiting")
                break
    if ckpt is not None:
        ckpt.close()
    logger.close()
    last["stopped_early"] = stop.requested
    last["state"] = state
    last["tokenizer"] = data.tokenizer
    if jax.process_index() == 0 and exp.logging.plot and not stop.requested:
        metrics_lib.plot_runs([run_dir], run_dir / "loss.png")
    return last


def base_and_frozen(exp: Experiment, task, mesh, need_base: bool):
    """The base model's params (model.init_from, or a fresh seeded init) when a fresh state or
    a frozen tree needs them, and the task's frozen trees built from them."""
    has_frozen = task.needs_frozen(exp)
    if not (need_base or has_frozen):
        return None, None
    if has_frozen or not _trains_model_only(exp, task):
        base = load_base(exp, mesh)
    else:  # init_state makes the same fresh init itself, already in its shards
        base = initial_params(exp, mesh, _model_abstract(exp, mesh))
    return base, (task.frozen(exp, base, mesh) if has_frozen else None)


def load_base(exp: Experiment, mesh):
    """The starting model: model.init_from, or the fresh seeded init, placed on the mesh."""
    base = initial_params(exp, mesh, _model_abstract(exp, mesh))
    if base is None:
        base = models.init_sharded(exp.model, step_lib.base_key(exp), mesh, exp.mesh.rules)
    return base


def _model_abstract(exp, mesh):
    return {"params": step_lib.with_shardings(*step_lib.model_spec(exp), mesh, exp.mesh.rules)}


def _trains_model_only(exp, task) -> bool:
    """True when the trained params are exactly the model's (init_state can init them)."""
    return not task.needs_frozen(exp) and not task.extra_params(exp)


def initial_params(exp: Experiment, mesh, abstract):
    """Params named by model.init_from, placed on the mesh; None for a fresh init."""
    src = exp.model.init_from
    if src is None:
        return None
    if src.startswith("hf:"):
        from jaxllm.interop import hf
        _, params = hf.load(src[3:], dtype=exp.model.param_dtype, mesh=mesh, rules=exp.mesh.rules)
        return params
    from jaxllm.train.checkpoint import CheckpointError, restore_run_params
    _, params = restore_run_params(src[4:])
    want = jax.tree.map(lambda a: (a.shape, a.dtype), abstract["params"])
    if jax.tree.map(lambda a: (a.shape, a.dtype), params) != want:
        raise CheckpointError(f"model.init_from={src}: its params do not match this model's shape")
    return jax.tree.map(lambda a, s: jax.device_put(a, s.sharding), params, abstract["params"])


def _to_device(batch: dict, exp: Experiment, bsh, where: str) -> dict:
    for key in ("tokens", "targets"):
        if key in batch:
            check_vocab(batch[key], exp.model.vocab_size, f"{where}, {key}")
    return to_global(batch, bsh)


def evaluate(eval_step, params, batches, bsh) -> dict:
    """Held-out loss, perplexity and the task's metrics (eval_*), weighted over all batches."""
    if not batches:
        return {}
    sums: dict = {}
    for b in batches:
        for k, v in jax.device_get(eval_step(params, to_global(b, bsh))).items():
            sums[k] = sums.get(k, 0.0) + float(v)
    weight = max(sums.pop("weight"), 1.0)
    out = {f"eval_{k}": v / weight for k, v in sums.items()}
    return out | {"eval_ppl": float(np.exp(min(out["eval_loss"], 50.0)))}
