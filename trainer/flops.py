"""Model FLOPs per trained token, and the peak FLOP/s of the device, for throughput and MFU.

The convention (MFU's, as PaLM appendix B and torchtitan count it: model FLOPs, not hardware
FLOPs):

- A multiply-add is 2 FLOPs. A weight matrix of N entries applied to one token costs 2N in the
  forward and 4N in the backward (2N for the input gradient, 2N for the weight gradient): 6N per
  trained token. N counts the weights of every per-token matmul: attention q/k/v/o (k and v with
  the key/value head count under GQA), the MLP (gate, up and down when gated), and lm_head --
  lm_head also when it shares the input embedding's weight (its matmul runs all the same;
  torchtitan drops it there, as it subtracts the embedding's parameters). Embedding lookups,
  norms, activations, rotary, softmax, the loss and the optimizer are not counted.
- A frozen weight (LoRA/QLoRA's base model, `freeze.*`) costs 4N: its weight gradient is never
  computed. LoRA's A/B matrices are trainable matmuls, 6 x their size. So a LoRA run's MFU is
  measured against the work the method actually does, not the full model's 6N: a 6N MFU would
  credit LoRA with a third of the backward it skips. Input gradients that nothing below needs
  are still counted, 2 per weight (layer 0's q/k/v under LoRA; with freeze.first_layers and
  frozen embeddings, the frozen blocks'): a small over-count, kept for a simple rule.
- Attention scores and values: QK^T and softmax(QK^T)V, each 2 x n_heads x d_head FLOPs per
  query token per attended position in the forward, twice that in the backward:
  12 x n_layers x n_heads x d_head per token per position (n_heads = query heads: under GQA every
  query head still scores every key). The causal mask is NOT halved: PaLM and torchtitan count
  the full square, so our MFU reads like theirs; Megatron-LM halves it (its MFU is lower by
  6 x n_layers x n_heads x d_head x context per token).
- The context: torchtitan charges every token the configured seq_len. A fine-tuning batch is
  padded or packed, so the loop charges each token the length of its own sample (a sample of L
  tokens costs L^2 query-key pairs), summed over the real samples of a micro-batch
  (`num_attention_pairs`), and counts only non-pad tokens: padding is waste, not model work.
- Activation checkpointing's recomputed forward is not counted (that would be HFU, not MFU).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

# Architectures whose MLP is gated (gate_proj, up_proj, down_proj: SwiGLU) and whose attention
# is q/k/v/o with num_key_value_heads: the Llama family layout.
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3")


@dataclass(frozen=True)
class FlopsPerToken:
    """Training (forward + backward) FLOPs per token, split as the module docstring counts."""

    num_matmul_params: int  # N: the base model's per-token matmul weights, lm_head included
    num_frozen_params: int  # of N, weights that get no gradient (4 FLOPs each, not 6)
    num_adapter_params: int  # LoRA A/B weights, trained, outside N
    attention: int  # FLOPs per token per attended position: 12 x n_layers x n_heads x d_head
    seq_len: int  # the nominal context (data.seq_len), what torchtitan charges every token
    source: str  # how N was found: the architecture's name, or "linear layers" (the fallback)

    @property
    def matmul(self) -> int:
        """FLOPs per token of the weight matmuls: 6N, less 2 per frozen weight, plus adapters."""
        return (
            6 * (self.num_matmul_params - self.num_frozen_params)
            + 4 * self.num_frozen_params
            + 6 * self.num_adapter_params
        )

    def per_token(self, context: float | None = None) -> float:
        """FLOPs per token attending `context` positions (default: seq_len, torchtitan's count)."""
        return self.matmul + self.attention * (self.seq_len if context is None else context)

    def describe(self) -> str:
        """One line for the log."""
        parts = [f"N={self.num_matmul_params:,} matmul weights ({self.source})"]
        if self.num_frozen_params:
            parts.append(f"{self.num_frozen_params:,} of them frozen (4 FLOPs each, not 6)")
        if self.num_adapter_params:
            parts.append(f"+{self.num_adapter_params:,} LoRA weights")
        return (
            f"model FLOPs per token: {self.per_token():.4g} at seq_len {self.seq_len} "
            f"({self.matmul:.4g} matmul + {self.attention:,} per attended position; "
            + ", ".join(parts)
            + ")"
        )

    def flops(self, num_tokens: float, num_attention_pairs: float) -> float:
        """FLOPs of training on `num_tokens` real tokens whose samples hold `num_attention_pairs`
        query-key pairs (the sum of each sample's length squared)."""
        return self.matmul * num_tokens + self.attention * num_attention_pairs


def _get(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def _attention_flops(config: Any) -> int:
    """12 x n_layers x n_heads x d_head, from whichever names the config uses; 0 if it has none."""
    layers = _get(config, "num_hidden_layers", "n_layer")
    heads = _get(config, "num_attention_heads", "n_head")
    hidden = _get(config, "hidden_size", "n_embd", "d_model")
    if not (layers and heads and hidden):
        return 0
    head_dim = _get(config, "head_dim") or hidden // heads
    return 12 * layers * heads * head_dim


def matmul_params_from_config(config: Any) -> int | None:
    """N for the architectures known here, from the config alone; None for any other."""
    kind = getattr(config, "model_type", None)
    if kind in LLAMA_LIKE:
        d, layers = config.hidden_size, config.num_hidden_layers
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or d // heads
        attn = d * heads * head_dim + 2 * d * kv_heads * head_dim + heads * head_dim * d
        mlp = 3 * d * config.intermediate_size  # gate, up, down
        return layers * (attn + mlp) + d * config.vocab_size
    if kind == "gpt_neox":
        d, layers = config.hidden_size, config.num_hidden_layers
        # query_key_value is one fused d -> 3d matmul; the MLP is not gated.
        attn = 3 * d * d + d * d
        mlp = 2 * d * config.intermediate_size
        return layers * (attn + mlp) + d * config.vocab_size
    if kind == "gpt2":
        d, layers = config.n_embd, config.n_layer
        inner = config.n_inner or 4 * d
        attn = 3 * d * d + d * d  # c_attn (fused q/k/v), c_proj
        mlp = 2 * d * inner  # c_fc, c_proj
        return layers * (attn + mlp) + d * config.vocab_size  # lm_head, tied to wte
    return None


def flops_per_token(
    config: Any,
    seq_len: int | None = None,
    *,
    num_params: int | None = None,
    num_frozen_params: int = 0,
    num_adapter_params: int = 0,
) -> FlopsPerToken:
    """Training FLOPs per token of a Hugging Face causal LM described by `config` (Llama,
    Mistral, Qwen2/3, GPT-NeoX, GPT-2). For any other architecture, `num_params` (the weights
    of the model's linear layers, lm_head included, as `matmul_params` counts them) stands in
    for N. `seq_len` defaults to the config's max_position_embeddings. `num_frozen_params` and
    `num_adapter_params`: see `matmul_params`."""
    n = matmul_params_from_config(config)
    source = getattr(config, "model_type", None) or "config"
    if n is None:
        if num_params is None:
            raise ValueError(
                f"no FLOP formula for model_type={source!r}; pass num_params "
                "(trainer.flops.matmul_params(model) counts it)"
            )
        n, source = num_params, "linear layers"
    if seq_len is None:
        seq_len = _get(config, "max_position_embeddings", "n_positions") or 0
    return FlopsPerToken(
        num_matmul_params=n,
        num_frozen_params=min(num_frozen_params, n),
        num_adapter_params=num_adapter_params,
        attention=_attention_flops(config),
        seq_len=int(seq_len),
        source=source,
    )


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    """(in, out) of a per-token matmul module; None for anything else. nn.Linear covers
    bitsandbytes' 4/8-bit layers (subclasses, with their logical sizes; their packed weights'
    numel is not the matmul's size) and keeps its sizes under ZeRO-3, which empties weights."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if type(module).__name__ == "Conv1D" and hasattr(module, "nx"):  # GPT-2's transposed Linear
        return module.nx, module.nf
    return None


def matmul_params(model: nn.Module) -> tuple[int, int, int]:
    """(all, frozen, adapter) weights of the model's per-token matmuls: base-model linear layers,
    those of them whose weight gets no gradient, and LoRA's A/B layers (peft's `lora_A`/`lora_B`,
    trainable by construction). peft's `original_module` (the frozen copy beside a
    `modules_to_save` module, not run in the forward) is left out."""
    total = frozen = adapter = 0
    for name, module in model.named_modules():
        shape = _linear_shape(module)
        if shape is None:
            continue
        parts = name.split(".")
        size = shape[0] * shape[1]
        if "original_module" in parts:
            continue
        if any(p.startswith("lora_") for p in parts):
            adapter += size
            continue
        total += size
        if not module.weight.requires_grad:
            frozen += size
    return total, frozen, adapter


def model_flops_per_token(model: nn.Module, seq_len: int) -> FlopsPerToken:
    """`flops_per_token` for a built model (peft-wrapped or not): its config, and which of its
    matmul weights are frozen or LoRA adapters."""
    total, frozen, adapter = matmul_params(model)
    return flops_per_token(
        getattr(model, "config", None),  # none: the fallback, from the linear layers alone
        seq_len,
        num_params=total,
        num_frozen_params=frozen,
        num_adapter_params=adapter,
    )


def num_attention_pairs(batch: dict[str, torch.Tensor]) -> int:
    """Query-key pairs of a (CPU) micro-batch's real samples: the sum of each sample's length
    squared. Padded rows: one sample per row, its length from attention_mask. Packed rows
    (no attention_mask): samples are the runs of position_ids restarting at 0, of which each
    row's first k are real (k from sample_index; the rest is the pad tail). Without either,
    every row is one sample as wide as the batch."""
    ids = batch["input_ids"]
    if "attention_mask" in batch:
        lengths = batch["attention_mask"].sum(dim=1)
        return int((lengths * lengths).sum())
    if "position_ids" not in batch:
        rows, width = ids.shape
        return rows * width * width
    pos = batch["position_ids"]
    rows, width = pos.shape
    starts = (pos.reshape(-1) == 0).nonzero().squeeze(1)  # every row starts a sample at 0
    lengths = torch.diff(starts, append=torch.tensor([pos.numel()]))
    index = batch.get("sample_index")
    if index is not None and index.dim() == 2:
        # A segment is real when its rank within its row is below the row's sample count.
        row = starts // width
        per_row = torch.bincount(row, minlength=rows)
        first = torch.cumsum(per_row, 0) - per_row
        rank = torch.arange(len(starts)) - first[row]
        lengths = lengths[rank < (index >= 0).sum(dim=1)[row]]
    return int((lengths * lengths).sum())


# Dense (no 2:4 sparsity) bf16 tensor-core peaks in TFLOP/s, per NVIDIA's datasheets (their
# headline numbers are with sparsity: halved here), matched on torch.cuda.get_device_name(). The
# first pattern that matches wins, so variants come before the name they contain.
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    (r"\bH100\b.*\bNVL\b", 835.5),
    (r"\bH100\b.*\bPCIe\b", 756.0),
    (r"\bH100\b", 989.4),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"\bH200\b.*\bNVL\b", 835.5),
    (r"\bH200\b", 989.4),
    (r"\bA100\b", 312.0),  # SXM4 and PCIe alike
    (r"\bA10G\b", 70.0),  # AWS's variant (A10: 125); 140 with sparsity
    (r"\bL40S\b", 362.05),
    (r"\bL4\b", 121.0),
    (r"\bRTX 4090\b", 165.2),  # with fp32 accumulation, as torch's matmuls do
)


def known_peak_tflops(device_name: str) -> float | None:
    """The dense bf16 peak of the GPU called `device_name`; None when it is not in the table."""
    for pattern, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name, flags=re.IGNORECASE):
            return tflops
    return None


def resolve_peak_tflops(
    configured: float | None, device: torch.device, *, fp32_compute: bool = False
) -> tuple[float | None, str]:
    """The peak TFLOP/s of one device that MFU divides by, and a line for the log saying where
    it comes from or why MFU is not logged. The table holds bf16 peaks (fp16's are the same):
    MFU of an fp32 run is against them too, so it reads low -- this project leaves TF32 off."""
    how = "set logging.peak_tflops to one device's dense peak TFLOP/s to log train/mfu"
    if configured is not None:
        return configured, f"MFU against logging.peak_tflops={configured:g} TFLOP/s per device"
    if device.type != "cuda":
        return None, f"MFU not logged: no peak FLOP/s is known for {device.type}; {how}"
    name = torch.cuda.get_device_name(device)
    peak = known_peak_tflops(name)
    if peak is None:
        return None, f"MFU not logged: no known peak for the GPU {name!r}; {how}"
    note = " (compute is fp32, so MFU reads low against it)" if fp32_compute else ""
    return peak, f"MFU against the dense bf16 peak of {name}: {peak:g} TFLOP/s{note}"
