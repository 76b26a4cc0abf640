"""DeepSpeed JSON <-> run config: fill `"auto"` values, and refuse any disagreement.

The run config is the one source of truth for batch sizes, clipping, precision (through the run's
`PrecisionPolicy`, trainer/engine/precision.py), the optimizer and the LR schedule. A DeepSpeed JSON may
leave those keys at `"auto"` (filled here) or repeat them; a repeated value that differs is an
error, and every such error is reported at once in one `ConfigError` whose lines name both the
DeepSpeed key (and file) and the run-config key.

`validate_deepspeed_config` needs only the config, the world size and the device type, so
`launch/train.py` can call it before any process group starts.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch

from trainer.config import ConfigError, Derived, RunConfig
from trainer.engine.precision import resolve_run_precision

AUTO = "auto"
# Sections that would replace our client AdamW / LambdaLR; DeepSpeed would silently use them.
_CLIENT_OWNED = {"optimizer": "optim.*", "scheduler": "schedule.*"}
# ZeRO++ switches that quantize the weights themselves (refused with method=qlora).
_ZERO_QUANTIZED_WEIGHTS = ("zero_quantized_weights", "zero_quantized_nontrainable_weights")


def load_deepspeed_json(path: str | Path) -> dict[str, Any]:
    """Read a DeepSpeed JSON file; a missing or malformed file is a one-line ConfigError."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"train.deepspeed_config={str(path)!r}: file not found"])
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(
            [f"train.deepspeed_config={str(path)!r}: not valid JSON (line {e.lineno}: {e.msg})"]
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(
            [f"train.deepspeed_config={str(path)!r}: the top level must be an object"]
        )
    return data


# DeepSpeed's spellings of fp32 (its DtypeEnum).
_FP32_NAMES = ("fp32", "float32", "float", "torch.float32")


def zero_stage(ds_config: dict[str, Any]) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def offloads_optimizer(zero: dict[str, Any]) -> bool:
    """Whether a `zero_optimization` section puts the optimizer state and step on the CPU (or
    NVMe): zero_optimization.offload_optimizer.device other than none."""
    return zero.get("offload_optimizer", {}).get("device", "none") not in ("none", None)


def resolve_deepspeed_config(
    raw: dict[str, Any], cfg: RunConfig, derived: Derived, device_type: str, source: str
) -> dict[str, Any]:
    """Return a copy of `raw` with every "auto" filled from the run config; raise one
    ConfigError listing every explicit value that disagrees with it."""
    ds = copy.deepcopy(raw)
    problems: list[str] = []
    where = f"({source})"

    def reconcile(ds_key: str, ours: Any, our_key: str, section: dict[str, Any] | None = None):
        node = ds if section is None else section
        leaf = ds_key.rsplit(".", 1)[-1]
        given = node.get(leaf, AUTO)
        if given == AUTO:
            node[leaf] = ours
        elif given != ours:
            # Compare numerically where both are numbers (1 == 1.0), else exactly.
            both_numbers = isinstance(given, (int, float)) and isinstance(ours, (int, float))
            if not (both_numbers and float(given) == float(ours)):
                problems.append(f"deepspeed {ds_key}={given!r} {where} != {our_key}={ours!r}")

    reconcile("train_micro_batch_size_per_gpu", derived.micro_batch_size, "train.micro_batch_size")
    reconcile(
        "gradient_accumulation_steps",
        derived.grad_accum_steps,
        "train.grad_accum_steps"
        if cfg.train.grad_accum_steps is not None
        else f"train.grad_accum_steps (from train.global_batch_size at world size "
        f"{derived.world_size})",
    )
    reconcile("train_batch_size", derived.global_batch_size, "train.global_batch_size")
    # DeepSpeed's "no clipping" is 0.0; ours is null.
    reconcile("gradient_clipping", cfg.train.max_grad_norm or 0.0, "train.max_grad_norm")

    policy = resolve_run_precision(cfg, device_type)  # fp16 and bf16-pure are refused there
    for name, ours in (("bf16", policy.deepspeed_bf16), ("fp16", False)):
        section = ds.get(name)
        if section is None:
            ds[name] = {"enabled": ours}
            continue
        if not isinstance(section, dict):
            problems.append(f"deepspeed {name} {where}: must be an object like {{'enabled': ...}}")
            continue
        reconcile(
            f"{name}.enabled",
            ours,
            f"train.precision={cfg.train.precision!r} on {device_type}"
            if name == "bf16"
            else "train.precision (fp16 is not supported with train.backend=deepspeed)",
            section,
        )

    # DeepSpeed sums gradients over micro-steps in the model's dtype (bf16 under bf16) unless
    # told otherwise; the policy sums them in fp32, as DDP does. Under ZeRO-1 without offload
    # this selects DeepSpeed's BF16_Optimizer (fp32 gradient buffers), which the engine handles.
    data_types = ds.setdefault("data_types", {})
    if not isinstance(data_types, dict):
        problems.append(f"deepspeed data_types {where}: must be an object")
    else:
        assert policy.grad_accum_dtype == torch.float32  # bf16-pure is refused for DeepSpeed
        given = data_types.get("grad_accum_dtype", AUTO)
        if given in (AUTO, None):
            data_types["grad_accum_dtype"] = "fp32"
        elif str(given).lower() not in _FP32_NAMES:
            problems.append(
                f"deepspeed data_types.grad_accum_dtype={given!r} {where} != fp32: gradients are "
                f"accumulated in fp32 under train.precision={cfg.train.precision!r} (as with "
                'DDP); remove the key or set it to "fp32"'
            )

    for section, our_keys in _CLIENT_OWNED.items():
        if section in ds:
            problems.append(
                f"deepspeed {section} {where} conflicts with {our_keys}: the trainer builds the "
                f"{section} from the run config; remove the {section!r} section"
            )

    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        problems.append(f"deepspeed zero_optimization {where}: must be an object")
        zero = {}
    stage = zero.get("stage", 0)
    if stage not in (1, 2, 3):
        problems.append(
            f"deepspeed zero_optimization.stage={stage!r} {where} conflicts with "
            "train.backend=deepspeed: must be 1, 2 or 3 (stage 0 is train.backend=ddp)"
        )
    if cfg.method == "qlora":
        # ZeRO++ stores or all-gathers weights re-quantized to int8 (through fp16, DeepSpeed's
        # CUDAQuantizer); bitsandbytes' packed 4-bit / int8 weights are codes, not values, and
        # would come back corrupted.
        for key in _ZERO_QUANTIZED_WEIGHTS:
            if zero.get(key):
                problems.append(
                    f"deepspeed zero_optimization.{key}=true {where} conflicts with "
                    "method=qlora: ZeRO++ re-quantizes the weights to int8, which corrupts the "
                    "bitsandbytes-quantized base; remove it (or use method=lora)"
                )
    # Our client optimizer is torch AdamW (weight-decay groups, LambdaLR); DeepSpeed refuses it
    # under offload or ZeRO unless told these two switches. Under offload it is DeepSpeed's CPU
    # Adam where that op builds, else torch's AdamW again (deepspeed_engine.build_client_optimizer),
    # which the second switch must allow.
    ds.setdefault("zero_allow_untested_optimizer", True)
    if offloads_optimizer(zero):
        if ds.get("zero_force_ds_cpu_optimizer", AUTO) not in (AUTO, False):
            problems.append(
                f"deepspeed zero_force_ds_cpu_optimizer=true {where} conflicts with optim.*: the "
                "trainer picks the optimizer that runs on the offloaded states (DeepSpeed's CPU "
                "Adam, or torch's AdamW where that op cannot be built); set it to false or "
                "remove it"
            )
        ds["zero_force_ds_cpu_optimizer"] = False
    ds.setdefault("steps_per_print", 10**9)  # the loop logs; DeepSpeed's own lines are noise

    leftover = sorted(_find_auto(ds))
    if leftover:
        problems.append(
            f"deepspeed {', '.join(leftover)} {where}: 'auto' is only understood for the batch, "
            "clipping and precision keys; give a value"
        )
    if problems:
        raise ConfigError(problems, source)
    return ds


def _find_auto(node: Any, prefix: str = "") -> list[str]:
    if isinstance(node, dict):
        return [k for key, v in node.items() for k in _find_auto(v, f"{prefix}{key}.")]
    return [prefix.rstrip(".")] if node == AUTO else []


def validate_deepspeed_config(
    cfg: RunConfig, derived: Derived, device_type: str | None = None
) -> dict[str, Any] | None:
    """The resolved DeepSpeed config for this run, or None when train.backend is not deepspeed.
    Raises ConfigError (every problem at once). Needs no process group: call it right after
    `resolve_batch` so a bad JSON fails before any rank starts waiting on the others."""
    if cfg.train.backend != "deepspeed":
        return None
    assert cfg.train.deepspeed_config is not None  # guaranteed by check_consistency
    if device_type is None:
        # Same device choice as trainer.dist.init_distributed, without starting anything.
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    raw = load_deepspeed_json(cfg.train.deepspeed_config)
    return resolve_deepspeed_config(raw, cfg, derived, device_type, cfg.train.deepspeed_config)
