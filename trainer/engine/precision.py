"""One precision policy per run, resolved once from (train.precision, model.dtype, device, backend).

Both backends read the same `PrecisionPolicy`; they differ only in how they honour it:

| train.precision | trainable weights, optimizer state | compute                    | grads summed in |
|-----------------|------------------------------------|----------------------------|-----------------|
| auto            | fp32                               | bf16 on a GPU, fp32 on CPU | fp32            |
| bf16            | fp32                               | bf16 (also on CPU)         | fp32            |
| bf16-pure       | bf16 (asked for; warned)           | bf16                       | bf16            |
| fp16 (ddp only) | fp32, loss scaled (GradScaler)     | fp16                       | fp32            |
| fp32            | fp32                               | fp32                       | fp32            |

`model.dtype` is only the dtype the checkpoint is read in: trainable weights are then kept in fp32
(the master copy) unless `bf16-pure` is asked for. In bf16, a weight of 0.02 has a spacing of
2^-13 ~ 1.2e-4, so the typical fine-tuning update of ~1e-5 rounds away entirely; fp32 keeps it.

- DDP: the trainable parameters are cast to fp32 in place and the forward runs under
  `torch.autocast(compute dtype)`; fp16 adds a `torch.amp.GradScaler` inside the engine.
- DeepSpeed: `bf16.enabled` when the compute dtype is bf16 (DeepSpeed then holds a bf16 working
  copy of the weights and its ZeRO optimizer the fp32 master partitions), and
  `data_types.grad_accum_dtype: fp32` (DeepSpeed's default under bf16 would sum gradients over
  micro-steps in bf16). fp16 and bf16-pure are refused for DeepSpeed at validation.

Separately, `train.grad_reduce_dtype: bf16` (DDP) all-reduces the gradients in bf16
(`bf16_all_reduce_hook`); they are still summed over micro-steps and stepped in the dtype above.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from trainer.config import RunConfig

log = logging.getLogger("fttrain")

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def autocast_dtype(precision: str, device_type: str) -> torch.dtype | None:
    """The torch.autocast dtype for `precision` on `device_type`; None: no autocast (the forward
    runs in the weights' own dtype). The one rule for training forwards and evaluation alike."""
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if precision == "auto" and device_type == "cuda":
        # On CPU bf16 autocast is slow and changes results; auto keeps CPU runs in fp32.
        return torch.bfloat16
    return None  # fp32, bf16-pure (weights already bf16), auto on CPU


@dataclass(frozen=True)
class PrecisionPolicy:
    """How one run trades precision for speed and memory (see the module docstring)."""

    precision: str  # train.precision, as configured
    device_type: str  # "cuda" / "cpu"
    backend: str  # train.backend
    load_dtype: torch.dtype  # model.dtype: what the checkpoint is read into
    param_dtype: torch.dtype  # trainable (master) weights and the optimizer state on them
    compute_dtype: torch.dtype  # matmuls of the forward and backward
    grad_accum_dtype: torch.dtype  # gradients summed over micro-steps and ranks
    loss_scaling: bool  # fp16: a dynamic loss scale guards small gradients from underflow
    # DDP's (and evaluation's) torch.autocast dtype; None: none. DeepSpeed does not autocast:
    # under bf16 it runs its bf16 working copy of the weights.
    autocast_dtype: torch.dtype | None

    @property
    def deepspeed_bf16(self) -> bool:
        """DeepSpeed's `bf16.enabled`."""
        return self.compute_dtype == torch.bfloat16

    @property
    def pure_low_precision(self) -> bool:
        return self.param_dtype != torch.float32

    def describe(self) -> str:
        """One line for the log: what was asked and what it became."""
        name = DTYPE_NAMES
        compute = name[self.compute_dtype]
        if self.backend == "ddp" and self.autocast_dtype is not None:
            compute += " autocast"
        elif self.backend == "deepspeed" and self.deepspeed_bf16:
            compute += " (DeepSpeed bf16 working copy of the weights)"
        return (
            f"precision: train.precision={self.precision} on {self.device_type} "
            f"({self.backend}): weights loaded in {name[self.load_dtype]}, trainable weights and "
            f"optimizer state in {name[self.param_dtype]}, compute in {compute}, gradients "
            f"accumulated in {name[self.grad_accum_dtype]}"
            + (", dynamic loss scaling" if self.loss_scaling else "")
        )

    def log(self) -> None:
        """Log the policy (INFO) and, for pure bf16, why that is risky (WARNING)."""
        log.info("%s", self.describe())
        if self.pure_low_precision:
            log.warning(
                "train.precision=%s: weights, gradients and optimizer state are kept in bf16; an "
                "update smaller than ~1/256 of a weight is rounded away (e.g. 1e-5 on a weight of "
                "0.02). Use train.precision=bf16 for fp32 master weights",
                self.precision,
            )


def precision_problems(precision: str, model_dtype: str, backend: str) -> list[str]:
    """Combinations no backend can honour, one line each naming the keys (config validation)."""
    problems = []
    if precision == "bf16-pure" and model_dtype != "bfloat16":
        problems.append(
            f"train.precision=bf16-pure keeps the weights in model.dtype, which is {model_dtype}: "
            "set model.dtype=bfloat16 (or train.precision=bf16 for bf16 compute on fp32 weights)"
        )
    if backend == "deepspeed" and precision in ("fp16", "bf16-pure"):
        problems.append(
            f"train.precision={precision} is not supported with train.backend=deepspeed (it keeps "
            "fp32 master weights itself); use train.precision=bf16, or train.backend=ddp"
        )
    return problems


def resolve_precision(
    precision: str, model_dtype: str, device_type: str, backend: str
) -> PrecisionPolicy:
    """The policy for this run. Raises ConfigError for combinations `precision_problems` names
    (load_config has already reported them for runs from a config file)."""
    from trainer.config import ConfigError

    problems = precision_problems(precision, model_dtype, backend)
    if problems:
        raise ConfigError(problems)
    autocast = autocast_dtype(precision, device_type)
    if precision == "bf16-pure":
        param = grad_accum = compute = torch.bfloat16
    else:
        param = grad_accum = torch.float32
        compute = autocast or torch.float32
    return PrecisionPolicy(
        precision=precision,
        device_type=device_type,
        backend=backend,
        load_dtype=getattr(torch, model_dtype),  # model.dtype is a torch dtype name
        param_dtype=param,
        compute_dtype=compute,
        grad_accum_dtype=grad_accum,
        loss_scaling=precision == "fp16",
        autocast_dtype=autocast,
    )


def resolve_run_precision(cfg: RunConfig, device_type: str) -> PrecisionPolicy:
    return resolve_precision(cfg.train.precision, cfg.model.dtype, device_type, cfg.train.backend)


def cast_trainable_params(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the `requires_grad` parameters to `dtype` in place (the Parameter objects stay, so an
    optimizer already built on them keeps working; it must not have state yet). Frozen weights
    (LoRA's base) stay in the dtype they were loaded in."""
    for p in model.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != dtype:
            p.data = p.data.to(dtype)


def bf16_all_reduce_hook(process_group, bucket):  # no return annotation: see below
    """DDP comm hook of train.grad_reduce_dtype=bf16: torch's `bf16_compress_hook` (each bucket
    cast to bf16, averaged over ranks in bf16, cast back into the bucket), under another name.
    DDP refuses that hook by its name unless CUDA and NCCL >= 2.10 are there (older NCCL had no
    bf16), although gloo all-reduces bf16 on the CPU as well; the name check is all this
    sidesteps. DDP also checks the return annotation against Future[Tensor], which under
    `from __future__ import annotations` would be a string here: hence none."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

    return bf16_compress_hook(process_group, bucket)
