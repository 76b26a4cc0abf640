"""Config sections of the training method: `method`, `lora`, `quantization`, `freeze`.

Kept beside trainer/config.py (which composes them into RunConfig) so that the schema of the
method layer reads in one place; trainer/model/methods.py applies them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from data.config_base import Section

METHODS = ("full", "lora", "qlora")


class LoraSection(Section):
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: float = Field(32, gt=0, description="LoRA alpha (the update is scaled by alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear",
        description="Module names to adapt (suffixes such as q_proj, v_proj; GPT-2: c_attn), "
        "or all-linear: every linear layer except the output head. A name that matches no "
        "module is an error listing the model's linear layers.",
    )
    exclude_modules: list[str] = Field(
        default_factory=list, description="Module names never adapted (with all-linear)."
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full beside the adapters and saved with them "
        "(e.g. a classifier head, or embed_tokens when new tokens were added).",
    )
    use_rslora: bool = Field(False, description="Rank-stabilized scaling alpha / sqrt(r).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (DoRA).")
    bias: Literal["none", "all", "lora_only"] = Field(
        "none", description="Which biases train (peft's `bias`)."
    )


class QuantizationSection(Section):
    bits: Literal[4, 8] = Field(
        4, description="4: bitsandbytes NF4/FP4 (QLoRA); 8: LLM.int8 (Linear8bitLt)."
    )
    quant_type: Literal["nf4", "fp4"] = Field("nf4", description="4-bit data type.")
    double_quant: bool = Field(True, description="Quantize the 4-bit scales too (~0.4 bit/param).")
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype the 4-bit layers compute in. auto: the run's compute dtype "
        "(train.precision: bf16 on a GPU that has it, float32 on CPU).",
    )
    storage_dtype: Literal["auto", "uint8", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="dtype the packed 4-bit weights are stored in. auto: uint8, or under ZeRO-3 "
        "the compute dtype (the documented setting for sharded QLoRA; uint8 shards too).",
    )


class FreezeSection(Section):
    embeddings: bool = Field(False, description="method=full: do not train the input embeddings.")
    first_layers: int = Field(
        0, ge=0, description="method=full: do not train the first N transformer blocks."
    )
    encoder: bool = Field(
        False,
        description="task=sequence_classification, method=full: train only the classification "
        "head (the encoder/decoder body stays frozen).",
    )


def method_problems(
    method: str,
    lora_set: bool,
    quantization_set: bool,
    freeze: FreezeSection,
    merge_adapter: bool = False,
) -> list[str]:
    """Options that do not belong to the chosen method (a typo'd method would silently train
    in full with the LoRA settings ignored)."""
    problems = []
    if method == "full" and lora_set:
        problems.append("lora: LoRA options are set but method is full (set method: lora)")
    if method != "qlora" and quantization_set:
        problems.append(f"quantization: only used with method: qlora (method is {method})")
    if method != "full" and (freeze.embeddings or freeze.first_layers or freeze.encoder):
        problems.append(
            f"freeze: only used with method: full (with {method}, only the adapters train, "
            "and a classifier's head beside them)"
        )
    if method == "full" and merge_adapter:
        problems.append("output.merge_adapter: only used with method: lora or qlora")
    return problems
