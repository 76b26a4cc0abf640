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
(computed on the CPU from the collator's position_ids: no host sync) and a stand-in
mask (empty: one that reached sdpa would fail, not mix samples), which transformers passes
through as a prepared mask; the attention function then calls torch's varlen kernel. Every other call (padded rows, evaluation, generation) is sdpa as before.

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


try:  # torch >= 2.9; CUDA only
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
except ImportError:  # pragma: no cover - depends on the torch release
    _varlen_attn = None

# The causal argument of this torch's varlen_attn, found once (its signature changed between
# releases: `is_causal`, then `window_size`); None: it takes neither. Read by the forward as a
# plain dict, so that compiled blocks see a constant.
_CAUSAL: dict[str, Any] | None = None
_GQA: dict[str, Any] = {}
if _varlen_attn is not None:
    _params = inspect.signature(_varlen_attn).parameters
    if "window_size" in _params:
        _CAUSAL = {"window_size": (-1, 0)}
    elif "is_causal" in _params:
        _CAUSAL = {"is_causal": True}
    # Grouped-query attention: an explicit flag where this torch has one; older releases hand
    # the kv heads to the flash kernel as they are, which groups them itself (the self-check,
    # at the model's head counts, decides whether that works).
    _GQA = {"enable_gqa": True} if "enable_gqa" in _params else {}


def _half_dtype(*tensors: torch.Tensor) -> torch.dtype | None:
    """The dtype the kernel runs in: autocast's when it is on (q and k come out of the rotary
    embedding in fp32 under autocast, v in the autocast dtype), else the first bf16/fp16 among
    the inputs; None if there is none (fp32 compute)."""
    if torch.is_autocast_enabled("cuda"):
        return torch.get_autocast_dtype("cuda")
    return next((t.dtype for t in tensors if t.dtype in (torch.bfloat16, torch.float16)), None)


def _kernel(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu: torch.Tensor,
    longest: int,
    scale: float | None,
) -> torch.Tensor:
    """torch's varlen flash kernel on [N, H, D] tokens (CUDA), in the half dtype of the run."""
    dtype = _half_dtype(q, k, v)
    if _varlen_attn is None or _CAUSAL is None or dtype is None:
        raise RuntimeError(
            "train.packed_attention=varlen: torch's varlen kernel cannot run here (no kernel, "
            "or fp32 compute); set train.packed_attention=mask"
        )
    extra = {**_CAUSAL, **(_GQA if k.shape[1] != q.shape[1] else {})}
    q, k, v = (t.to(dtype) for t in (q, k, v))
    return _varlen_attn(q, k, v, cu, cu, longest, longest, scale=scale, **extra)


# The attention mask a packed varlen micro-batch carries: empty, so that a call that reached
# sdpa without its boundaries would fail loudly instead of attending across samples.
def stand_in_mask(device: torch.device) -> torch.Tensor:
    return torch.ones((1, 1, 1, 0), dtype=torch.bool, device=device)


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
        if attention_mask is not None and attention_mask.shape[-1] == 0:
            raise RuntimeError(
                "a packed micro-batch reached attention without its sample boundaries "
                "(cu_seq_lens_q): something between the model's forward and its attention "
                "dropped them; set train.packed_attention=mask"
            )
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
    if q.is_cuda:
        out = _kernel(q, k, v, cu, longest, scaling)  # never the reference: it would sync
    else:
        # The bounds as Python ints: a host read, of a CPU tensor.
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
    it, an fp32 compute dtype, or a self-check on the device that differs from the reference.
    The check makes the call training makes (`_kernel`, with a scale; q and k in fp32 and v in
    the compute dtype, as autocast hands them over), at the model's head counts and head size,
    and compares the output and the gradients of q, k and v."""
    if device.type != "cuda":
        return f"its kernel needs a CUDA device (this run is on {device.type})"
    if dtype not in (torch.bfloat16, torch.float16):
        return f"its kernel needs bf16 or fp16 compute (this run computes in {dtype})"
    if _varlen_attn is None:
        return f"this torch ({torch.__version__}) has no torch.nn.attention.varlen"
    if _CAUSAL is None:
        return f"this torch's ({torch.__version__}) varlen_attn takes no causal argument"
    try:
        g = torch.Generator(device=device).manual_seed(0)
        shapes = ((48, num_heads, head_dim), (48, kv_heads, head_dim), (48, kv_heads, head_dim))
        q, k, v = (torch.randn(*s, device=device, generator=g) for s in shapes)
        v = v.to(dtype)
        bounds = [0, 5, 29, 48]
        cu = torch.tensor(bounds, dtype=torch.int32, device=device)
        scale = head_dim**-0.5
        inputs = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        with torch.autocast("cuda", dtype=dtype):
            got = _kernel(*inputs, cu, 24, scale)
        weights = torch.randn(got.shape, device=device, generator=g)
        (got.float() * weights).sum().backward()
        ref = [t.detach().float().requires_grad_() for t in (q, k, v)]
        want = _per_sample_sdpa(*ref, bounds, scale)
        (want * weights).sum().backward()
        errors = [(got.detach().float(), want.detach())] + [
            (a.grad.float(), b.grad) for a, b in zip(inputs, ref, strict=True)
        ]
        error = max(float((a - b).abs().max()) / max(1.0, float(b.abs().max())) for a, b in errors)
    except Exception as e:  # noqa: BLE001 - any failure of the kernel means: keep the mask
        return f"its kernel failed a self-check ({type(e).__name__}: {e})"
    if not error <= 0.05:  # NaN fails too
        return f"its kernel differs from the reference by {error:.3g} in a self-check"
    return ""
