"""The DDP backend: DistributedDataParallel over the process group, DCP checkpoints."""

from __future__ import annotations

import contextlib
import json
import logging
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from trainer.checkpoint import dcp_io
from trainer.dist import DistContext
from trainer.engine.base import GRAD_SCALER_FILE, autocast_context
from trainer.engine.precision import (
    PrecisionPolicy,
    bf16_all_reduce_hook,
    cast_trainable_params,
    resolve_precision,
)
from trainer.model.attention_inputs import (
    attention_mode,
    choose_packed_attention,
    describe_attention_inputs,
    model_inputs,
)
from trainer.model.compile import compile_blocks as compile_model_blocks
from trainer.model.loss import DEFAULT_CHUNK_TOKENS, build_train_loss
from trainer.optim import is_fused

log = logging.getLogger("fttrain")


class DDPEngine:
    """Data parallel over `ctx` (DistributedDataParallel), or a plain module at world size 1.

    Precision (`trainer.engine.precision`): the trainable parameters are cast to the policy's master
    dtype (fp32 unless bf16-pure) here, before DDP builds its buckets and before the optimizer
    has state; forwards run under autocast in the compute dtype; fp16 adds a GradScaler whose
    overflow shows as a non-finite gradient norm, so the loop skips that step (and the scale
    backs off)."""

    supports_async_save = True

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        ctx: DistContext,
        precision: str | PrecisionPolicy = "auto",
        loss_impl: str = "auto",
        loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        grad_reduce_dtype: str = "fp32",
        compile_blocks: bool = False,
        packed_attention: str | None = "mask",
    ):
        """`loss_impl`, `loss_chunk_tokens`: train.loss_impl / train.loss_chunk_tokens (see
        trainer.model.loss.build_train_loss). `grad_reduce_dtype`: train.grad_reduce_dtype.
        `compile_blocks`: train.compile (see trainer.model.compile.compile_blocks).
        `packed_attention`: train.packed_attention (see trainer.model.varlen)."""
        self.ctx = ctx
        self.module = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        if isinstance(precision, str):
            loaded = next((p.dtype for p in model.parameters() if p.requires_grad), torch.float32)
            precision = resolve_precision(
                precision, str(loaded).removeprefix("torch."), ctx.device.type, "ddp"
            )
        self.policy = precision
        if ctx.is_main:
            self.policy.log()
            log.info("optimizer: AdamW, %s", "fused" if is_fused(optimizer) else "foreach")
        cast_trainable_params(model, self.policy.param_dtype)
        self.scaler = torch.amp.GradScaler(ctx.device.type) if self.policy.loss_scaling else None
        if ctx.distributed:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            # gradient_as_bucket_view: the gradients are views into DDP's all-reduce buckets,
            # so they take no memory of their own and are not copied out of the buckets after
            # each all-reduce. zero_grad(set_to_none=True) is fine with it (DDP re-views them on
            # the next backward); nothing may assign a new tensor to a `.grad`.
            self.model: nn.Module = DDP(model, device_ids=device_ids, gradient_as_bucket_view=True)
            if grad_reduce_dtype == "bf16":
                # Half the bytes on the wire; every averaged gradient is rounded to bf16.
                self.model.register_comm_hook(None, bf16_all_reduce_hook)
        else:
            self.model = model
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.loss = build_train_loss(model, loss_impl, loss_chunk_tokens, ctx.device)
        why = choose_packed_attention(
            model, packed_attention, ctx.device, self.policy.compute_dtype
        )
        self._attention = attention_mode(model)
        if ctx.is_main:
            log.info("%s", self.loss.describe())
            log.info("%s (%s)", describe_attention_inputs(self._attention), why)
        if compile_blocks:
            # After build_train_loss: its probe is a no-grad forward, which would otherwise be
            # compiled too, for nothing. Each block is compiled in place (the module objects,
            # DDP's parameter hooks and the state-dict names stay as they are), so doing it
            # after DDP has wrapped the model changes nothing else.
            num_blocks = compile_model_blocks(model)
            if ctx.is_main:
                log.info("torch.compile: %d blocks (compiled on the first steps)", num_blocks)
        self._stager: dcp_io.ReusedStagingBuffers | None = None  # kept across async saves

    def _model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return model_inputs(batch, self.ctx.device, self._attention)

    def _run_model(self, batch: dict[str, torch.Tensor]) -> Any:
        # Through DDP's forward (when distributed): its reducer must see this forward.
        with autocast_context(self.ctx, self.policy):
            return self.model(**self._model_inputs(batch), use_cache=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._run_model(batch).logits

    def forward_backward(
        self, batch: dict[str, torch.Tensor], loss_scale: torch.Tensor, is_last_micro_step: bool
    ) -> torch.Tensor:
        sync = contextlib.nullcontext()
        if isinstance(self.model, DDP) and not is_last_micro_step:
            sync = self.model.no_sync()  # all-reduce gradients only once per optimizer step
        targets = batch["targets"]  # on the CPU: the loss moves what it needs (see TrainLoss)
        with sync:
            loss_sum = self.loss(lambda: self._run_model(batch), targets)
            loss = loss_sum * loss_scale
            if self.scaler is not None:
                loss = self.scaler.scale(loss)
            loss.backward()
        return loss_sum.detach()

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        if self.scaler is not None:
            # The norm, the clip and the step see the true gradients; an overflow (inf/NaN)
            # is recorded for scaler.update() and shows in the norm.
            self.scaler.unscale_(self.optimizer)
        # With max_norm=inf this only measures; the norm is the same on every rank because DDP
        # has already averaged the gradients.
        return torch.nn.utils.clip_grad_norm_(
            self.trainable, max_norm if max_norm is not None else float("inf"), foreach=True
        )

    @property
    def skips_on_device(self) -> bool:
        """Whether `optimizer_step` can take the skip decision as a device tensor: fused AdamW
        reads `found_inf` on the device (and undoes its step count), so the loop need not read
        the loss back before stepping. Not with fp16's GradScaler, which decides itself."""
        return self.scaler is None and is_fused(self.optimizer)

    def optimizer_step(self, skip: bool, found_inf: torch.Tensor | None = None) -> None:
        """Step (unless `skip`); `found_inf` (with `skips_on_device`): a 0/1 device tensor, 1 =
        leave the weights and the optimizer state as they are, decided without a host sync."""
        if found_inf is not None:
            assert self.skips_on_device and not skip
            # The attributes GradScaler uses to hand a fused optimizer its overflow flag.
            self.optimizer.grad_scale, self.optimizer.found_inf = None, found_inf.float()
            try:
                self.optimizer.step()
            finally:
                self.optimizer.grad_scale = self.optimizer.found_inf = None
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
            return
        if self.scaler is not None:
            if not skip:
                self.scaler.step(self.optimizer)
            # After an overflow (the loop saw a non-finite norm and skipped) the scale backs off;
            # the same on every rank, as the gradients it checked were all-reduced.
            self.scaler.update()
        elif not skip:
            self.optimizer.step()
        # The schedule follows optimizer steps taken by the loop, skipped or not, so that the LR
        # at step k is the same whatever happened before it.
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def current_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train(self) -> None:
        self.model.train()

    def eval(self) -> None:
        self.model.eval()

    def unwrapped_model(self) -> nn.Module:
        return self.module

    def save_state(self, directory: Path) -> None:
        dcp_io.save(self._state(), directory)
        self._save_small_state(directory)

    def save_state_async(self, directory: Path, process_group: Any) -> Future:
        """Stage now, write in the background (the checkpoint manager publishes when done)."""
        self._save_small_state(directory)
        if self._stager is None:
            self._stager = dcp_io.ReusedStagingBuffers()
        return dcp_io.async_save(self._state(), directory, process_group, self._stager)

    def load_state(self, directory: Path) -> None:
        dcp_io.load_into(self.module, self.optimizer, directory, trainable_only=self.trainable_only)
        sched = json.loads((directory / "scheduler.json").read_text())
        self.scheduler.load_state_dict(sched)
        scaler_file = directory / GRAD_SCALER_FILE
        if self.scaler is not None and scaler_file.is_file():
            # Absent when the checkpoint was written without fp16: the scaler starts fresh.
            self.scaler.load_state_dict(json.loads(scaler_file.read_text()))

    def full_state_dict_for_export(self) -> dict[str, torch.Tensor] | None:
        return self.module.state_dict() if self.ctx.is_main else None

    def _state(self) -> dict[str, Any]:
        return dcp_io.model_optim_state(self.module, self.optimizer, self.trainable_only)

    def _save_small_state(self, directory: Path) -> None:
        if self.ctx.is_main:
            # The LR schedule and the loss scale are a few numbers; JSON keeps the checkpoint
            # free of pickles. The scale is the same on every rank.
            (directory / "scheduler.json").write_text(json.dumps(self.scheduler.state_dict()))
            if self.scaler is not None:
                (directory / GRAD_SCALER_FILE).write_text(json.dumps(self.scaler.state_dict()))

    @property
    def trainable_only(self) -> bool:
        """Save only trainable parameters when some are frozen (LoRA/QLoRA)."""
        return len(self.trainable) < sum(1 for _ in self.module.parameters())
