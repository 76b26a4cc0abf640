"""Varlen attention for packed rows (trainer/model/varlen.py), through the engines' input path.

On the CPU the path runs its per-sample reference instead of torch's CUDA kernel: everything
around the kernel (the boundaries from the positions, the flattening, the registration with
transformers, the fallbacks to sdpa) is what these tests check; tests/test_gpu_sync.py runs the
kernel where there is a GPU."""

from __future__ import annotations

import pytest
import torch

from data.packing import pack, pad_right
from tests.test_attention_inputs import samples
from tests.tiny_models import CPU1, tiny_llama
from trainer.config import ConfigError, OptimConfig, ScheduleConfig
from trainer.model.attention_inputs import (
    attention_mode,
    choose_packed_attention,
    model_inputs,
    plain_causal,
)
from trainer.model.varlen import cu_seqlens, varlen_problem

CPU = torch.device("cpu")


def test_boundaries_come_from_the_position_restarts_of_every_row():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    assert cu_seqlens(positions).tolist() == [0, 3, 5, 6, 10, 12]
    assert cu_seqlens(positions).dtype == torch.int32


@pytest.mark.parametrize("kv_heads", [4, 2], ids=["mha", "gqa"])
def test_packed_rows_by_varlen_give_the_masked_logits(kv_heads):
    """Packed rows of several samples (and a pad tail): the logits under varlen equal those
    under the block-diagonal mask; padded rows under the varlen model are sdpa's."""
    masked = tiny_llama(num_key_value_heads=kv_heads).eval()
    model = tiny_llama(num_key_value_heads=kv_heads).eval()
    why = choose_packed_attention(model, "varlen", CPU, torch.float32)
    assert attention_mode(model) == "varlen" and "reference" in why
    assert plain_causal(model)
    packed = pack(samples([9, 4, 7, 1, 12, 3]), 16, pad_id=0)
    assert packed["input_ids"].shape[0] >= 2, "the test needs several packed rows"
    inputs = model_inputs(packed, CPU, "varlen")
    assert inputs["cu_seq_lens_q"].shape[0] > packed["input_ids"].shape[0] + 1
    padded = pad_right(samples([9, 4, 7]), pad_id=0)
    with torch.no_grad():
        got = model(**inputs, use_cache=False).logits
        want = masked(**model_inputs(packed, CPU, "mask"), use_cache=False).logits
        got_padded = model(**model_inputs(padded, CPU, "varlen"), use_cache=False).logits
        want_padded = masked(**model_inputs(padded, CPU, "mask"), use_cache=False).logits
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    real = padded["attention_mask"].bool()
    assert torch.equal(got_padded[real], want_padded[real])


def test_a_varlen_engine_trains_as_the_masked_one(tmp_path):
    """Two optimizer steps on packed micro-batches: the same losses and weights (to float
    rounding) with train.packed_attention=varlen as with the mask; the gradients flow through
    the varlen path."""
    from trainer.engine.ddp import DDPEngine
    from trainer.loop import train_step
    from trainer.optim import build_optimizer, build_scheduler

    def run(setting: str) -> tuple[list[float], torch.Tensor]:
        model = tiny_llama()
        opt = build_optimizer(model, OptimConfig(lr=1e-2))
        sched = build_scheduler(opt, ScheduleConfig(), 4, 0)
        engine = DDPEngine(model, opt, sched, CPU1, "fp32", packed_attention=setting)
        assert engine._attention == ("varlen" if setting == "varlen" else "mask")
        losses = []
        for lengths in ([9, 4, 7, 1, 12, 3], [5, 5, 11, 2, 8]):
            res = train_step(engine, [pack(samples(lengths), 16, pad_id=0)], 1.0)
            losses.append(res.loss)
        return losses, torch.cat([p.detach().flatten() for p in model.parameters()])

    varlen_losses, varlen_weights = run("varlen")
    mask_losses, mask_weights = run("mask")
    assert varlen_losses == pytest.approx(mask_losses, rel=1e-5)
    torch.testing.assert_close(varlen_weights, mask_weights, rtol=0, atol=1e-5)


def test_varlen_on_a_model_that_cannot_take_it_is_a_config_error_and_auto_keeps_the_mask():
    eager = tiny_llama(attn_implementation="eager")
    with pytest.raises(ConfigError, match="train.packed_attention=varlen: it needs a plain"):
        choose_packed_attention(eager, "varlen", CPU, torch.float32)
    model = tiny_llama()
    why = choose_packed_attention(model, "auto", CPU, torch.bfloat16)
    assert attention_mode(model) == "mask" and "needs a CUDA device" in why
    with_dropout = tiny_llama(attention_dropout=0.1)
    with pytest.raises(ConfigError, match="attention dropout"):
        choose_packed_attention(with_dropout, "varlen", CPU, torch.float32)


def test_a_packed_call_that_lost_its_boundaries_fails_instead_of_mixing_samples():
    """The stand-in mask of a varlen micro-batch, without cu_seq_lens_q, must not reach sdpa
    as an all-True mask (every token would attend to every other)."""
    from trainer.model.varlen import stand_in_mask

    model = tiny_llama().eval()
    choose_packed_attention(model, "varlen", CPU, torch.float32)
    packed = pack(samples([9, 4, 7]), 16, pad_id=0)
    with torch.no_grad(), pytest.raises(RuntimeError, match="without its sample boundaries"):
        model(
            input_ids=packed["input_ids"],
            position_ids=packed["position_ids"],
            attention_mask=stand_in_mask(CPU),
            use_cache=False,
        )


def test_a_run_without_packing_leaves_the_model_alone():
    model = tiny_llama(attn_implementation="eager")  # varlen could not take it: no error
    assert "data.packing=false" in choose_packed_attention(model, None, CPU, torch.float32)
    assert model.config._attn_implementation == "eager"


def test_the_kernel_check_says_why_it_cannot_run_here():
    assert "CUDA" in varlen_problem(CPU, torch.bfloat16, 4, 4)
    if torch.cuda.is_available():
        cuda = torch.device("cuda")
        assert "bf16 or fp16" in varlen_problem(cuda, torch.float32, 4, 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("weights", ["bf16", "fp32-autocast"])
def test_the_cuda_kernel_gives_the_masked_logits(weights, monkeypatch):
    """torch's varlen flash kernel against the block-diagonal mask (same weights), with bf16
    weights and with fp32 weights under bf16 autocast (DDP's default, where q and k leave the
    rotary embedding in fp32): the kernel runs, never the per-sample reference."""
    import contextlib

    from trainer.model import varlen

    def no_reference(*args, **kwargs):
        raise AssertionError("the CUDA path ran the per-sample reference")

    monkeypatch.setattr(varlen, "_per_sample_sdpa", no_reference)
    cuda = torch.device("cuda")
    dtype = torch.bfloat16 if weights == "bf16" else torch.float32

    def build():
        return tiny_llama(hidden=64, num_key_value_heads=2).to(cuda, dtype).eval()

    masked, model = build(), build()
    why = choose_packed_attention(model, "varlen", cuda, torch.bfloat16)
    assert "flash kernel" in why
    packed = pack(samples([9, 4, 7, 1, 12, 3]), 16, pad_id=0)
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if weights != "bf16"
        else contextlib.nullcontext()
    )
    with torch.no_grad(), autocast:
        got = model(**model_inputs(packed, cuda, "varlen"), use_cache=False).logits.float()
        want = masked(**model_inputs(packed, cuda, "mask"), use_cache=False).logits.float()
    assert float((got - want).abs().max()) <= 0.02 * max(1.0, float(want.abs().max()))
