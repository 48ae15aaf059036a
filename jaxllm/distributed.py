"""Multi-process start-up through JAX's own runtime (jax.distributed): one process per host
(TPU VM worker, SLURM task, or a local process), all running the same program (SPMD).

Explicit: `jaxllm train CFG --coordinator HOST:PORT --num-processes N --process-id I`, or the
environment variables JAXLLM_COORDINATOR, JAXLLM_NUM_PROCESSES, JAXLLM_PROCESS_ID.
Automatic: on multi-host TPU VMs and under SLURM with more than one task, jax.distributed
detects everything itself. On CPU, collectives go over gloo."""
from __future__ import annotations

import os

import jax


def _auto_detectable() -> bool:
    slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ
    tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    return slurm or tpu_pod


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
        jax.distributed.initialize()
    else:
        if num_processes is None or process_id is None:
            raise ValueError("--coordinator needs --num-processes and --process-id "
                             "(or JAXLLM_NUM_PROCESSES / JAXLLM_PROCESS_ID)")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)
    return True
