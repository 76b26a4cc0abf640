"""Real tokenizers (tests/assets): a row trains on the ids of its whole rendered text, the ids
inference sees, and the loss mask covers exactly the response (instruction rows) or each
assistant turn's content plus its end-of-turn token (chat rows)."""

from __future__ import annotations

import pytest

from data.chat import chat_template_for
from data.templates import IGNORE_INDEX, encode_row, render_instruction_prompt
from tests.data_fixtures import config
from tests.real_tokenizers import NAMES, QWEN3_TEMPLATE, load

INSTRUCTION_ROWS = [
    {"instruction": "Say ok.", "response": "ok"},
    {"instruction": "2+2=", "context": "Arithmetic, in words.", "response": "four, exactly"},
    {"instruction": "Greet in German.", "response": "Grüße! 🙂\n- und mehr"},
    {"instruction": "Indent it.", "response": "  two spaces first"},
]

CONVERSATION = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Say hello."},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "4, I think."},
]


def text_tokens(tok, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], enc["offset_mapping"]


def labelled_text(sample, text: str, offsets, *, after: int = 0) -> str:
    """The characters of `text` under the labelled tokens of `sample`: BOS (if added), the tokens
    of `text`, then `after` more tokens (EOS)."""
    shift = len(sample.input_ids) - after - len(offsets)
    # byte-fallback tokens of one character share its range: count it once
    ranges = dict.fromkeys(
        o for i, o in enumerate(offsets) if sample.labels[shift + i] != IGNORE_INDEX
    )
    return "".join(text[s:e] for s, e in ranges)


@pytest.mark.parametrize("name", NAMES)
def test_instruction_rows_train_on_the_ids_of_the_whole_text(name):
    tok = load(name)
    cfg = config("unused", template="alpaca", seq_len=512)
    for row in INSTRUCTION_ROWS:
        sample = encode_row(row, tok, cfg)
        prompt = render_instruction_prompt(row["instruction"], row.get("context"), "alpaca")
        text = prompt + row["response"]
        # what inference sees: the tokenizer's own encoding (BOS only where it adds one)
        assert sample.input_ids == tok(text)["input_ids"] + [tok.eos_token_id]
        ids, offsets = text_tokens(tok, text)
        # the response and EOS carry the loss, nothing of the prompt
        assert labelled_text(sample, text, offsets, after=1) == row["response"]
        assert sample.labels[-1] == tok.eos_token_id
        assert sample.num_target_tokens == 1 + sum(s >= len(prompt) for s, _ in offsets)
        assert all(
            label in (IGNORE_INDEX, token)
            for label, token in zip(sample.labels, sample.input_ids, strict=True)
        )
        assert sample.end_of_turn == (tok.eos_token_id,)
    if name == "gpt-2":  # has a bos_token but does not add it: neither does training
        assert tok.bos_token_id is not None and sample.input_ids[0] != tok.bos_token_id


def test_metaspace_tokenizer_puts_a_seam_where_pieces_meet():
    """Why rows are tokenized whole: Phi-3's SentencePiece tokenizer spells a response alone
    with a leading `▁`, which it never does inside the text inference sees."""
    tok = load("phi-3")
    prompt = render_instruction_prompt("Say ok.", None, "alpaca")
    apart = tok(prompt)["input_ids"] + tok("ok", add_special_tokens=False)["input_ids"]
    whole = tok(prompt + "ok")["input_ids"]
    assert apart != whole
    assert tok.convert_ids_to_tokens(apart[-1:]) == ["▁ok"]
    assert tok.convert_ids_to_tokens(whole[-1:]) == ["ok"]
    cfg = config("unused", template="alpaca", seq_len=512)
    sample = encode_row({"instruction": "Say ok.", "response": "ok"}, tok, cfg)
    assert sample.input_ids[:-1] == whole


# (tokenizer, data.chat_template, end-of-turn marker, what the last assistant turn renders)
CHAT_CASES = [
    ("phi-3", None, "<|end|>", "4, I think."),  # its own: Phi-3.5-mini-instruct's
    ("qwen2", None, "<|im_end|>", "4, I think."),  # its own: Qwen2.5-Instruct's ChatML
    # Qwen3 puts an (empty) think block in the last turn; the turn's tokens include it
    ("qwen2", str(QWEN3_TEMPLATE), "<|im_end|>", "<think>\n\n</think>\n\n4, I think."),
    ("llama3-style", None, "<|eot_id|>", "4, I think."),  # its own: the llama3 built-in
    ("gpt-2", None, "<|endoftext|>", "4, I think."),  # none of its own: the fallback
    ("phi-3", "chatml", "<|im_end|>", "4, I think."),  # markers that are plain text here
    ("qwen2", "fallback", "<|endoftext|>", "4, I think."),  # named instead of its own
]


@pytest.mark.parametrize(
    ("name", "setting", "end", "last_turn"),
    CHAT_CASES,
    ids=["phi-3.5", "qwen2.5", "qwen3-file", "llama3", "gpt-2", "phi-3-chatml", "qwen2-fallback"],
)
def test_chat_rows_train_on_the_ids_of_the_rendered_conversation(name, setting, end, last_turn):
    tok = load(name)
    cfg = config("unused", format="chat", chat_template=setting, seq_len=512)
    sample = encode_row({"messages": CONVERSATION}, tok, cfg)
    template = chat_template_for(tok, setting)
    text = tok.apply_chat_template(CONVERSATION, chat_template=template, tokenize=False)
    rendered_bos = tok.bos_token is not None and text.startswith(tok.bos_token)
    assert sample.input_ids == tok(text, add_special_tokens=not rendered_bos)["input_ids"]
    if rendered_bos or tok("a")["input_ids"] == tok("a", add_special_tokens=False)["input_ids"]:
        # no BOS for training to add: exactly what apply_chat_template gives inference
        inference = tok.apply_chat_template(CONVERSATION, chat_template=template, tokenize=True)
        assert sample.input_ids == inference["input_ids"]
    _, offsets = text_tokens(tok, text)
    # each assistant turn's content and end-of-turn marker; no header, no newline after it
    assert labelled_text(sample, text, offsets) == f"Hello!{end}{last_turn}{end}"
    runs = "".join("x" if label != IGNORE_INDEX else "." for label in sample.labels).split(".")
    assert len([r for r in runs if r]) == 2
    # the last turn's end-of-turn tokens, as they stand in the sample
    eot = list(sample.end_of_turn)
    assert [t for t in sample.labels if t != IGNORE_INDEX][-len(eot) :] == eot
    if (name, setting) != ("phi-3", "chatml"):
        assert eot == [tok.convert_tokens_to_ids(end)]  # one token generation can stop at
    else:  # spelled in plain text: several tokens, the first one `.<` (content and marker)
        assert tok.decode(eot).endswith(end) and len(eot) > 1
