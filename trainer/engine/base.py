"""The engine: everything the loop does to the model, behind one interface.

The loop is written once against `Engine`; a backend (DDP here, DeepSpeed later) differs only in
how it wraps the model and implements these methods. peft-wrapped models slot in unchanged: only
`requires_grad` parameters are optimized, clipped and saved as trainable state.

Loss normalization: the loop computes, before the first micro-step of an optimizer step, the
number of target tokens over ALL micro-steps and ALL ranks (`num_global_tokens`). Each micro-step
backpropagates `sum_of_token_losses * world_size / num_global_tokens`; the backends average
gradients over ranks, so the accumulated gradient equals the gradient of the mean token loss over
the whole global batch -- not a mean of per-micro-batch means.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from trainer.dist import DistContext
from trainer.engine.precision import (
    PrecisionPolicy,
    autocast_dtype,
)
from trainer.model.load import full_shape

GRAD_SCALER_FILE = "grad_scaler.json"  # fp16 only: the dynamic loss scale, saved with the state


def model_fingerprint(model: nn.Module) -> dict[str, list[int]]:
    """Names and shapes of the trainable parameters: what a checkpoint must match to load.
    A tied weight (lm_head.weight = model.embed_tokens.weight) is listed once, under its first
    name, as named_parameters() gives it, so a tied and an untied model differ here: their
    checkpoints hold the same names, but loading one into the other would be wrong."""
    return {n: list(full_shape(p)) for n, p in model.named_parameters() if p.requires_grad}


class Engine(Protocol):
    """What the training loop needs from a backend."""

    ctx: DistContext
    # Whether `save_state_async` exists: stage now, write in the background (CheckpointManager).
    supports_async_save: bool

    def forward_backward(
        self, batch: dict[str, torch.Tensor], loss_scale: torch.Tensor, is_last_micro_step: bool
    ) -> torch.Tensor:
        """Forward + backward of one micro-batch; returns the detached sum of token losses.
        Gradients are synchronized across ranks only when `is_last_micro_step`."""
        ...

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        """Global gradient norm BEFORE clipping (a tensor, identical on all ranks); clips in place
        when `max_norm` is set."""
        ...

    def optimizer_step(self, skip: bool) -> None:
        """Apply the update (unless `skip`), advance the LR schedule, zero the gradients."""
        ...

    def current_lr(self) -> float: ...
    def train(self) -> None: ...
    def eval(self) -> None: ...
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...
    def unwrapped_model(self) -> nn.Module: ...

    def save_state(self, directory: Path) -> None:
        """Collective: every rank writes its own shard of model (trainable parameters only),
        optimizer and LR-schedule state into `directory` (which exists on every rank). Atomic
        publishing, manifests and data/RNG state are the checkpoint manager's job, not this."""
        ...

    def load_state(self, directory: Path) -> None:
        """Collective: restore what `save_state` wrote, resharding to this world size."""
        ...

    def full_state_dict_for_export(self) -> dict[str, torch.Tensor] | None:
        """The full (gathered) model state dict on rank 0, None on other ranks. A LoRA/QLoRA
        run's engine may return the trainable (adapter) entries only: that is all its model
        directory holds, and under ZeRO-3 it spares gathering the frozen base onto rank 0."""
        ...


def autocast_context(
    ctx: DistContext, precision: str | PrecisionPolicy
) -> contextlib.AbstractContextManager:
    """torch.autocast in the compute dtype of `precision` (a `train.precision` value or the
    resolved policy), or a no-op: fp32, bf16-pure, and `auto` on CPU (see trainer.engine.precision)."""
    if isinstance(precision, PrecisionPolicy):
        dtype = precision.autocast_dtype
    else:
        dtype = autocast_dtype(precision, ctx.device.type)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=dtype)
