"""Training objectives. A task gives the loop its data (`make_data`) and its loss (`loss_fn`)."""
from __future__ import annotations


def get_task(name: str):
    if name == "pretrain":
        from jaxllm.tasks.pretrain import PretrainTask
        return PretrainTask()
    raise ValueError(f"task: unknown task {name!r}")
