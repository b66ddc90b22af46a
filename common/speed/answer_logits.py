"""The language-model head and the loss only at the positions whose next token is learned.

A price answer is a handful of tokens; the head over the 151,936-word vocabulary at all ~600 positions of a
sample costs ~370 MB of float32 logits per sample for nothing. The loss here is the same sum over the same
(position, target) pairs as transformers' causal-LM loss, divided by the same count, so it matches the
full-logits loss (tested to float rounding), and with it batch 16 fits where 4 did.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.loss.loss_utils import ForCausalLMLoss

IGNORE = -100
ANSWER_POSITIONS = "answer_positions"  # batch key: set on the host before the batch moves, popped before the forward


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """Sequence positions (over the whole batch) whose next token carries a label: the logits the loss needs."""
    return (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(1)


def answer_only_loss(logits: torch.Tensor, labels: torch.Tensor, positions: torch.Tensor,
                     num_items_in_batch=None) -> torch.Tensor:
    """transformers' causal-LM loss for logits kept at `positions` only (logits[:, j] predicts the token after
    positions[j]): a mean over the learned tokens, or their sum over num_items_in_batch when given."""
    targets = F.pad(labels, (0, 1), value=IGNORE)[:, 1:][:, positions]
    return ForCausalLMLoss(logits, None, logits.shape[-1], shift_labels=targets, num_items_in_batch=num_items_in_batch)
