"""Supervised fine-tuning: cross-entropy on completions / assistant turns only, packed rows.

The batch is the pretraining batch (the mask marks trained tokens), so the loss is
pretraining's; full fine-tuning or LoRA comes from the lora config section."""
from __future__ import annotations

from jaxllm.tasks.base import Task
from jaxllm.tasks.pretrain import PretrainTask


class SFTTask(Task):
    def loss_fn(self, exp):
        return PretrainTask().loss_fn(exp)
