"""The engines' attention inputs (trainer/model/attention_inputs.py) give the real tokens the
logits of transformers' own mask construction, and are used only where that holds."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from data.packing import pack, pad_right
from data.templates import TokenizedSample
from tests.tiny_models import TINY_DECODER, tiny_llama
from tests.tiny_models import tiny_mixtral as make_tiny_mixtral
from trainer.model.attention_inputs import (
    attention_mode,
    model_inputs,
    packed_causal_mask,
    plain_causal,
)

CPU = torch.device("cpu")


def samples(lengths: list[int], vocab: int = 60) -> list[tuple[int, TokenizedSample]]:
    gen = torch.Generator().manual_seed(1)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(3, vocab, (n,), generator=gen).tolist()
        out.append((i, TokenizedSample(input_ids=ids, labels=ids)))
    return out


def test_padded_rows_get_transformers_mask_and_the_real_tokens_logits_bitwise():
    model = tiny_llama().eval()
    batch = pad_right(samples([9, 4, 7, 1]), pad_id=0)
    ours = model_inputs(batch, CPU, "mask")
    assert ours["attention_mask"].shape == (4, 1, 9, 9)  # prepared: no check in the forward
    with torch.no_grad():
        got = model(**ours, use_cache=False).logits
        want = model(**model_inputs(batch, CPU, "transformers"), use_cache=False).logits
    real = batch["attention_mask"].bool()
    assert torch.equal(got[real], want[real])
    assert torch.isfinite(got).all()  # the pads' queries are not fully masked


def test_rows_without_padding_match_the_causal_kernel_bitwise():
    """Equal lengths: transformers would skip the mask for sdpa's causal kernel."""
    model = tiny_llama().eval()
    batch = pad_right(samples([6, 6, 6]), pad_id=0)
    with torch.no_grad():
        got = model(**model_inputs(batch, CPU, "mask"), use_cache=False).logits
        want = model(input_ids=batch["input_ids"], use_cache=False).logits
    assert torch.equal(got, want)


def test_a_single_row_is_left_to_transformers():
    batch = pad_right(samples([6]), pad_id=0)
    inputs = model_inputs(batch, CPU, "mask")
    assert torch.equal(inputs["attention_mask"], batch["attention_mask"])


def test_packed_rows_get_transformers_block_diagonal_mask_bitwise():
    model = tiny_llama().eval()
    batch = pack(samples([5, 7, 3, 6, 2]), seq_len=12, pad_id=0)
    ours = model_inputs(batch, CPU, "mask")
    mask = ours["attention_mask"]
    assert mask.dtype == torch.bool and mask.shape == (len(batch["input_ids"]), 1, 12, 12)
    with torch.no_grad():
        got = model(**ours, use_cache=False).logits
        want = model(**model_inputs(batch, CPU, "transformers"), use_cache=False).logits
    assert torch.equal(got, want)


def test_packed_mask_is_causal_within_each_sample_only():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0]])
    mask = packed_causal_mask(positions)[0, 0]
    want = torch.zeros(6, 6, dtype=torch.bool)
    for start, n in ((0, 3), (3, 2), (5, 1)):
        want[start : start + n, start : start + n] = torch.ones(n, n, dtype=torch.bool).tril()
    assert torch.equal(mask, want)


def tiny_mistral(sliding_window):
    cfg = MistralConfig(**TINY_DECODER, sliding_window=sliding_window)
    return MistralForCausalLM(cfg)


def tiny_qwen2(use_sliding_window):
    cfg = Qwen2Config(
        **{**TINY_DECODER, "num_hidden_layers": 2},
        use_sliding_window=use_sliding_window,
        sliding_window=8,
        max_window_layers=1,
    )
    return Qwen2ForCausalLM(cfg)


def tiny_mixtral(output_router_logits):
    return make_tiny_mixtral(output_router_logits=output_router_logits)


class RemoteLlama(LlamaForCausalLM):
    """What trust_remote_code gives: a model class from outside transformers."""


def remote_llama():
    return RemoteLlama(tiny_llama().config)


def lora_llama():
    return get_peft_model(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"]))


def tiny_bert_classifier():
    cfg = BertConfig(
        vocab_size=60,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_labels=3,
    )
    return BertForSequenceClassification(cfg)


@pytest.mark.parametrize(
    ("build", "expected"),
    [
        (tiny_llama, True),
        (lora_llama, True),
        (lambda: tiny_llama(attn_implementation="eager"), False),
        (lambda: tiny_mistral(None), True),
        (lambda: tiny_mistral(4), False),  # a sliding window: transformers builds that mask
        (lambda: tiny_qwen2(False), True),
        (lambda: tiny_qwen2(True), False),
        (tiny_bert_classifier, False),  # an encoder: padding must be masked
        (lambda: tiny_mixtral(False), True),
        (lambda: tiny_mixtral(True), False),  # its aux loss reads the 2D mask
        (remote_llama, False),  # remote code may read the mask its own way
    ],
    ids=[
        "llama",
        "llama-lora",
        "llama-eager",
        "mistral",
        "mistral-sliding",
        "qwen2",
        "qwen2-sliding",
        "bert-classifier",
        "mixtral",
        "mixtral-router-logits",
        "remote-code",
    ],
)
def test_only_plain_causal_decoders_under_sdpa_take_the_trainer_built_mask(build, expected):
    assert plain_causal(build()) is expected


def test_a_sliding_window_model_keeps_transformers_mask():
    """Mistral with a window shorter than the rows: the trainer does not touch its inputs."""
    batch = pad_right(samples([9, 4]), pad_id=0)
    model = tiny_mistral(4)
    inputs = model_inputs(batch, CPU, attention_mode(model))
    assert torch.equal(inputs["attention_mask"], batch["attention_mask"])


@pytest.mark.parametrize("output_router_logits", [False, True])
def test_an_moe_model_runs_on_the_inputs_the_engines_give_it(output_router_logits):
    """Mixtral, padded rows: with the trainer-built mask when it returns no router logits; with
    transformers' 2D mask, which its load-balancing loss reads, when it does."""
    model = tiny_mixtral(output_router_logits).eval()
    batch = pad_right(samples([9, 4]), pad_id=0)
    inputs = model_inputs(batch, CPU, attention_mode(model))
    with torch.no_grad():
        out = model(**inputs, use_cache=False)
        alone = model(input_ids=batch["input_ids"][1:, :4], use_cache=False)
    torch.testing.assert_close(out.logits[1, :4], alone.logits[0], rtol=0, atol=1e-5)
