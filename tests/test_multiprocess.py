"""Two processes x 4 CPU devices (gloo collectives over localhost) train like one process with
8 devices, and their checkpoint resumes in one process on another mesh."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxllm import config
from jaxllm.train.loop import run
from jaxllm.train.metrics import read_metrics

TINY = ["model.vocab_size=264", "model.hidden_size=64", "model.intermediate_size=128",
        "model.num_layers=2", "model.num_heads=4", "model.num_kv_heads=2", "model.max_seq_len=64",
        "data.seq_len=32", "data.tokenizer.kind=byte", "train.batch_size=8",
        "optimizer.schedule=constant", "optimizer.warmup_steps=0", "optimizer.lr=3e-3",
        "logging.every_steps=1", "logging.progress_bar=false", "logging.plot=false",
        "train.eval_batches=2", "checkpoint.every_steps=3", "checkpoint.async_save=false"]


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(run_dir)}


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_match_one_and_resume_on_another_mesh(tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(
        json.dumps({"text": f"document {i} " + "lorem ipsum dolor " * (i % 9 + 2)}) + "\n"
        for i in range(120)))
    (tmp_path / "base.yaml").write_text("name: mp\n")
    common = [*TINY, f"data.sources=[{tmp_path / 'c.jsonl'}]"]

    ref_dir = tmp_path / "ref"
    run(config.load(None, [*common, f"run_dir={ref_dir}", "train.steps=6"]))  # 1 process, 8 devices

    mp_dir = tmp_path / "mp"
    port = free_port()
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxllm.cli", "train", str(tmp_path / "base.yaml"), *common,
         f"run_dir={mp_dir}", "train.steps=3", "--coordinator", f"127.0.0.1:{port}",
         "--num-processes", "2", "--process-id", str(i)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-3000:]
    ref, mp = losses(ref_dir), losses(mp_dir)
    assert sorted(mp) == [1, 2, 3]
    np.testing.assert_allclose([mp[s] for s in (1, 2, 3)], [ref[s] for s in (1, 2, 3)], rtol=1e-6)

    # Resume the two-process checkpoint in this (one) process, on a {data:2, fsdp:4} mesh.
    resumed = config.load(mp_dir / "resolved.yaml", ["train.steps=6", "train.resume=true",
                                                     "mesh.ici.data=2", "mesh.ici.fsdp=4"])
    run(resumed)
    after = losses(mp_dir)
    np.testing.assert_allclose([after[s] for s in (4, 5, 6)], [ref[s] for s in (4, 5, 6)], rtol=1e-5)
