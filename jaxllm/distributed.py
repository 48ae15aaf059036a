"""Multi-process start-up through JAX's own runtime (jax.distributed): one process per host
(TPU VM worker, SLURM task, or a local process), all running the same program (SPMD).

Explicit: `jaxllm train CFG --coordinator HOST:PORT --num-processes N --process-id I`, or the
environment variables JAXLLM_COORDINATOR, JAXLLM_NUM_PROCESSES, JAXLLM_PROCESS_ID.
Automatic: on TPU VMs (the TPU metadata names the workers) and inside a SLURM step (srun) with
more than one task, jax.distributed detects everything itself; under SLURM we also tell it
which GPUs each process drives (JAX_LOCAL_DEVICE_IDS, when set, wins). On CPU, collectives go
over gloo."""
from __future__ import annotations

import os
import re

import jax


def _tpu_chips_attached() -> bool:
    try:  # TPU chips on this host's PCI bus: how jax itself recognises a Cloud TPU VM
        from jax._src import hardware_utils
        return hardware_utils.num_available_tpu_chips_and_device_id()[0] > 0
    except Exception:
        return False


def _on_tpu_vm() -> bool:
    # The worker list comes from the VM's metadata (jax reads it); GKE and multislice name it.
    return ("," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
            or "MEGASCALE_COORDINATOR_ADDRESS" in os.environ or _tpu_chips_attached())


def _in_slurm_step() -> bool:
    # SLURM_STEP_NODELIST exists only inside srun: a batch script's own shell is not a job step.
    return ("SLURM_JOB_ID" in os.environ and "SLURM_STEP_NODELIST" in os.environ
            and int(os.environ.get("SLURM_NTASKS", "1")) > 1)


def _auto_detectable() -> bool:
    return _in_slurm_step() or _on_tpu_vm()


def _tasks_on_this_node(env) -> int | None:
    """From SLURM_STEP_TASKS_PER_NODE, e.g. "8(x4)" or "2,1(x3)", indexed by SLURM_NODEID."""
    spec = env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE")
    if not spec:
        return None
    counts = []
    for part in spec.split(","):
        m = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not m:
            return None
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    node = int(env.get("SLURM_NODEID", 0))
    return counts[node] if node < len(counts) else None


def slurm_local_device_ids(env=None) -> list[int] | None:
    """The GPUs (indices among those this process sees) that this SLURM task drives.

    jax alone gives every task [SLURM_LOCALID]: right for one task per GPU with all of a node's
    GPUs visible to each, but one task per node would then drive only GPU 0, and a task bound
    to its own GPUs (--gpus-per-task) would ask for one it cannot see. Here: a task bound to
    its own GPUs drives all it sees; tasks that share a node's GPUs split them evenly. None
    leaves it to jax (no GPUs named, or an uneven split)."""
    env = os.environ if env is None else env
    visible = env.get("CUDA_VISIBLE_DEVICES")
    seen = len([d for d in visible.split(",") if d.strip()]) if visible is not None else None
    on_node = int(env["SLURM_GPUS_ON_NODE"]) if env.get("SLURM_GPUS_ON_NODE", "").isdigit() else None
    seen = seen if seen is not None else on_node
    tasks = _tasks_on_this_node(env)
    if not seen or "SLURM_LOCALID" not in env:
        return None
    if (on_node is not None and seen < on_node) or (tasks and seen < tasks):
        return list(range(seen))  # bound to its own GPUs
    if tasks is None or seen % tasks:
        return None
    per = seen // tasks
    first = int(env["SLURM_LOCALID"]) * per
    return list(range(first, first + per))


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> bool:
    """Join the job when there is one to join; returns whether this is a multi-process run."""
    coordinator = coordinator or os.environ.get("JAXLLM_COORDINATOR")
    if num_processes is None and "JAXLLM_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["JAXLLM_NUM_PROCESSES"])
    if process_id is None and "JAXLLM_PROCESS_ID" in os.environ:
        process_id = int(os.environ["JAXLLM_PROCESS_ID"])
    if coordinator is None and not _auto_detectable():
        return False
    # Only the CPU backend reads this; accelerators use their own interconnect.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if coordinator is None:
        ids = None
        if _in_slurm_step() and "JAX_LOCAL_DEVICE_IDS" not in os.environ:
            ids = slurm_local_device_ids()
        jax.distributed.initialize(local_device_ids=ids)
    else:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator needs --num-processes and --process-id "
                             "(or JAXLLM_NUM_PROCESSES / JAXLLM_PROCESS_ID)")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    return True
