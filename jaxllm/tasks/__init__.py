"""Training objectives. A task gives the loop its data, its trained params and its loss; see
tasks/base.py for the interface and the trainable/frozen split."""
from __future__ import annotations


def get_task(name: str):
    from jaxllm.tasks.distill import DistillTask
    from jaxllm.tasks.dpo import DPOTask
    from jaxllm.tasks.pretrain import PretrainTask
    from jaxllm.tasks.reward import RewardTask
    from jaxllm.tasks.sft import SFTTask
    tasks = {"pretrain": PretrainTask, "sft": SFTTask, "dpo": DPOTask, "reward": RewardTask,
             "distill": DistillTask}
    if name not in tasks:
        raise ValueError(f"task: unknown task {name!r} (one of {sorted(tasks)})")
    return tasks[name]()
