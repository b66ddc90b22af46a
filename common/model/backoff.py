"""Out of GPU memory in training: a smaller micro-batch, the same learning.

When the plan chose the micro-batch, a step that runs out of memory makes training start again from its newest
complete checkpoint (or from its start, the LoRA weights put back) at half the micro-batch and twice the
accumulation: the global batch, hence what is learned, stays the same (the loss is normalized over the whole
global batch's answer tokens). accelerate's `find_executable_batch_size` runs the retries, with a halving in place
of its 10% steps, down to a micro-batch of 1. With a micro-batch the user gave, or under torchrun (the ranks would
have to shrink together), running out of memory ends the stage with one line instead; checkpoints stay whole.
"""
from __future__ import annotations

import logging
from pathlib import Path

from common.errors import PipelineError
from common.model.checkpoints import latest_complete_checkpoint
from common.model.plan import LEVELS, Plan, with_micro_batch

log = logging.getLogger("train")


class OutOfGpuMemory(PipelineError, RuntimeError):
    pass


def out_of_memory_message(plan: Plan, why: str) -> str:
    recomputed = "by the batch's size" if plan.recompute_limits else LEVELS[plan.checkpoint_every]
    return (f"stage 6 ran out of GPU memory at micro-batch {plan.micro_batch} x {plan.grad_accum} accumulation "
            f"({plan.budget_gib} GiB budget, recomputing {recomputed}){why}: "
            "pass a smaller --batch-size, --gradient-checkpointing on, --base-precision 4bit, or a lower "
            "--max-length in stage 4; finished checkpoints are kept")


def train_with_backoff(trainer, plan: Plan, can_shrink: bool, resume_from: Path | None, out: Path):
    """(the Trainer's result, the plan it finished with)."""
    from accelerate.utils import find_executable_batch_size
    start = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
    state = {"plan": plan, "attempts": 0}

    def shrink() -> int:
        current = state["plan"]
        per_rank = current.micro_batch * current.grad_accum
        smaller = next((m for m in range(current.micro_batch - 1, 0, -1) if per_rank % m == 0
                        and m <= current.micro_batch // 2), None)
        if not can_shrink or smaller is None:
            raise OutOfGpuMemory(out_of_memory_message(current, "" if can_shrink else ", with the micro-batch "
                                                       "given or under torchrun")) from None
        state["plan"] = with_micro_batch(current, smaller)
        log.warning("out of GPU memory at micro-batch %d: training again at %d x %d accumulation (the same global "
                    "batch of %d)", current.micro_batch, smaller, state["plan"].grad_accum, per_rank)
        return smaller

    @find_executable_batch_size(starting_batch_size=plan.micro_batch, reduce_batch_size_fn=shrink)
    def attempt(micro_batch: int):
        resume = resume_from
        if state["attempts"]:
            trainer.restart_at(micro_batch, state["plan"].grad_accum, start)
            if trainer.grouping is not None:
                trainer.grouping.batch_size = micro_batch
            resume = latest_complete_checkpoint(out)
        state["attempts"] += 1
        if resume and trainer.head is not None:  # the Trainer restores the adapter; the price head is ours
            from common.model.head import load_head_weights
            load_head_weights(trainer.head, resume)
        return trainer.train(resume_from_checkpoint=str(resume) if resume else None)

    return attempt(), state["plan"]
