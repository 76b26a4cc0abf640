"""Is packing exact for this model? A probe run once at start when `data.packing` is on.

Packed rows (data.packing) carry several samples with `position_ids` restarting at 0 for each,
and no attention mask: transformers derives a block-diagonal causal mask from the restarts. Most
architectures honour that (Llama, Qwen2/3, Mistral, GPT-2, GPT-NeoX, Phi-3, Gemma2/3), but some
ignore per-sample positions or the derived mask (OPT, Falcon: packed logits off by ~0.9), and
would silently train every sample on its neighbours' tokens. So the model at hand proves it:
two short random samples, run alone and packed in one row, must give the same logits.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.model.attention_inputs import attention_mode, model_inputs

# Max |packed - alone| logit difference accepted: float rounding of a different but equivalent
# computation order is ~1e-6 in fp32; the failures this catches are ~1e-1. Half precision
# weights round at ~4e-3 relative, so they get a looser bound that still sits far below.
TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-6}
HALF_TOLERANCE = 5e-2
LENGTHS = (5, 7)


class PackingNotExact(ValueError):
    """The model mixes packed samples; the message names the key to change."""


@torch.no_grad()
def packing_error(model: nn.Module, device: torch.device) -> float:
    """Max |logits(packed) - logits(alone)| over two random samples, divided by the largest
    |logit| where that exceeds 1. Collective under ZeRO-3
    (every rank must call it: the inputs are the same on every rank)."""
    vocab = model.get_input_embeddings().num_embeddings
    if vocab == 0:  # a ZeRO-3 placeholder: the real size is kept as ds_shape
        vocab = int(model.get_input_embeddings().weight.ds_shape[0])
    gen = torch.Generator().manual_seed(0)
    samples = [torch.randint(0, vocab, (1, n), generator=gen).to(device) for n in LENGTHS]
    packed_ids = torch.cat(samples, dim=1)
    positions = torch.cat([torch.arange(n) for n in LENGTHS]).unsqueeze(0)
    # The packed row goes through the engines' own input path, so the probe tests the mask the
    # training forward gets (built by the trainer or by transformers: see attention_inputs).
    packed_inputs = model_inputs(
        {"input_ids": packed_ids, "position_ids": positions}, device, attention_mode(model)
    )
    was_training = model.training
    model.eval()  # no dropout
    try:
        packed = model(**packed_inputs, use_cache=False).logits.float()
        alone = torch.cat([model(input_ids=s, use_cache=False).logits for s in samples], dim=1)
    finally:
        model.train(was_training)
    alone = alone.float()
    # Relative to the logits' scale when that exceeds 1: a deep half-precision model (an 8B
    # Llama in 4-bit, random weights: logits in the tens) rounds by more than the absolute
    # bound, while samples that see each other move the logits by a sizeable share of it.
    scale = max(1.0, float(alone.abs().max()))  # host syncs: once, at start
    return float((packed - alone).abs().max()) / scale


def tolerance(model: nn.Module) -> float:
    """The bound for the model's least precise weights: one half-precision or quantized (bnb
    4/8-bit, stored as integers) layer makes the whole forward round like half precision, even
    when the first parameter (e.g. an upcast embedding under QLoRA) is fp32."""
    dtypes = {p.dtype for p in model.parameters()}
    if any(not (d.is_floating_point and d in TOLERANCE) for d in dtypes):
        return HALF_TOLERANCE
    return max(TOLERANCE[d] for d in dtypes) if dtypes else TOLERANCE[torch.float32]


def check_packing_exact(model: nn.Module, device: torch.device) -> None:
    """Raise PackingNotExact when packed samples would see each other in this model."""
    error = packing_error(model, device)
    bound = tolerance(model)
    if not error <= bound:  # also catches NaN
        name = type(model).__name__
        attn = getattr(model.config, "_attn_implementation", "?")
        raise PackingNotExact(
            f"data.packing=true: {name} (attention {attn}) does not keep packed samples apart "
            f"(their logits differ from the samples run alone by {error:.3g} of the logits' "
            f"scale > {bound:g}), so "
            "each sample would train on its neighbours' tokens; set data.packing=false"
        )
