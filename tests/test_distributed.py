"""Start-up of multi-process runs without starting one: what jaxllm hands jax.distributed under
SLURM, on TPU VMs and with explicit flags (the real two-process run: test_multiprocess.py)."""
import pytest

from jaxllm import distributed
from jaxllm.distributed import slurm_local_device_ids

NODE = {"SLURM_LOCALID": "3", "SLURM_NODEID": "1"}
ALL8 = {"CUDA_VISIBLE_DEVICES": "0,1,2,3,4,5,6,7", "SLURM_GPUS_ON_NODE": "8"}


@pytest.mark.parametrize("env, ids", [
    # one task per node drives all 8 GPUs (jax alone would give it GPU 0 only)
    ({**ALL8, "SLURM_STEP_TASKS_PER_NODE": "1(x4)", "SLURM_LOCALID": "0"}, list(range(8))),
    # one task per GPU, all GPUs visible to every task: its own
    ({**ALL8, "SLURM_STEP_TASKS_PER_NODE": "8(x4)"}, [3]),
    # --gpus-per-task=1: each task sees one GPU, index 0 whatever its id on the node
    ({"CUDA_VISIBLE_DEVICES": "3", "SLURM_GPUS_ON_NODE": "8", "SLURM_STEP_TASKS_PER_NODE": "8(x4)"}, [0]),
    ({"CUDA_VISIBLE_DEVICES": "0", "SLURM_STEP_TASKS_PER_NODE": "8(x4)"}, [0]),
    # 4 tasks share 8 GPUs: two each
    ({**ALL8, "SLURM_STEP_TASKS_PER_NODE": "4(x4)"}, [6, 7]),
    # uneven split on this node (node 1 runs 3 tasks), or no GPUs named: jax's default
    ({**ALL8, "SLURM_STEP_TASKS_PER_NODE": "2,3(x3)"}, None),
    ({"SLURM_STEP_TASKS_PER_NODE": "8(x4)"}, None),
])
def test_slurm_tasks_drive_the_gpus_they_should(env, ids):
    assert slurm_local_device_ids({**NODE, **env}) == ids


@pytest.fixture
def calls(monkeypatch):
    """Record jax.distributed.initialize's arguments instead of joining a job."""
    seen = []
    for var in ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES",
                "MEGASCALE_COORDINATOR_ADDRESS", "JAX_LOCAL_DEVICE_IDS", "JAXLLM_COORDINATOR",
                "JAXLLM_NUM_PROCESSES", "JAXLLM_PROCESS_ID"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(distributed, "_tpu_chips_attached", lambda: False)
    monkeypatch.setattr(distributed.jax.distributed, "initialize", lambda **kw: seen.append(kw))
    monkeypatch.setattr(distributed.jax.config, "update", lambda *a: None)
    return seen


def test_what_initialize_passes_to_jax(calls, monkeypatch):
    assert distributed.initialize() is False and calls == []  # one process: nothing to join

    monkeypatch.setenv("JAXLLM_COORDINATOR", "10.0.0.1:1234")
    monkeypatch.setenv("JAXLLM_NUM_PROCESSES", "2")
    assert distributed.initialize(process_id=1)
    assert calls.pop() == {"coordinator_address": "10.0.0.1:1234", "num_processes": 2,
                           "process_id": 1}
    monkeypatch.delenv("JAXLLM_COORDINATOR")
    with pytest.raises(ValueError, match="--num-processes and --process-id"):
        distributed.initialize("10.0.0.1:1234")

    # the sbatch script's own shell (no srun step) is not a job to join
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert distributed.initialize() is False
    for k, v in {"SLURM_STEP_NODELIST": "gpu[01-04]", "SLURM_LOCALID": "0", "SLURM_NODEID": "2",
                 "SLURM_STEP_TASKS_PER_NODE": "1(x4)", **ALL8}.items():
        monkeypatch.setenv(k, v)
    assert distributed.initialize()
    assert calls.pop() == {"local_device_ids": list(range(8))}
    monkeypatch.setenv("JAX_LOCAL_DEVICE_IDS", "0,1")  # the user's choice wins (jax reads it)
    assert distributed.initialize() and calls.pop() == {"local_device_ids": None}

    for var in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_STEP_NODELIST"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "w0,w1,w2,w3")  # TPU pod (GKE sets it)
    assert distributed.initialize() and calls.pop() == {"local_device_ids": None}


def test_slurm_script_launches_its_config_with_flags_this_jaxlib_knows():
    """The shipped sbatch script: valid bash, its node x GPU count is its config's preset, and
    every XLA flag it sets is one this jaxlib knows (an unknown flag aborts XLA at start-up)."""
    import os
    import re
    import subprocess
    import sys
    from pathlib import Path

    from jaxllm import config
    root = Path(__file__).resolve().parents[1]
    script = root / "experiments/gpu/slurm_llama3_8b.sbatch"
    text = script.read_text()
    subprocess.run(["bash", "-n", str(script)], check=True)
    opts = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, re.M))
    cfg = re.search(r"CONFIG=\$\{CONFIG:-(\S+)\}", text)[1]
    exp = config.load(root / cfg)
    assert exp.mesh.devices == int(opts["nodes"]) * int(opts["gpus-per-node"])
    assert exp.mesh.dcn.data == int(opts["nodes"])
    flags = re.search(r'^export XLA_FLAGS="([^"]*)"', text, re.M)[1]
    assert "--xla_gpu_enable_latency_hiding_scheduler=true" in flags.split()
    env = {**os.environ, "XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", "import jax; jax.numpy.ones(1).block_until_ready()"],
                         env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-500:]
