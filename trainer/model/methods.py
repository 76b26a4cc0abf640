"""The training method (`method: full | lora | qlora`): how the model is loaded, which
parameters train, and what a checkpoint of it holds.

- full: every weight trains, except what `freeze:` holds back (the input embeddings, the first
  N transformer blocks).
- lora: peft low-rank adapters (`lora:`) on a frozen base in `model.dtype`.
- qlora: the same on a base quantized by bitsandbytes at load (`quantization:`): 4-bit NF4/FP4
  (`Linear4bit`) or 8-bit LLM.int8 (`Linear8bitLt`).

The engines need nothing method-specific: they optimize, clip, all-reduce and checkpoint the
`requires_grad` parameters only (checkpoints of a LoRA run hold the adapters and their
optimizer state, not the frozen base, which comes from `model.name_or_path` again on resume).
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from trainer.model.load import DTYPES, build_model

if TYPE_CHECKING:
    from trainer.config import RunConfig

log = logging.getLogger("fttrain")


class MethodError(ValueError):
    """The method's settings do not fit this model or this machine (one line, names the key)."""


def compute_dtype(cfg: RunConfig, device_type: str) -> torch.dtype:
    """quantization.compute_dtype, with auto resolved to the run's compute dtype."""
    from trainer.engine.precision import resolve_run_precision

    if cfg.quantization.compute_dtype != "auto":
        return DTYPES[cfg.quantization.compute_dtype]
    return resolve_run_precision(cfg, device_type).compute_dtype


def quantization_config(cfg: RunConfig, device_type: str, zero3: bool) -> Any:
    """The BitsAndBytesConfig of a qlora run, after checking bitsandbytes can run here."""
    try:
        import bitsandbytes  # noqa: F401 - imported to fail here, plainly, if it cannot load
        from transformers import BitsAndBytesConfig
    except Exception as e:  # noqa: BLE001 - any import failure means: no QLoRA here
        raise MethodError(
            f"method=qlora needs a working bitsandbytes ({type(e).__name__}: {e}); "
            "pip install bitsandbytes, or use method=lora"
        ) from None
    q = cfg.quantization
    if q.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = compute_dtype(cfg, device_type)
    if device_type == "cuda" and compute == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise MethodError(
            "quantization.compute_dtype: this GPU cannot compute in bfloat16; set "
            "quantization.compute_dtype=float16 (or train.precision=fp16)"
        )
    if q.storage_dtype == "auto":
        # Under ZeRO-3 the documented choice (transformers' QLoRA + ZeRO-3/FSDP guide): the
        # packed weights in the compute dtype, like the other weights. uint8 shards too (tested
        # on CPU: DeepSpeed gathers one dtype at a time), so it stays allowed.
        storage = compute if zero3 else torch.uint8
    else:
        storage = getattr(torch, q.storage_dtype)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=q.quant_type,
        bnb_4bit_use_double_quant=q.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=storage,
    )


def describe_quantization(qc: Any) -> str:
    """One log line for a qlora run's base weights (the precision line speaks of the others:
    the embeddings, norms and adapters, and the optimizer state)."""
    if getattr(qc, "load_in_8bit", False):
        return "qlora: frozen base Linear weights in 8-bit (LLM.int8)"
    name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
    compute = name.get(qc.bnb_4bit_compute_dtype, str(qc.bnb_4bit_compute_dtype))
    storage = name.get(qc.bnb_4bit_quant_storage, str(qc.bnb_4bit_quant_storage).split(".")[-1])
    return (
        f"qlora: frozen base Linear weights in 4-bit {qc.bnb_4bit_quant_type}"
        f"{' with double quantization' if qc.bnb_4bit_use_double_quant else ''} (packed in "
        f"{storage}), dequantized to {compute} for each matmul (quantization.compute_dtype)"
    )


def load_model(
    cfg: RunConfig, device: torch.device, *, deepspeed_config: dict | None = None
) -> nn.Module:
    """The model of `cfg.method`, ready for an engine: loaded (quantized for qlora), adapters
    attached, frozen what does not train. The trainable share is logged."""
    zero3 = (
        bool(deepspeed_config) and deepspeed_config.get("zero_optimization", {}).get("stage") == 3
    )
    extra: dict[str, Any] = {}
    if cfg.method == "qlora":
        extra["quantization_config"] = quantization_config(cfg, device.type, zero3)
        log.info("%s", describe_quantization(extra["quantization_config"]))
        if not zero3:
            # Each rank loads its own quantized copy onto its own device; "auto" would spread
            # one copy over every GPU of the node (the classic DDP "different devices" error).
            # ZeRO-3 refuses any device_map: DeepSpeed places (and shards) the weights.
            extra["device_map"] = {"": device}
    model = build_model(
        cfg.model, device, deepspeed_config=deepspeed_config, **task_kwargs(cfg), **extra
    )
    if cfg.method == "full":
        freeze_layers(model, cfg)
    else:
        model = attach_adapters(model, cfg, zero3)
    log_trainable(model, cfg.method)
    return model


def task_kwargs(cfg: RunConfig) -> dict[str, Any]:
    """What build_model needs to know of the task (the model class, the labels)."""
    return {"task": cfg.task, "labels": cfg.data.labels}


def freeze_layers(model: nn.Module, cfg: RunConfig) -> None:
    """`freeze.embeddings`, `freeze.first_layers` and `freeze.encoder` of a full fine-tune."""
    f = cfg.freeze
    if f.encoder:
        # HF classifiers are the base model (`bert`, `model`, ...) plus their head: freezing
        # the base leaves exactly the head (BERT's pooler is part of the base) to train.
        model.base_model.requires_grad_(False)
    if f.embeddings:
        model.get_input_embeddings().weight.requires_grad_(False)
    if f.first_layers:
        blocks = transformer_blocks(model)
        if f.first_layers > len(blocks):
            raise MethodError(
                f"freeze.first_layers={f.first_layers}: the model has {len(blocks)} blocks"
            )
        for block in blocks[: f.first_layers]:
            block.requires_grad_(False)


def transformer_blocks(model: nn.Module, key: str = "freeze.first_layers") -> list[nn.Module]:
    """The model's stack of transformer blocks: the longest nn.ModuleList in it. `key`: the
    setting that asked, named by the error if there is none."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise MethodError(f"{key}: no stack of transformer blocks found")
    return list(max(lists, key=len))


def _linear_kinds() -> tuple[type, ...]:
    from transformers.pytorch_utils import Conv1D

    kinds: list[type] = [nn.Linear, Conv1D]
    try:
        import bitsandbytes as bnb

        kinds += [bnb.nn.Linear4bit, bnb.nn.Linear8bitLt]
    except Exception:  # noqa: BLE001 - without bitsandbytes there are none of its layers
        pass
    return tuple(kinds)


def linear_module_names(model: nn.Module) -> list[str]:
    """The distinct last name parts of the model's linear layers (what target_modules lists)."""
    kinds = _linear_kinds()
    out_head = model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, kinds) and m is not out_head
        }
    )


def _check_targets(model: nn.Module, names: list[str]) -> None:
    """Every name in lora.target_modules must match some module (peft stops only when none
    does, so a typo beside a good name would silently adapt less than asked)."""
    module_names = [n for n, _ in model.named_modules()]
    missing = [t for t in names if not any(n == t or n.endswith(f".{t}") for n in module_names)]
    if missing:
        raise MethodError(
            f"lora.target_modules: {', '.join(missing)} match(es) no module of this model; "
            f"its linear layers are: {', '.join(linear_module_names(model))}"
        )


def attach_adapters(model: nn.Module, cfg: RunConfig, zero3: bool) -> nn.Module:
    """peft LoRA on the frozen (for qlora: quantized) base."""
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    targets: list[str] | str = lora.target_modules
    if isinstance(targets, list):
        _check_targets(model, targets)
    from transformers.pytorch_utils import Conv1D

    fan_in_fan_out = any(isinstance(m, Conv1D) for m in model.modules())  # GPT-2's layers
    if cfg.method == "qlora":
        _keep_cpu_4bit_weights_packed(model)
        if not zero3:
            from peft import prepare_model_for_kbit_training

            # Freezes the base, casts its small non-quantized weights (norms) to fp32 for
            # stability, and makes the embeddings' output require grad so that checkpointed
            # blocks get gradients. Peers skip it for sharded (ZeRO-3) QLoRA: it would upcast
            # weights that DeepSpeed partitions by dtype.
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=cfg.model.gradient_checkpointing,
                gradient_checkpointing_kwargs={"use_reentrant": False},
            )
    if cfg.model.gradient_checkpointing:
        # The base is frozen: without this, checkpointed blocks see inputs that need no grad
        # and the adapters inside them would get none.
        model.enable_input_require_grads()
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        exclude_modules=lora.exclude_modules or None,
        modules_to_save=lora.modules_to_save or None,
        use_rslora=lora.use_rslora,
        use_dora=lora.use_dora,
        bias=lora.bias,
        fan_in_fan_out=fan_in_fan_out,
        # SEQ_CLS: peft also trains and saves the classifier head (`classifier`, `score`) in
        # full, beside lora.modules_to_save.
        task_type="SEQ_CLS" if cfg.task == "sequence_classification" else "CAUSAL_LM",
    )
    try:
        return get_peft_model(model, config)
    except ValueError as e:  # peft: no target module found, unsupported layer, ...
        text = " ".join(str(e).split())
        if re.search(r"not found in the base model", text):
            raise MethodError(
                f"lora.target_modules={targets!r} matches no module of this model; its linear "
                f"layers are: {', '.join(linear_module_names(model))}"
            ) from None
        raise MethodError(f"lora: peft refused the settings ({text})") from None


def merged_model(cfg: RunConfig, adapter_dir: Path) -> nn.Module:
    """A plain HF model with the adapter at `adapter_dir` merged into the base, on the CPU, in
    float32 (the only rounding is the caller's, to `output.dtype`), built from the adapter
    files the way a user would: the base loaded as training loaded it; for qlora quantized and
    then dequantized, which gives the very weights the adapter trained against (merging into
    the 4-bit codes would round the update away, and the original weights differ from the
    trained-against ones by the whole quantization error)."""
    from peft import PeftModel

    cpu = torch.device("cpu")
    # Gradient checkpointing would only write use_cache=false into the merged model's config.
    model_cfg = cfg.model.model_copy(update={"gradient_checkpointing": False})
    if cfg.method == "qlora":
        quantized = build_model(
            model_cfg,
            cpu,
            **task_kwargs(cfg),
            quantization_config=quantization_config(cfg, cpu.type, zero3=False),
            device_map={"": cpu},
        )
        # Upcasting what bitsandbytes dequantizes to (the load dtype, as in training) is exact.
        base = quantized.dequantize(dtype=torch.float32)
    else:
        base = build_model(model_cfg, cpu, **task_kwargs(cfg))
    base = base.to(torch.float32)  # norms and embeddings too: one rounding, at the end
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def _keep_cpu_4bit_weights_packed(model: nn.Module) -> None:
    """bitsandbytes on CPUs with AVX512-BF16 repacks a Linear4bit weight in place the first
    time it runs without grad (an eval pass, generate); training on the repacked weight then
    gets wrong LoRA gradients, with only a warning. Keep the trainable layout."""
    try:
        import bitsandbytes as bnb
    except Exception:  # noqa: BLE001
        return
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit) and hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def log_trainable(model: nn.Module, method: str) -> None:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(_stored_numel(p) for p in model.parameters())
    log.info(
        "method %s: %s of %s parameters train (%.2f%%)",
        method,
        f"{trainable:,}",
        f"{total:,}",
        100 * trainable / max(total, 1),
    )


def _stored_numel(p: torch.Tensor) -> int:
    """Parameters a weight stands for: a packed 4-bit weight holds two per byte."""
    shape = getattr(p, "quant_state", None)
    if shape is not None and getattr(shape, "shape", None) is not None:
        return int(torch.Size(shape.shape).numel())
    return int(getattr(p, "ds_numel", p.numel()))
