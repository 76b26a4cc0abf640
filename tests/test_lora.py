"""LoRA and QLoRA (`method: lora | qlora`) on real peft adapters and real bitsandbytes
Linear4bit / Linear8bitLt layers, on CPU, through the same code a GPU run takes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config_args
from tests.test_distributed_training import _train_rank, read_losses

CPU = torch.device("cpu")


def _cfg(assets: Path, run_dir: Path, *overrides: str):
    from trainer.config import load_config

    args = tiny_config_args(assets, run_dir, *overrides)
    return load_config(args[0], args[1:])


def _quantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every frozen weight's bytes, plus the 4-bit layers' quantization state."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            out[name] = p.detach().clone()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            out[f"{name}.absmax"] = qs.absmax.clone()
            if qs.state2 is not None:
                out[f"{name}.absmax2"] = qs.state2.absmax.clone()
    return out


def _train_steps(model, batches, steps: int, lr: float = 1e-2) -> list[float]:
    from trainer.config import OptimConfig
    from trainer.model.loss import count_target_tokens, token_loss_sum
    from trainer.optim import build_optimizer

    opt = build_optimizer(model, OptimConfig(lr=lr, weight_decay=0.0))
    losses = []
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = token_loss_sum(out.logits, batch["labels"]) / count_target_tokens(batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def _batches(cfg, n: int = 4) -> list[dict[str, torch.Tensor]]:
    from data.build import build_train_batches
    from trainer.model.load import build_tokenizer

    tok = build_tokenizer(cfg.model)
    it = iter(
        build_train_batches(
            cfg.data, tok, rank=0, world_size=1, micro_batch_size=8, grad_accum_steps=1, seed=0
        )
    )
    return [next(it)[0] for _ in range(n)]  # each step's first (only) micro-batch


@pytest.mark.parametrize(
    "method_args",
    [
        ["method=qlora", "quantization.bits=4", "quantization.quant_type=nf4"],
        ["method=qlora", "quantization.bits=4", "quantization.quant_type=fp4"],
        ["method=qlora", "quantization.bits=8"],
        ["method=lora"],
    ],
    ids=["qlora-nf4", "qlora-fp4", "lora-int8", "lora"],
)
def test_adapters_learn_and_the_frozen_base_stays_bitwise(tiny_assets, tmp_path, method_args):
    import bitsandbytes as bnb

    from trainer.model.methods import load_model

    cfg = _cfg(tiny_assets, tmp_path, *method_args, "lora.r=8", "lora.dropout=0")
    model = load_model(cfg, CPU)
    kinds = {type(m) for m in model.modules()}
    if "quantization.bits=4" in method_args:
        assert bnb.nn.Linear4bit in kinds
    if "quantization.bits=8" in method_args:
        assert bnb.nn.Linear8bitLt in kinds
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen = _quantized_state(model)

    losses = _train_steps(model, _batches(cfg), steps=20, lr=3e-2)
    # A random tiny base with a frozen output head learns slowly through rank-8 adapters; a
    # steady fall is what shows the adapters get the gradients.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    after = _quantized_state(model)
    assert frozen.keys() == after.keys()
    for name in frozen:
        assert torch.equal(frozen[name], after[name]), f"frozen {name} changed"
    moved = [n for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    assert moved and all(
        not torch.equal(trainable[n], dict(model.named_parameters())[n]) for n in moved
    )


def test_eval_passes_do_not_repack_4bit_weights_under_training(tiny_assets, tmp_path):
    """bitsandbytes repacks a CPU Linear4bit weight in place on its first no-grad forward
    (on CPUs with AVX512-BF16); the LoRA gradients after that would be wrong. The method
    layer turns that off: gradients after an eval pass equal those of a fresh model."""
    from trainer.model.loss import token_loss_sum
    from trainer.model.methods import load_model

    cfg = _cfg(tiny_assets, tmp_path, "method=qlora", "lora.dropout=0")
    batch = _batches(cfg, 1)[0]

    def grads(model) -> dict[str, torch.Tensor]:
        model.train()
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        token_loss_sum(out.logits, batch["labels"]).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    fresh = grads(load_model(cfg, CPU))
    torch.manual_seed(0)
    model = load_model(cfg, CPU)
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    after_eval = grads(model)
    assert fresh.keys() == after_eval.keys()
    for n in fresh:
        assert torch.equal(fresh[n], after_eval[n]), n


@pytest.mark.timeout(300)
def test_qlora_two_ranks_equal_one_rank_with_double_accumulation(tiny_assets, tmp_path, ranks):
    two, one = tmp_path / "two", tmp_path / "one"
    # No LoRA dropout: its random masks depend on how the samples split over ranks.
    common = ["method=qlora", "lora.dropout=0", "train.max_steps=6", "train.micro_batch_size=4"]
    ranks(_train_rank, 2, tiny_config_args(tiny_assets, two, *common, "train.grad_accum_steps=2"))
    ranks(_train_rank, 1, tiny_config_args(tiny_assets, one, *common, "train.grad_accum_steps=4"))
    losses_two, losses_one = read_losses(two), read_losses(one)
    assert len(losses_two) == len(losses_one) == 6
    for a, b in zip(losses_two, losses_one, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (losses_two, losses_one)
    assert losses_one[-1] < losses_one[0]
    # The run's model is the adapter: peft loads it onto the base.
    adapter = json.loads((one / "model" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"
