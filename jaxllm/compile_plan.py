"""Compile-time memory plans: AOT-compile the real train step for a TPU topology on any host
with libtpu installed (no TPU needed), and read per-chip memory and FLOPs from XLA.

    jaxllm compile experiments/x.yaml --topology v5p:4x4x4 [--num-slices 2] [overrides]
"""
from __future__ import annotations

import dataclasses
import os

import jax

from jaxllm import models, sharding
from jaxllm.config import Experiment

class CompileError(ValueError):
    pass


# HBM per chip (GiB), matched by the topology's generation prefix.
HBM_GIB = {"v4": 32, "v5e": 16, "v5litepod": 16, "v5p": 95, "v6e": 32}


def topology_devices(topology: str, num_slices: int = 1):
    """The devices of a TPU topology such as "v5e:4x4" or "v5p:4x4x4" (needs libtpu)."""
    from jax.experimental import topologies
    try:
        import libtpu  # noqa: F401
    except ImportError:
        raise CompileError("jaxllm compile needs libtpu: pip install -e '.[tpu]'") from None
    # A compile touches no TPU chip: skip libtpu's one-process-per-host lockfile, which would
    # otherwise refuse a second compiling process (a parallel test worker, a second shell).
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:  # TPU VM hosts hold 2x2x1 chips in every generation listed in HBM_GIB
        desc = topologies.get_topology_desc(platform="tpu", topology_name=topology,
                                            chips_per_host_bounds=(2, 2, 1), num_slices=num_slices)
    except Exception as e:  # libtpu's message names what it did not understand
        raise CompileError(f"--topology {topology!r}: {str(e).splitlines()[0]}") from None
    return desc.devices


def plan(exp: Experiment, topology: str, num_slices: int = 1) -> dict:
    """Per-chip bytes (arguments, outputs, temporaries, total), HBM, fit, and step FLOPs."""
    from jaxllm.tasks import get_task
    from jaxllm.train import step as step_lib
    from jaxllm.train.optimizer import make_optimizer, schedule
    devices = topology_devices(topology, num_slices)
    mesh = sharding.make_mesh(exp.mesh, devices)
    optimizer = make_optimizer(exp.optimizer, exp.train.steps)
    task = get_task(exp.task)
    abstract = step_lib.abstract_state(exp, optimizer, mesh, task.param_spec(exp))
    bsh = sharding.batch_sharding(mesh, exp.mesh.rules)
    shape = (exp.train.batch_size, exp.data.seq_len)
    batch = {k: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=bsh)
             for k, x in task.abstract_batch(exp, exp.train.batch_size).items()}
    frozen = abstract_frozen(exp, task, mesh)
    train_step = step_lib.make_train_step(exp, task.loss_fn(exp), optimizer,
                                          schedule(exp.optimizer, exp.train.steps), mesh, abstract,
                                          frozen)
    gen = topology.split(":")[0].lower()
    hbm = HBM_GIB.get(gen, float("nan")) * 1024**3
    head = {"topology": topology, "num_slices": num_slices, "chips": len(devices),
            "mesh": sharding.describe(mesh), "remat": exp.model.remat,
            "attention": exp.model.attention_impl, "loss_chunks": exp.model.loss_chunks,
            "batch": shape, "hbm": hbm}
    try:
        with sharding.use(mesh, exp.mesh.rules):
            compiled = train_step.jitted.lower(abstract, batch, frozen).compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # XLA refuses programs that cannot fit; its message carries the size it needed.
        return {**head, "fits": False, "error": str(e).split("RESOURCE_EXHAUSTED:")[-1].strip()}
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    total = (mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes)
    return {**head, "arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
            "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
            "total": total, "fits": total <= hbm,
            "flops_per_chip": float(cost.get("flops", float("nan"))),
            "model_flops_per_chip": models.flops_per_token(exp.model, shape[1]) * shape[0]
            * shape[1] / len(devices)}


def abstract_frozen(exp: Experiment, task, mesh):
    """The task's frozen trees (a LoRA base, a DPO reference) as ShapeDtypeStructs placed like
    the model's params; an int8 kernel like its float kernel, its per-channel scale replicated."""
    from jaxllm.train import step as step_lib
    if not task.needs_frozen(exp):
        return None
    model = step_lib.with_shardings(*step_lib.model_spec(exp), mesh, exp.mesh.rules)
    shapes = jax.eval_shape(lambda base: task.frozen(exp, base, mesh), model)
    placed = {tuple(k.key for k in path): x.sharding
              for path, x in jax.tree_util.tree_flatten_with_path(model)[0]}
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def place(path, x):
        keys = tuple(k.key for k in path)[1:]  # under "base", "ref", ...
        if keys[-1] in ("int8", "scale"):
            keys, part = keys[:-1], keys[-1]
        else:
            part = None
        where = replicated if part == "scale" else placed.get(keys, replicated)
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=where)
    return jax.tree_util.tree_map_with_path(place, shapes)


def describe(p: dict) -> str:
    gib = 1024**3
    lines = [f"{p['topology']} x{p['num_slices']} slice(s), {p['chips']} chips, mesh {p['mesh']}, "
             f"batch {p['batch'][0]} x {p['batch'][1]} tokens, remat={p['remat']}, "
             f"attention={p['attention']}"]
    if "error" in p:
        lines.append(f"XLA: {p['error']}")
    else:
        lines += [f"per chip: arguments {p['arguments'] / gib:.2f} GiB, outputs {p['outputs'] / gib:.2f} "
                  f"GiB (aliased {p['aliased'] / gib:.2f}), temporaries {p['temporaries'] / gib:.2f} "
                  f"GiB, total {p['total'] / gib:.2f} GiB of {p['hbm'] / gib:.0f} GiB HBM",
                  f"step FLOPs per chip: model {p['model_flops_per_chip']:.4g} (6N + attention, "
                  f"no recompute); XLA's count of the compiled step {p['flops_per_chip']:.4g} "
                  "(a loop body counted once, Pallas kernels not at all)"]
    if p["fits"]:
        lines.append("fits")
    else:
        lines.append("DOES NOT FIT: try " + ", ".join(knobs(p)))
    return "\n".join(lines)


def knobs(p: dict) -> list[str]:
    """What to change when a plan does not fit, most effective first."""
    out = []
    if p["remat"] != "full":
        out.append("model.remat=full" + (" (or save_dots)" if p["remat"] == "none" else ""))
    if p.get("attention") == "reference":
        out.append("model.attention_impl=flash (no [seq, seq] scores in HBM)")
    if p.get("loss_chunks") == 1:
        out.append("model.loss_chunks=8 or more (logits a block of positions at a time)")
    return out + ["a larger mesh.ici.fsdp", "a smaller train.batch_size with train.grad_accum",
                  "mesh.ici.sequence for long sequences", "more chips"]


def with_remat(exp: Experiment, remat: str) -> Experiment:
    return dataclasses.replace(exp, model=exp.model.replace(remat=remat))
