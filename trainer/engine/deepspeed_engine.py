"""DeepSpeed ZeRO 1/2/3 (optionally with CPU offload) behind the loop's `Engine` protocol.

How the protocol maps onto DeepSpeed:

- Loss: the loop already divides by the global target-token count and multiplies by world size
  (see `trainer.engine`); ZeRO averages gradients over ranks exactly like DDP. DeepSpeed's
  `backward` would also divide by gradient_accumulation_steps, so it is called with
  `scale_wrt_gas=False`.
- Accumulation boundary: the loop, not DeepSpeed's micro-step counter, decides which micro-step
  ends an optimizer step; it is set explicitly before every micro-step.
- Norm/clipping: DeepSpeed clips inside its own `step()` (`gradient_clipping`, filled from
  `train.max_grad_norm`) and only reports the norm afterwards, but the loop needs the pre-clip
  norm BEFORE stepping, to decide whether to skip. `clip_grad_norm` therefore asks the ZeRO
  optimizer for the same all-reduced norm of its gradient partitions that `step()` computes
  (one extra norm pass + a scalar all-reduce per optimizer step).
- Precision (trainer/engine/precision.py): the trainable weights reach DeepSpeed in fp32; under bf16
  DeepSpeed runs a bf16 working copy of them while its optimizer keeps the fp32 masters, and
  gradients are accumulated in fp32 (`data_types.grad_accum_dtype`). ZeRO-1 then runs on
  DeepSpeed's `BF16_Optimizer` (it keeps whole fp32 gradients on every rank and partitions the
  optimizer state), whose norm is read differently from the ZeRO optimizers'.
- Skip: the ZeRO optimizer's `step()` is still run so that it clears its gradient buffers and
  partition bookkeeping the way it does after any step, but with the wrapped torch optimizer's
  update disabled: the fp32 partitions and the Adam moments do not change, so the parameters it
  copies back and all-gathers are the unchanged ones, on every rank.
- LR schedule: our LambdaLR on the client AdamW, stepped here after every optimizer step (skipped
  or not). It is not handed to DeepSpeed, which would not advance it on a step it skips itself.
- Optimizer offload (zero_optimization.offload_optimizer): the client optimizer is DeepSpeed's
  CPU Adam in AdamW mode, on the same groups and settings (`build_client_optimizer`); torch's
  AdamW where its C++ op cannot be built, with the reason logged.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from trainer.config import Derived, OptimConfig, RunConfig
from trainer.dist import DistContext, barrier, gather_objects
from trainer.engine.deepspeed_config import (
    offloads_optimizer,
    validate_deepspeed_config,
    zero_stage,
)
from trainer.engine.deepspeed_ops import load_comm_op, load_cpu_adam_op
from trainer.engine.precision import PrecisionPolicy, cast_trainable_params, resolve_run_precision
from trainer.model.attention_inputs import (
    attention_mode,
    choose_packed_attention,
    describe_attention_inputs,
    model_inputs,
)
from trainer.model.loss import DEFAULT_CHUNK_TOKENS, build_train_loss
from trainer.model.methods import load_model
from trainer.optim import build_optimizer, build_scheduler, param_groups

TAG = "ds"  # the sub-directory DeepSpeed writes its shards into
UNIVERSAL_TAG = f"{TAG}_universal"
log = logging.getLogger("fttrain")


class DeepSpeedResumeError(RuntimeError):
    """A DeepSpeed checkpoint cannot be loaded into this run."""


@contextlib.contextmanager
def _updates_disabled(optimizer: torch.optim.Optimizer) -> Iterator[None]:
    """Make `optimizer.step()` a no-op for the duration (an instance attribute shadows the
    method, including any wrapper an LR scheduler installed; both are restored)."""
    had_own = "step" in optimizer.__dict__
    own = optimizer.__dict__.get("step")
    optimizer.step = lambda *args, **kwargs: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        if had_own:
            optimizer.step = own  # type: ignore[method-assign]
        else:
            del optimizer.step


def _mark_bf16_optimizer_checkpoints(optimizer: Any) -> None:
    """DeepSpeed's BF16_Optimizer (ZeRO-1 + bf16 + fp32 accumulation) leaves the ZeRO stage out
    of its checkpoint shards, and zero_to_fp32 (`launch.export`) then refuses them as "not a zero
    checkpoint", although they are laid out as ZeRO-1's (flat fp32 partitions, and DeepSpeed's
    universal conversion already reads a shard without a stage as stage 1). Its state dict gets
    the stage written in; loading ignores the extra key."""
    from deepspeed.checkpoint.constants import ZERO_STAGE
    from deepspeed.runtime.bf16_optimizer import BF16_Optimizer

    if not isinstance(optimizer, BF16_Optimizer):
        return
    state_dict = optimizer.state_dict

    def with_stage() -> dict[str, Any]:
        return {**state_dict(), ZERO_STAGE: 1}

    optimizer.state_dict = with_stage  # type: ignore[method-assign]


def _save_trainable_module_state_only(ds_engine: Any, keep: set[str]) -> None:
    """Make the module state DeepSpeed writes into a checkpoint hold `keep` only (the trainable
    parameters and the buffers). Its `exclude_frozen_parameters` drops frozen *parameters*, but
    not the entries a layer writes beside them: a bitsandbytes `Linear4bit` adds its
    quantization state (absmax, code maps, nested absmax) for every 4-bit weight, ~1/30 of the
    4-bit base and, under ZeRO-3, once per rank. Resume loads the base (and quantizes it) from
    `model.name_or_path` again, deterministically, and loads the module state non-strictly
    (`load_state`)."""
    module_state_dict = ds_engine.module_state_dict

    def trainable_state_dict(*args: Any, **kwargs: Any) -> dict[str, Any]:
        state = module_state_dict(*args, **kwargs)
        for name in [n for n in state if n not in keep]:
            del state[name]
        return state

    ds_engine.module_state_dict = trainable_state_dict


def _ensure_process_group(ctx: DistContext) -> None:
    """Make DeepSpeed's communication layer use our process group. `init_distributed` already
    started it under torchrun (DeepSpeed then just wraps it); a run launched without torchrun
    has none, and DeepSpeed needs one even for one process, so a one-rank group starts here.

    On a CPU, DeepSpeed's communication layer JIT-builds a C++ op when it starts; it is loaded
    first by `load_comm_op` (venv-owned build dir, a message while it builds, a one-line error
    instead of an endless wait on a lock left by a killed build)."""
    import deepspeed

    load_comm_op()
    if not dist.is_initialized():
        for name, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(name, value)
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", "29531")
    deepspeed.init_distributed(
        dist_backend="nccl" if ctx.device.type == "cuda" else "gloo", auto_mpi_discovery=False
    )


class DeepSpeedEngine:
    """A model trained by a DeepSpeed engine with our client AdamW and LambdaLR."""

    supports_async_save = False  # DeepSpeed writes its own shard files, synchronously

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        ctx: DistContext,
        ds_config: dict[str, Any],
        policy: PrecisionPolicy | None = None,
        *,
        export_trainable_only: bool = False,
        loss_impl: str = "auto",
        loss_chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        packed_attention: str | None = "mask",
    ):
        """`export_trainable_only`: the run's model is an adapter (LoRA/QLoRA), so
        `full_state_dict_for_export` returns the trainable parameters only (see there).
        `loss_impl`, `loss_chunk_tokens`: train.loss_impl / train.loss_chunk_tokens."""
        import deepspeed

        _ensure_process_group(ctx)
        self.ctx = ctx
        self.scheduler = scheduler
        self.ds_config = ds_config
        self.policy = policy
        self.stage = zero_stage(ds_config)
        if self.stage not in (1, 2, 3):
            raise ValueError(
                f"deepspeed zero_optimization.stage={self.stage}: only stages 1-3 are supported "
                "(use train.backend=ddp for plain data parallel)"
            )
        self.max_grad_norm = float(ds_config.get("gradient_clipping", 0.0))
        # Only requires_grad parameters are optimized, clipped and saved (LoRA: the adapters).
        self.trainable_names = {n for n, p in model.named_parameters() if p.requires_grad}
        self.has_frozen = any(not p.requires_grad for p in model.parameters())
        self.ds, self.optimizer, _, _ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config,
            dist_init_required=False,
        )
        # The torch AdamW that ZeRO drives on its fp32 partitions (its param groups are the ones
        # our LambdaLR edits, so the schedule reaches the partitions).
        self.client_optimizer = optimizer
        self.export_trainable_only = export_trainable_only
        _mark_bf16_optimizer_checkpoints(self.ds.optimizer)
        if self.has_frozen:
            buffers = {n for n, _ in model.named_buffers()}
            _save_trainable_module_state_only(self.ds, self.trainable_names | buffers)
        # After initialize: under bf16 the module is DeepSpeed's bf16 working copy. The chunked
        # loss runs inside the head's forward, so under ZeRO-3 the head's own hooks gather its
        # weight for it (and again before its backward) and release it after.
        self.loss = build_train_loss(self.ds.module, loss_impl, loss_chunk_tokens, ctx.device)
        compute = policy.compute_dtype if policy is not None else torch.float32
        why = choose_packed_attention(self.ds.module, packed_attention, ctx.device, compute)
        self._attention = attention_mode(self.ds.module)
        if ctx.is_main:
            log.info("%s", self.loss.describe())
            log.info("%s (%s)", describe_attention_inputs(self._attention), why)

    # -- the training step --------------------------------------------------------------------

    def _model_inputs(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return model_inputs(batch, self.ctx.device, self._attention)

    def _run_model(self, batch: dict[str, torch.Tensor]) -> Any:
        # No autocast: under bf16 DeepSpeed holds the module in bf16 itself (fp32 masters in the
        # optimizer); under fp32 there is nothing to cast.
        return self.ds(**self._model_inputs(batch), use_cache=False)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._run_model(batch).logits

    def forward_backward(
        self, batch: dict[str, torch.Tensor], loss_scale: torch.Tensor, is_last_micro_step: bool
    ) -> torch.Tensor:
        # ZeRO reduces (stage 2/3: reduce-scatters) as it goes; the boundary tells it when the
        # accumulated partitions are final (and, under offload, when to move them to the CPU).
        self.ds.set_gradient_accumulation_boundary(is_last_micro_step)
        targets = batch["targets"]  # on the CPU: the loss moves what it needs (see TrainLoss)
        loss_sum = self.loss(lambda: self._run_model(batch), targets)
        # scale_wrt_gas=False: loss_scale already normalizes over all micro-steps and ranks.
        self.ds.backward(loss_sum * loss_scale.to(loss_sum.device), scale_wrt_gas=False)
        return loss_sum.detach()

    def clip_grad_norm(self, max_norm: float | None) -> torch.Tensor:
        if (max_norm or 0.0) != self.max_grad_norm:
            raise ValueError(
                f"clip_grad_norm(max_norm={max_norm}) but deepspeed gradient_clipping="
                f"{self.max_grad_norm}: the DeepSpeed config must be built from this run config"
            )
        from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
        from deepspeed.runtime.utils import combine_grad_norm_groups, get_global_norm_of_tensors

        opt = self.ds.optimizer
        # The all-reduced L2 norm of the (loss-scaled) gradient partitions: what ZeRO's step()
        # computes and clips with. Its helpers report NaN/inf as -1, which combine turns into inf.
        if self.stage == 3:
            norm = combine_grad_norm_groups(opt._get_norm_groups())
        elif isinstance(opt, BF16_Optimizer):
            # ZeRO-1 + bf16 + fp32 accumulation: the fp32 gradients are already all-reduced and
            # whole on every rank, so their norm is the global one (what its step() computes).
            grads, _ = opt.get_grads_for_norm()
            norm = get_global_norm_of_tensors(grads, mpu=opt.mpu, norm_type=opt.norm_type)
            norm = torch.where(norm < 0, torch.full_like(norm, float("inf")), norm)  # -1: NaN/inf
        else:
            norm = opt.scaled_global_norm()
        # Clipping itself happens inside optimizer_step (DeepSpeed's gradient_clipping).
        return (norm / getattr(opt, "loss_scale", 1.0)).detach().float()

    def optimizer_step(self, skip: bool) -> None:
        guard = _updates_disabled(self.client_optimizer) if skip else contextlib.nullcontext()
        with guard:
            self.ds.step()
        # The schedule follows optimizer steps taken by the loop, skipped or not (as DDPEngine).
        self.scheduler.step()

    def current_lr(self) -> float:
        return self.scheduler.get_last_lr()[0]

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def unwrapped_model(self) -> nn.Module:
        # Under ZeRO-3 its parameters are partitioned; forwards still work (DeepSpeed's hooks
        # live on the module) but are collective: every rank must run the same forwards.
        return self.ds.module

    # -- checkpoints --------------------------------------------------------------------------

    def save_state(self, directory: Path) -> None:
        """Collective: DeepSpeed's sharded format under `directory/ds/` (one optimizer shard per
        rank, model states by rank 0, or per rank under ZeRO-3), plus the LR schedule."""
        from deepspeed.checkpoint import constants as ckpt

        # The marker DeepSpeed's universal conversion requires, so that a resume at another
        # world size (load_state) can convert this checkpoint.
        universal = {ckpt.UNIVERSAL_CHECKPOINT_VERSION_KEY: ckpt.UNIVERSAL_CHECKPOINT_VERSION_VALUE}
        self.ds.save_checkpoint(
            str(directory),
            tag=TAG,
            client_state={
                "scheduler": self.scheduler.state_dict(),
                ckpt.UNIVERSAL_CHECKPOINT_INFO: universal,
            },
            save_latest=False,
            exclude_frozen_parameters=self.has_frozen,
        )

    def load_state(self, directory: Path) -> None:
        """Collective: restore `save_state`'s output. If it was written at another world size,
        it is first converted once to DeepSpeed's universal format (`directory/ds_universal/`,
        written by rank 0), which any world size can load."""
        directory = Path(directory)
        saved_world = _saved_world_size(directory / TAG)
        if saved_world == 0:
            raise DeepSpeedResumeError(f"{directory / TAG}: no DeepSpeed optimizer shards found")
        tag = TAG
        if saved_world != self.ctx.world_size:
            if self.ctx.is_main and not (directory / UNIVERSAL_TAG).is_dir():
                convert_to_universal(directory)
            barrier(self.ctx)
            tag = UNIVERSAL_TAG
            # DeepSpeed reads this switch from its config at load time; set it for this load.
            self.ds._config.load_universal_checkpoint = True
        try:
            path, client_state = self.ds.load_checkpoint(
                str(directory),
                tag=tag,
                load_optimizer_states=True,
                load_lr_scheduler_states=False,
                load_module_strict=not self.has_frozen,
            )
        finally:
            self.ds._config.load_universal_checkpoint = False
        if path is None:
            raise DeepSpeedResumeError(f"{directory / tag}: DeepSpeed could not load it")
        if not client_state or "scheduler" not in client_state:
            raise DeepSpeedResumeError(f"{directory / tag}: no LR-schedule state in it")
        self.scheduler.load_state_dict(client_state["scheduler"])

    def full_state_dict_for_export(self) -> dict[str, torch.Tensor] | None:
        """Collective under ZeRO-3 (a gather of every partition); rank 0 gets the full state
        dict on the CPU, other ranks None. An adapter run (`export_trainable_only`) gets the
        trainable parameters only (what peft's save_pretrained keeps), see `_trainable_fp32`."""
        if self.export_trainable_only:
            return self._trainable_fp32()
        if self.stage == 3:
            state = self.ds._zero3_consolidated_16bit_state_dict()
        else:
            # ZeRO 1/2 keep full parameters on every rank (updated by all-gather each step).
            state = self.ds.module.state_dict() if self.ctx.is_main else None
        if not self.ctx.is_main:
            return None
        copies: dict[tuple, torch.Tensor] = {}
        out = {}
        for name, tensor in state.items():
            # Tied weights (lm_head = embed_tokens) are one tensor under two names: copy it once,
            # so that save_pretrained still sees the tie and writes the weight once, not twice.
            storage = tensor.untyped_storage().data_ptr()
            key = (storage, tensor.storage_offset(), tensor.shape, tensor.stride())
            if key not in copies:
                copies[key] = tensor.detach().cpu().clone()
            out[name] = copies[key]
        return out

    def _trainable_fp32(self) -> dict[str, torch.Tensor] | None:
        """The trainable parameters from the optimizer's fp32 masters, whole, on rank 0.
        Collective under every stage (each is assembled from the ranks' partitions, in the same
        order on every rank). Gathering the whole model as for a full export would put a copy of
        the frozen base on rank 0's CPU (under ZeRO-3: the base that was sharded so that no rank
        holds it) to write an adapter of a few MB; the masters also keep a bf16 run's adapter in
        fp32, as the DDP backend writes it."""
        from deepspeed.utils import safe_get_full_fp32_param

        out = {}
        for name, param in self.ds.module.named_parameters():
            if name not in self.trainable_names:
                continue
            full = safe_get_full_fp32_param(param)
            if full is None:
                raise RuntimeError(f"deepspeed: no fp32 master for trainable parameter {name}")
            if self.ctx.is_main:
                out[name] = full.detach().cpu().clone()
        return out if self.ctx.is_main else None


def _saved_world_size(tag_dir: Path) -> int:
    """Ranks that wrote the checkpoint: one optimizer shard per data-parallel rank."""
    return len(glob.glob(str(tag_dir / "*_optim_states.pt")))


def convert_to_universal(directory: Path) -> Path:
    """Convert `directory/ds` (DeepSpeed ZeRO shards) into `directory/ds_universal`, loadable at
    any world size. Single process, CPU only; also usable offline on a finished checkpoint."""
    from argparse import Namespace

    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    out = Path(directory) / UNIVERSAL_TAG
    args = Namespace(
        input_folder=str(Path(directory) / TAG),
        output_folder=str(out),
        num_extract_workers=1,
        num_merge_workers=1,
        keep_temp_folder=False,
        strict=True,
        inject_missing_state=False,
    )
    ds_to_universal(args)
    return out


def build_deepspeed_engine(cfg: RunConfig, derived: Derived, ctx: DistContext) -> DeepSpeedEngine:
    """Model -> optimizer -> schedule -> DeepSpeed, with the DeepSpeed config resolved first
    (under ZeRO-3 the model is built already partitioned)."""
    assert derived.total_steps is not None and derived.warmup_steps is not None
    policy = resolve_run_precision(cfg, ctx.device.type)
    ds_config = validate_deepspeed_config(cfg, derived, ctx.device.type)
    assert ds_config is not None
    if ctx.is_main:
        policy.log()
    _ensure_process_group(ctx)  # zero.Init inside build_model partitions over the group
    model = load_model(cfg, ctx.device, deepspeed_config=ds_config)
    if zero_stage(ds_config) == 3:
        _reentrant_checkpointing_with_frozen_params(model, cfg)
    else:
        # fp32 masters: DeepSpeed builds its fp32 partitions from the module it is given (under
        # bf16 after casting it to its bf16 working copy). ZeRO-3's zero.Init already built the
        # partitions in the configured dtype.
        cast_trainable_params(model, policy.param_dtype)
    # Under ZeRO-3 parameters are partitioned placeholders; split_decay_groups reads ds_shape.
    optimizer = build_client_optimizer(model, cfg.optim, ds_config, ctx)
    # DeepSpeed cannot flatten an empty group (e.g. LoRA with no trainable 1-D params).
    optimizer.param_groups = [g for g in optimizer.param_groups if g["params"]]
    scheduler = build_scheduler(optimizer, cfg.schedule, derived.total_steps, derived.warmup_steps)
    return DeepSpeedEngine(
        model,
        optimizer,
        scheduler,
        ctx,
        ds_config,
        policy,
        export_trainable_only=cfg.method != "full",
        loss_impl=cfg.train.loss_impl,
        loss_chunk_tokens=cfg.train.loss_chunk_tokens,
        packed_attention=cfg.train.packed_attention if cfg.data.packing else None,
    )


def build_client_optimizer(
    model: nn.Module, cfg: OptimConfig, ds_config: dict[str, Any], ctx: DistContext
) -> torch.optim.Optimizer:
    """The optimizer ZeRO drives on its fp32 partitions: torch's AdamW (`build_optimizer`), or,
    with the optimizer offloaded to the CPU, DeepSpeed's CPU Adam in AdamW mode on the same
    groups and settings: its vectorized C++ step is 5x faster than torch's foreach AdamW on
    the CPU (20M parameters, 2 cores: 0.03 s vs 0.15 s), where an offloaded run spends much of
    its step. Its op is JIT-compiled (a C++ compiler, a minute once); if it cannot be loaded on
    some rank, every rank takes torch's AdamW (one optimizer for the whole run, one checkpoint
    format; optim.fused=on makes it as fast) and rank 0 logs why. Collective when distributed."""
    if not offloads_optimizer(ds_config.get("zero_optimization", {})):
        return build_optimizer(model, cfg)
    try:
        problem = None if load_cpu_adam_op() else "DeepSpeed has no CPU Adam op here"
    except Exception as e:  # noqa: BLE001 - any failure to build or load it falls back
        problem = " ".join(str(e).split()) or type(e).__name__  # one line
    problems = [p for p in gather_objects(ctx, problem) if p]
    if problems:
        if ctx.is_main:
            log.warning(
                "optimizer offload: torch's AdamW instead of DeepSpeed's CPU Adam (%s)",
                problems[0],
            )
        return build_optimizer(model, cfg, device_type="cpu")  # it steps the CPU partitions
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    optimizer = DeepSpeedCPUAdam(
        param_groups(model, cfg),
        lr=cfg.lr,
        betas=cfg.betas,
        eps=cfg.eps,
        weight_decay=cfg.weight_decay,
        adamw_mode=True,
    )
    optimizer.register_step_pre_hook(_fit_state_from_torch_adamw)
    if ctx.is_main:
        log.info("optimizer offload: DeepSpeed's CPU Adam (AdamW mode)")
    return optimizer


def _fit_state_from_torch_adamw(optimizer: torch.optim.Optimizer, *_: Any) -> None:
    """Before each CPU Adam step: state restored from a checkpoint written with torch's AdamW
    (offload before CPU Adam was used, or the fallback) lacks CPU Adam's group keys
    (`bias_correction`) and holds each step count as a float tensor, which CPU Adam's C++
    update refuses. A step hook, not a load hook: ZeRO restores optimizer state by several
    paths, some of which write the state directly."""
    for group in optimizer.param_groups:
        for key, value in optimizer.defaults.items():
            group.setdefault(key, value)
    for state in optimizer.state.values():
        step = state.get("step")
        if torch.is_tensor(step):
            state["step"] = int(step.item())  # a CPU tensor (offload): no device sync


def _reentrant_checkpointing_with_frozen_params(model: nn.Module, cfg: RunConfig) -> None:
    """Under ZeRO-3, gradient checkpointing of a model with frozen parameters (LoRA/QLoRA bases,
    `freeze:`) recomputes with torch's reentrant variant, as peers do (trl #4951, #6356).
    The non-reentrant one (what build_model sets, and DDP keeps) validates the tensors its
    recompute saves, and keeps frozen weights by reference, which ZeRO-3 re-partitions in place
    to shape [0]: `CheckpointError: Recomputed values ... have different metadata`
    (transformers #47254, DeepSpeed #4332; DeepSpeed 0.19.8 carries a fix, #8148, that CPU runs
    here cannot show holds on GPUs). The reentrant recompute needs an input that requires grad:
    the input embeddings' output is made to (peft's adapters already asked for it)."""
    if not cfg.model.gradient_checkpointing or all(p.requires_grad for p in model.parameters()):
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # peft wrapper
    base.activation_checkpointing_enable({"use_reentrant": True})
    if not getattr(base, "_require_grads_hooks", None):
        base.enable_input_require_grads()
    log.info("gradient checkpointing: reentrant (ZeRO-3 with frozen parameters)")


def load_zero_weights_for_export(engine_dir: Path, model: nn.Module) -> None:
    """Put a ZeRO checkpoint's fp32 weights (written by `save_state`) into a plain `model`, in
    one process: DeepSpeed's zero_to_fp32 merges the per-rank partitions on the CPU."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    state = get_fp32_state_dict_from_zero_checkpoint(str(engine_dir), tag=TAG)
    missing, unexpected = model.load_state_dict(state, strict=False)
    # Buffers (e.g. rotary tables) are not in the checkpoint; the trainable parameters must all
    # be there. Frozen ones are not (a LoRA/QLoRA checkpoint holds the adapters only): `model`
    # has them from model.name_or_path, as the run had.
    params = {n for n, p in model.named_parameters() if p.requires_grad}
    lost = [n for n in missing if n in params]
    if lost or unexpected:
        raise RuntimeError(
            f"{engine_dir}: ZeRO checkpoint does not fit the model (missing {lost[:3]}, "
            f"unexpected {list(unexpected)[:3]})"
        )
