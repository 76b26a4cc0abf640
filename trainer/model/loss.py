"""The causal-LM loss as a sum over target tokens (the loop normalizes by the global count)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from data.templates import IGNORE_INDEX


def token_loss_sum(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Sum (not mean) of next-token cross-entropy over positions whose shifted label is kept."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    return F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


def count_target_tokens(labels: torch.Tensor) -> torch.Tensor:
    """Tokens that carry loss in a micro-batch (after the causal shift)."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()
