"""Recomputation chosen per micro-batch: each decoder layer's activations are kept or recomputed in the backward
by the size of the batch at hand (its rows x its longest row), the least recomputation whose estimated peak fits
the plan's budget (common.model.plan.Plan.recompute_limits).

A batch of short samples trains at full speed while the rare batch of long ones recomputes and still fits, where one
level for the run must be the longest batch's. transformers' GradientCheckpointingLayer reads its
`gradient_checkpointing` flag at each call, so a level is a set of flags; compiled layers are unaffected (the flag
is read outside the compiled region). The vision tower recomputes only when it is tuned (--tune-vision): frozen and
without input gradients, it keeps nothing for the backward.
"""
from __future__ import annotations

from collections import Counter


class Recompute:
    def __init__(self, plan, model, tune_vision: bool):
        from transformers.modeling_layers import GradientCheckpointingLayer
        self.plan, self.every, self.steps = plan, None, Counter()
        self.decoder = []
        for name, m in model.named_modules():
            if not isinstance(m, GradientCheckpointingLayer):
                continue
            if ".visual." in name or name.startswith("visual."):
                m.gradient_checkpointing = tune_vision
            else:
                self.decoder.append(m)

    def for_batch(self, input_ids) -> int:
        """Set the layers' flags for a batch of `input_ids` (rows x padded length); returns the level."""
        every = self.plan.every_for(input_ids.numel())
        if every != self.every:
            for i, layer in enumerate(self.decoder):
                layer.gradient_checkpointing = bool(every) and i % every == 0
            self.every = every
        self.steps[every] += 1
        return every

    def summary(self) -> dict:
        """Micro-batches by level (0: none, n: every n-th layer), for stats.json."""
        return {str(every): n for every, n in sorted(self.steps.items())}
