"""The Trainer's host work trimmed, for a GPU that is otherwise kept waiting (each measured in a profile of the
3B's training steps on an H100): these override transformers' Trainer internals, so the `trainer_glue` lever
fences them; with it off (or an untested transformers) the Trainer's own methods run.

- A pinned batch is copied to the GPU without waiting (the Trainer's `.to(device)` waited on each of ~11
  tensors: 20 host syncs a step).
- The answer positions are found on the host from the loader's labels (`answer_only_logits`), before the batch
  moves: found on the GPU they are a read-back that waits for the previous step.
- The FLOP estimate counts the parameters once, not on every step (tens of ms a step, GPU idle).
- `model.train()`, called at every step, returns at once when every module is already training (a walk over
  ~3,400 modules otherwise).
- DDP keeps the gradients inside its all-reduce buckets (gradient_as_bucket_view) instead of copying ~1,000 small
  LoRA gradients in and out each step.
- Without torchrun on a host with several GPUs, one process trains on one GPU (the Trainer would wrap the model
  in nn.DataParallel, which breaks on Qwen2.5-VL's vision tower).
- Resuming under torchrun on CPUs loads the optimizer state to the CPU (the Trainer maps it to args.device,
  "cpu:0" there, a location torch.load cannot restore).
"""
from __future__ import annotations

import logging
import os

import torch
from accelerate.utils import DistributedDataParallelKwargs
from transformers import Trainer

from common.speed.answer_logits import ANSWER_POSITIONS, answer_positions

log = logging.getLogger("train")


def skip_needless_train_walks(model: torch.nn.Module) -> None:
    """Make `model.train(mode)` return at once when every module is already in that mode (a flat read of the
    modules' flags, kept from the last full walk, is ~35x cheaper than the walk)."""
    walk = model.train
    modules: list[torch.nn.Module] = []

    def train(mode: bool = True):
        if not modules or any(m.training != mode for m in modules):
            walk(mode)
            modules[:] = list(model.modules())
        return model

    model.train = train


def one_gpu_without_torchrun(args) -> None:
    if args.n_gpu > 1 and args.world_size == 1:
        log.warning("%d GPUs visible but not launched with torchrun: training on GPU 0 only (torchrun "
                    "--nproc_per_node %d 6_train.py ... uses them all)", args.n_gpu, args.n_gpu)
        args._n_gpu = 1


class FastTrainer(Trainer):
    """transformers' Trainer with the overrides above when `glue` is on; `answer_only` marks batches with the
    positions whose logits the loss needs."""

    def __init__(self, *args, glue: bool = True, answer_only: bool = False, **kwargs):
        self.glue = glue  # read while the base class builds its accelerator
        one_gpu_without_torchrun(kwargs["args"])
        super().__init__(*args, **kwargs)
        self.answer_only = answer_only
        self._flops_per_token = None
        if glue:
            skip_needless_train_walks(self.model)

    def restart_at(self, micro_batch: int, grad_accum: int, weights: dict) -> None:
        """Ready the Trainer to train again from its start at another micro-batch and accumulation (common.model.
        backoff): the trainable weights put back, the optimizer and scheduler made anew, no gradient left."""
        self.args.per_device_train_batch_size = micro_batch
        self.args.gradient_accumulation_steps = grad_accum
        self._train_batch_size = micro_batch
        self.optimizer, self.lr_scheduler = None, None
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in weights:
                    param.copy_(weights[name])
        self.model.zero_grad(set_to_none=True)

    def _build_accelerator_args(self, **kwargs) -> dict:
        args = super()._build_accelerator_args(**kwargs)
        for handler in args.get("kwargs_handlers", []):
            if isinstance(handler, DistributedDataParallelKwargs):
                handler.gradient_as_bucket_view = self.glue
        return args

    def _load_optimizer_and_scheduler(self, checkpoint):
        if not (self.glue and checkpoint and self.args.world_size > 1 and self.args.device.type == "cpu"):
            return super()._load_optimizer_and_scheduler(checkpoint)
        self.optimizer.load_state_dict(torch.load(os.path.join(checkpoint, "optimizer.pt"), map_location="cpu",
                                                  weights_only=True))
        self.lr_scheduler.load_state_dict(torch.load(os.path.join(checkpoint, "scheduler.pt"), weights_only=True))

    def _prepare_input(self, data):
        if self.glue and isinstance(data, torch.Tensor) and data.device.type == "cpu" and data.is_pinned():
            return data.to(self.args.device, non_blocking=True)
        return super()._prepare_input(data)

    def _prepare_inputs(self, inputs):
        labels = inputs.get("labels")
        if self.answer_only and labels is not None and labels.device.type == "cpu":
            positions = answer_positions(labels)
            inputs = {**inputs, ANSWER_POSITIONS: positions.pin_memory() if labels.is_pinned() else positions}
        return super()._prepare_inputs(inputs)

    def floating_point_ops(self, inputs) -> int:
        if not self.glue:
            return super().floating_point_ops(inputs)
        if self._flops_per_token is None:
            self._flops_per_token = super().floating_point_ops({"input_ids": torch.zeros(1)})
        return self._flops_per_token * inputs["input_ids"].numel() if "input_ids" in inputs else 0
