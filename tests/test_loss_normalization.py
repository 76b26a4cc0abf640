"""Token-count normalization: accumulated gradients equal one big batch over the same tokens."""

from __future__ import annotations

import torch
from transformers import LlamaForCausalLM

from data.loader import collate_right_pad
from data.templates import IGNORE_INDEX, TokenizedSample
from tests.tiny_models import CPU1, tiny_llama
from trainer.config import OptimConfig, ScheduleConfig
from trainer.engine.ddp import DDPEngine
from trainer.model.loss import count_target_tokens, token_loss_sum
from trainer.optim import build_optimizer, build_scheduler


def make_model() -> LlamaForCausalLM:
    return tiny_llama(vocab=60, hidden=32, heads=4)


def make_samples() -> list[TokenizedSample]:
    """Very different lengths and very different numbers of target tokens."""
    g = torch.Generator().manual_seed(1)
    samples = []
    for length, n_prompt in [(6, 3), (57, 10), (12, 2), (40, 35), (9, 1), (63, 5)]:
        ids = torch.randint(3, 60, (length,), generator=g).tolist()
        labels = [IGNORE_INDEX] * n_prompt + ids[n_prompt:]
        samples.append(TokenizedSample(ids, labels))
    return samples


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def accumulated_grad(micro: list[list[TokenizedSample]]) -> torch.Tensor:
    model = make_model()
    opt = build_optimizer(model, OptimConfig())
    engine = DDPEngine(model, opt, build_scheduler(opt, ScheduleConfig(), 10, 0), CPU1, "fp32")
    batches = [collate_right_pad(list(enumerate(m)), pad_id=0) for m in micro]
    total = sum(count_target_tokens(b["targets"]) for b in batches)
    scale = torch.tensor(1.0) / total
    for i, b in enumerate(batches):
        engine.forward_backward(b, scale, is_last_micro_step=i == len(batches) - 1)
    return grads(model)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def test_accumulated_gradient_equals_big_batch():
    samples = make_samples()
    model = make_model()
    big = collate_right_pad(list(enumerate(samples)), pad_id=0)
    logits = model(input_ids=big["input_ids"], attention_mask=big["attention_mask"]).logits
    (token_loss_sum(logits, big["targets"]) / count_target_tokens(big["targets"])).backward()
    reference = grads(model)

    for split in (
        [samples[:2], samples[2:4], samples[4:]],
        [samples[:1], samples[1:]],
        [[s] for s in samples],
    ):
        assert rel_err(accumulated_grad(split), reference) < 1e-5


def test_mean_of_means_would_differ():
    """The check above is sensitive: averaging per-micro-batch means (the 2024 HF bug) is off."""
    samples = make_samples()
    reference = accumulated_grad([samples])
    model = make_model()
    micro = [samples[:2], samples[2:4], samples[4:]]
    for m in micro:
        b = collate_right_pad(list(enumerate(m)), pad_id=0)
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
        (
            token_loss_sum(logits, b["targets"]) / count_target_tokens(b["targets"]) / len(micro)
        ).backward()
    assert rel_err(grads(model), reference) > 1e-2


def test_eval_loss_is_hf_token_weighted_loss_over_padded_batches():
    """eval_loss pads several samples per batch and builds their attention mask itself (no
    host sync); its loss is the token-weighted mean of HF's own loss of each sample alone."""
    from trainer.evaluate import eval_loss
    from trainer.model.attention_inputs import plain_causal

    model = make_model().eval()
    assert plain_causal(model), "the test is about the trainer-built mask"
    samples = make_samples()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            out = model(input_ids=torch.tensor([s.input_ids]), labels=torch.tensor([s.labels]))
            total += float(out.loss) * s.num_target_tokens
            count += s.num_target_tokens
    got = eval_loss(model, samples, CPU1, batch_size=4, pad_id=0, precision="fp32")
    assert abs(got["eval/loss"] - total / count) <= 1e-6 * (total / count)
