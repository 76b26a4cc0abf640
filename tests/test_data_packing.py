"""Packing keeps samples independent; loss masks cover exactly the response / assistant tokens."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaForCausalLM

from data.packing import pack
from data.shards import ShardSet
from data.templates import IGNORE_INDEX, TokenizedSample, encode_row
from tests.data_fixtures import char_tokenizer, config, make_shards, stream
from tests.tiny_models import tiny_llama as make_tiny_llama


def tiny_llama() -> LlamaForCausalLM:
    model = make_tiny_llama(
        # 101 = the char tokenizer's size before it got its template-marker tokens
        vocab=max(101, len(char_tokenizer())),
        hidden=64,
        heads=4,
        max_position_embeddings=256,
        attn_implementation="sdpa",
    ).eval()
    assert model.config._attn_implementation == "sdpa"
    return model


def assert_segments_match_alone(model, batch, sample_of) -> int:
    """Each packed sample's logits == the sample run alone; returns how many were checked."""
    assert "attention_mask" not in batch  # packed rows rely on position_ids for the block mask
    with torch.no_grad():
        # use_cache=False as the engine passes it: with a KV cache transformers skips the
        # packed-sequence detection and the samples would see each other.
        packed = model(
            input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
        ).logits
    checked = 0
    for r in range(batch["input_ids"].shape[0]):
        starts = (batch["position_ids"][r] == 0).nonzero().flatten().tolist()
        for j, row_id in enumerate(batch["sample_index"][r].tolist()):
            if row_id < 0:
                continue
            sample = sample_of(row_id)
            lo, hi = starts[j], starts[j] + len(sample)
            assert batch["input_ids"][r, lo:hi].tolist() == sample.input_ids
            assert batch["targets"][r, lo:hi].tolist() == sample.targets()
            with torch.no_grad():
                alone = model(input_ids=torch.tensor([sample.input_ids]), use_cache=False).logits[0]
            torch.testing.assert_close(packed[r, lo:hi], alone, rtol=0, atol=1e-5)
            checked += 1
    return checked


@pytest.mark.timeout(60)
def test_packed_samples_get_the_logits_they_get_alone(tmp_path):
    shards = make_shards(tmp_path, 40, 10)
    cfg = config(shards, packing=True, seq_len=128, num_workers=2)
    tok = char_tokenizer()
    rows = {i: json.loads(d) for i, (_, _, d) in enumerate(ShardSet(str(shards)).iter_rows())}
    model = tiny_llama()
    step = next(iter(stream(cfg, micro_batch_size=8, grad_accum_steps=1)))
    batch = step[0]
    assert batch["sample_index"].shape[1] >= 2, "the test needs rows holding several samples"
    n = assert_segments_match_alone(model, batch, lambda i: encode_row(rows[i], tok, cfg))
    # 8 rows of a token budget: more than 8 samples, every one checked
    assert n == int((batch["sample_index"] >= 0).sum()) > 8


def test_pack_respects_seq_len_and_restarts_positions():
    tok = char_tokenizer()
    cfg = config("unused", seq_len=40)
    samples = [
        encode_row({"instruction": "x" * k, "response": "y"}, tok, cfg) for k in (5, 20, 3, 12, 1)
    ]
    batch = pack(list(enumerate(samples)), 40, tok.pad_token_id)
    assert batch["input_ids"].shape[1] <= 40
    # every sample appears once, and positions restart at each sample start
    got = sorted(i for i in batch["sample_index"].flatten().tolist() if i >= 0)
    assert got == list(range(5))
    real = sum(len(s) for s in samples)
    assert int((batch["targets"] != IGNORE_INDEX).sum()) == sum(
        s.num_target_tokens for s in samples
    )
    assert batch["input_ids"].numel() >= real
    model = tiny_llama()
    assert assert_segments_match_alone(model, batch, lambda i: samples[i]) == 5


def labeled_text(sample) -> str:
    tok = char_tokenizer()
    return tok.decode([t for t in sample.labels if t != IGNORE_INDEX])


def test_instruction_loss_mask_is_the_response():
    tok = char_tokenizer()
    cfg = config("unused")
    row = {"instruction": "2+2=", "context": "math", "response": "4 exactly"}
    sample = encode_row(row, tok, cfg)
    assert labeled_text(sample) == "4 exactly</s>"
    assert tok.decode(sample.input_ids).endswith("### Response:\n4 exactly</s>")
    everything = encode_row(row, tok, config("unused", loss_on_prompt=True))
    assert everything.labels == everything.input_ids


CHAT = {
    "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
}


def test_chat_loss_mask_is_the_assistant_turns():
    tok = char_tokenizer()
    cfg = config("unused", format="chat")
    sample = encode_row(CHAT, tok, cfg)
    text = tok.decode(sample.input_ids)
    assert text == tok.apply_chat_template(CHAT["messages"], tokenize=False)  # BOS included
    # content + end-of-turn token of each assistant message; no role header, no user/system
    # text, not the newline the template puts between turns
    assert labeled_text(sample) == "hello</s>4</s>"
    positions = [i for i, t in enumerate(sample.labels) if t != IGNORE_INDEX]
    assert tok.decode([sample.input_ids[i] for i in positions]) == "hello</s>4</s>"
    assert all(sample.labels[i] == sample.input_ids[i] for i in positions)
    everything = encode_row(CHAT, tok, config("unused", format="chat", loss_on_prompt=True))
    assert labeled_text(everything) == text[len("<s>") :]


def test_chat_without_tokenizer_template_uses_the_fallback():
    tok = copy.deepcopy(char_tokenizer())
    tok.chat_template = None
    cfg = config(
        "unused", format="chat", messages_field="conv", role_key="from", content_key="value"
    )
    row = {"conv": [{"from": m["role"], "value": m["content"]} for m in CHAT["messages"]]}
    sample = encode_row(row, tok, cfg)
    assert "<|user|>\nhi</s>" in tok.decode(sample.input_ids)
    assert labeled_text(sample) == "hello</s>4</s>"


def test_text_format_loss_on_all_text_tokens():
    tok = char_tokenizer()
    sample = encode_row(
        {"body": "plain words"}, tok, config("unused", format="text", text_field="body")
    )
    assert labeled_text(sample) == "plain words</s>"
    assert sample.labels[0] == IGNORE_INDEX and sample.input_ids[0] == tok.bos_token_id


@pytest.mark.timeout(60)
@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_overlong_samples_are_truncated_or_dropped_and_counted(tmp_path, overlong):
    shards = make_shards(tmp_path, 30, 10)
    # synthetic rows are 11-20 tokens with the compact template: 15 splits them
    cfg = config(shards, seq_len=15, overlong=overlong, packing=True, pack_scope="micro_batch")
    s = stream(cfg)
    steps = [next(it) for it in [iter(s)] for _ in range(s.steps_per_epoch)]
    m = s.metrics()
    assert m["rows_read"] == 30 == m["rows_kept"] + m.get("rows_skipped", 0)
    assert all(micro["input_ids"].shape[1] <= 15 for step in steps for micro in step)
    if overlong == "truncate":
        assert m["truncated"] > 0 and m["rows_kept"] == 30
    else:
        assert m["skipped_too_long"] > 0 and m["rows_skipped"] == m["skipped_too_long"]
        assert "truncated" not in m
    assert 0 < m["packing_efficiency"] <= 1


def test_fast_token_ids_match_the_tokenizer_call():
    from data.templates import token_ids

    tok = char_tokenizer()
    for text in ("### Instruction:\nupper abc\n\n### Response:\nABC", "a</s>b<s> \n\t~", ""):
        assert token_ids(tok, text) == tok(text, add_special_tokens=False)["input_ids"]


def test_a_packed_sample_is_not_scored_on_the_next_samples_first_token():
    """Text rows with a tokenizer that adds no BOS: every token is a label, the first included.
    Alone, a sample's first label is never a target (nothing predicts it); packed, the last
    token of the sample before it must not be scored on it either: the loss and the scored
    count of a packed row are the sums of its samples' own."""
    from trainer.model.attention_inputs import attention_mode, model_inputs
    from trainer.model.loss import count_target_tokens, token_loss_sum

    g = torch.Generator().manual_seed(0)
    samples = [
        TokenizedSample(ids, list(ids))
        for ids in (torch.randint(3, 90, (n,), generator=g).tolist() for n in (7, 11, 5))
    ]
    assert all(s.labels[0] != IGNORE_INDEX for s in samples)
    batch = pack(list(enumerate(samples)), 64, pad_id=0)
    assert batch["input_ids"].shape[0] == 1, "the test needs the samples in one row"
    model = tiny_llama()
    with torch.no_grad():
        inputs = model_inputs(batch, torch.device("cpu"), attention_mode(model))
        packed = token_loss_sum(model(**inputs, use_cache=False).logits, batch["targets"])
        alone = [pack([(i, s)], 64, pad_id=0) for i, s in enumerate(samples)]
        want = sum(
            token_loss_sum(model(input_ids=b["input_ids"], use_cache=False).logits, b["targets"])
            for b in alone
        )
    assert int(count_target_tokens(batch["targets"])) == sum(len(s) - 1 for s in samples)
    assert int(count_target_tokens(batch["targets"])) == sum(s.num_target_tokens for s in samples)
    torch.testing.assert_close(packed, want, rtol=1e-5, atol=0)
