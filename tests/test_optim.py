"""Clipping, LR schedule values, and which parameters get weight decay."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import LlamaForCausalLM

from tests.tiny_models import CPU1
from tests.tiny_models import tiny_llama as make_tiny_llama
from trainer.config import OptimConfig, ScheduleConfig
from trainer.engine.ddp import DDPEngine
from trainer.optim import build_optimizer, build_scheduler, lr_multiplier, split_decay_groups


def tiny_llama() -> LlamaForCausalLM:
    return make_tiny_llama(vocab=50, hidden=16, heads=2, attention_bias=True)


def test_no_weight_decay_on_bias_and_norm():
    model = tiny_llama()
    decay, no_decay = split_decay_groups(model)
    names = {id(p): n for n, p in model.named_parameters()}
    decay_names = {names[id(p)] for p in decay}
    no_decay_names = {names[id(p)] for p in no_decay}
    assert all(n.endswith(".bias") or "norm" in n for n in no_decay_names)
    assert any(n.endswith(".bias") for n in no_decay_names)
    assert "model.norm.weight" in no_decay_names
    assert "model.layers.0.input_layernorm.weight" in no_decay_names
    assert all(n.endswith(".weight") and "norm" not in n for n in decay_names)
    assert "model.embed_tokens.weight" in decay_names
    assert len(decay) + len(no_decay) == len(list(model.parameters()))
    groups = build_optimizer(model, OptimConfig(weight_decay=0.1)).param_groups
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]


@pytest.mark.parametrize("decay", ["cosine", "linear", "constant"])
def test_schedule_values(decay):
    total, warmup, floor = 111, 10, 0.1  # decay spans steps 10..110: midpoint is step 60
    f = lr_multiplier(ScheduleConfig(decay=decay, min_lr_ratio=floor), total, warmup)
    assert f(0) == pytest.approx(0.1)  # warmup starts above zero: the first update is not wasted
    assert f(warmup - 1) == pytest.approx(1.0)  # warmup end reaches the peak
    expected_mid = {
        "cosine": floor + (1 - floor) * 0.5,
        "linear": floor + (1 - floor) * 0.5,
        "constant": 1.0,
    }[decay]
    assert f(60) == pytest.approx(expected_mid, abs=1e-12)  # mid-decay
    quarter = warmup + (total - 1 - warmup) // 4
    p = (quarter - warmup) / (total - 1 - warmup)
    expected_q = {
        "cosine": floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * p)),
        "linear": floor + (1 - floor) * (1 - p),
        "constant": 1.0,
    }[decay]
    assert f(quarter) == pytest.approx(expected_q)
    assert f(total - 1) == pytest.approx(1.0 if decay == "constant" else floor)  # the floor


def test_scheduler_drives_optimizer_lr():
    model = tiny_llama()
    opt = build_optimizer(model, OptimConfig(lr=1e-3))
    sched = build_scheduler(opt, ScheduleConfig(decay="linear", min_lr_ratio=0.0), 11, 0)
    seen = []
    for _ in range(11):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen[0] == pytest.approx(1e-3)
    assert seen[5] == pytest.approx(0.5e-3)
    assert seen[10] == pytest.approx(0.0)


def test_clipping_reports_preclip_norm_and_clips():
    model = tiny_llama()
    opt = build_optimizer(model, OptimConfig())
    engine = DDPEngine(model, opt, build_scheduler(opt, ScheduleConfig(), 10, 0), CPU1, "fp32")
    for p in model.parameters():
        p.grad = torch.randn_like(p) * 3
    expected = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    pre = engine.clip_grad_norm(max_norm=1.0)
    assert float(pre) == pytest.approx(float(expected), rel=1e-6)
    assert float(pre) > 1.0
    post = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    assert float(post) <= 1.0 + 1e-6
    # Without a threshold the norm is still measured and nothing changes.
    again = engine.clip_grad_norm(max_norm=None)
    assert float(again) == pytest.approx(float(post), rel=1e-6)
