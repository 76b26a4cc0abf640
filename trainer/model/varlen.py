"""Packed rows without a T x T mask: variable-length (varlen) attention over each sample.

A packed row (data.packing) holds several samples; under sdpa the engines give it a
block-diagonal boolean mask (attention_inputs.packed_causal_mask). With an arbitrary mask sdpa
cannot use its flash kernel: it runs the memory-efficient one over every T x T pair of the row,
masked or not. Varlen attention instead takes the rows flattened to one sequence of tokens and
the cumulative sample lengths (`cu_seqlens`), and attends within each sample only: no mask, no
work on pairs across samples (the FLOPs this trainer counts for MFU are the per-sample ones).

How it runs: the model keeps transformers' sdpa code for everything, under the name
`fttrain_varlen` (registered here as an attention function and, with sdpa's own mask builder, as
a mask function). A packed training micro-batch is given `cu_seq_lens_q` and `max_length_q`
(computed on the CPU from the collator's position_ids: no host sync) and a 1x1x1x1 stand-in
mask, which transformers passes through as a prepared mask; the attention function then calls
torch's varlen kernel. Every other call (padded rows, evaluation, generation) is sdpa as before.

The kernel (`torch.nn.attention.varlen.varlen_attn`, flash attention) exists on CUDA only and
wants bf16/fp16 inputs. On the CPU, and wherever `train.packed_attention=varlen` is asked for
without it, the same path computes each sample's causal sdpa in turn: the tested reference for
everything around the kernel. `auto` takes varlen on CUDA only after a self-check of the kernel
against sdpa on the device (`varlen_problem`), and otherwise keeps the mask, saying why.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

NAME = "fttrain_varlen"


def cu_seqlens(position_ids: torch.Tensor) -> torch.Tensor:
    """The cumulative sample boundaries of packed rows [B, T] flattened to B*T tokens (int32,
    starting at 0, ending at B*T), read from the CPU position_ids: a sample starts wherever a
    position is not its predecessor + 1, and at every row's start (the same rule as
    attention_inputs.packed_causal_mask). The pad tail of a row is a sample of its own."""
    rows, width = position_ids.shape
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    first = torch.nonzero(starts.reshape(-1)).squeeze(1)
    return torch.cat([first, torch.tensor([rows * width])]).to(torch.int32)


def _per_sample_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: list[int], scale: float | None
) -> torch.Tensor:
    """Reference: [N, H, D] tokens, each sample's causal sdpa in turn (CPU, or no kernel)."""
    if k.shape[1] != q.shape[1]:  # grouped-query attention: each kv head serves a group
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    out = torch.empty_like(q)
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        # [1, H, n, D] per sample
        qs, ks, vs = (t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        o = F.scaled_dot_product_attention(qs, ks, vs, is_causal=True, scale=scale)
        out[start:end] = o.squeeze(0).transpose(0, 1)
    return out


def _kernel_kwargs(num_q_heads: int, num_kv_heads: int) -> dict[str, Any] | None:
    """Causal (and GQA) arguments for this torch's varlen_attn, or None if it takes neither way
    of saying causal (its signature changed between releases)."""
    from torch.nn.attention.varlen import varlen_attn

    params = inspect.signature(varlen_attn).parameters
    kwargs: dict[str, Any] = {}
    if "window_size" in params:
        kwargs["window_size"] = (-1, 0)
    elif "is_causal" in params:
        kwargs["is_causal"] = True
    else:
        return None
    if num_kv_heads != num_q_heads:
        if "enable_gqa" not in params:
            return None
        kwargs["enable_gqa"] = True
    return kwargs


def varlen_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function interface: query [B, Hq, T, D], key/value [B, Hkv, T,
    D]; returns [B, T, Hq, D]. Without `cu_seq_lens_q` (a call that is not a packed training
    micro-batch) it is sdpa's own function."""
    cu = kwargs.get("cu_seq_lens_q")
    if cu is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    if dropout and module.training:
        raise ValueError(
            "train.packed_attention=varlen does not apply attention dropout; set the model's "
            "attention_dropout to 0 or train.packed_attention=mask"
        )
    batch, q_heads, width, dim = query.shape
    kv_heads = key.shape[1]
    q = query.transpose(1, 2).reshape(batch * width, q_heads, dim)
    k = key.transpose(1, 2).reshape(batch * width, kv_heads, dim)
    v = value.transpose(1, 2).reshape(batch * width, kv_heads, dim)
    longest = int(kwargs["max_length_q"])  # a Python int (the row width), never a tensor
    if q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        from torch.nn.attention.varlen import varlen_attn

        extra = _kernel_kwargs(q_heads, kv_heads)
        assert extra is not None  # varlen_problem() refused this torch before
        out = varlen_attn(q, k, v, cu, cu, longest, longest, scale=scaling, **extra)
    else:
        # The bounds as Python ints: a host read of a CPU tensor (the CUDA path never gets here
        # in a run that took varlen; see varlen_problem).
        out = _per_sample_sdpa(q, k, v, cu.tolist(), scaling)
    return out.reshape(batch, width, q_heads, dim), None


def register() -> None:
    """Make `fttrain_varlen` an attention implementation transformers knows (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def varlen_problem(
    device: torch.device, dtype: torch.dtype, num_heads: int, kv_heads: int, head_dim: int = 64
) -> str:
    """Why the varlen kernel cannot serve this run ('' if it can): no CUDA, a torch without
    it, an fp32 compute dtype, or a self-check on the device (at the model's head counts and
    head size) that differs from sdpa."""
    if device.type != "cuda":
        return f"its kernel needs a CUDA device (this run is on {device.type})"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"its kernel needs bf16 or fp16 compute (this run computes in {dtype})"
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return f"this torch ({torch.__version__}) has no torch.nn.attention.varlen"
    extra = _kernel_kwargs(num_heads, kv_heads)
    if extra is None:
        return f"this torch's ({torch.__version__}) varlen_attn takes no causal/GQA arguments"
    try:
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(48, num_heads, head_dim, device=device, dtype=dtype, generator=g)
        k = torch.randn(48, kv_heads, head_dim, device=device, dtype=dtype, generator=g)
        v = torch.randn(48, kv_heads, head_dim, device=device, dtype=dtype, generator=g)
        bounds = [0, 5, 29, 48]
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        q.requires_grad_()
        got = varlen_attn(q, k, v, cu, cu, 24, 24, **extra)
        got.float().square().sum().backward()  # training needs its backward too
        got = got.detach().float()
        want = _per_sample_sdpa(q.detach().float(), k.float(), v.float(), bounds, None)
        error = float((got - want).abs().max())
        if q.grad is None or not bool(torch.isfinite(q.grad).all()):
            return "its kernel's backward gave no finite gradient in a self-check"
    except Exception as e:  # noqa: BLE001 - any failure of the kernel means: keep the mask
        return f"its kernel failed a self-check ({type(e).__name__}: {e})"
    if error > 0.05:
        return f"its kernel differs from sdpa by {error:.3g} in a self-check"
    return ""
