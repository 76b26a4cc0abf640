"""Chat data as it comes: ShareGPT rows, templates that are not prefix-stable (Phi-3.5, Qwen3),
`data.chat_template`, the template saved with the model, and exact-match eval of chat rows."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from data.chat import assistant_spans, chat_template_for, render, turn_layout
from data.loader import DataError, InstructionDataset, build_map_style, use_training_template
from data.templates import IGNORE_INDEX, RowError, encode_row
from tests.data_fixtures import config
from tests.launcher import run_ranks
from tests.real_tokenizers import PHI35_TEMPLATE, QWEN3_TEMPLATE, load
from tests.tiny_models import CPU1, tiny_llama
from trainer.evaluate import eval_exact_match, model_stop_ids, split_prompt_reference

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def turns(sample, tok) -> list[str]:
    """The decoded runs of labelled tokens: one per assistant turn."""
    runs, run = [], []
    for label in [*sample.labels, IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            run.append(label)
        elif run:
            runs.append(tok.decode(run))
            run = []
    return runs


def conversation(rng: random.Random, num_turns: int, think: bool = False) -> list[dict]:
    """A system message and `num_turns` user/assistant exchanges of arithmetic; with `think`,
    answers carry a `<think>` block (Qwen3 drops it from all but the last turn)."""
    messages = [{"role": "system", "content": "You add numbers."}]
    for _ in range(num_turns):
        a, b = rng.randrange(100), rng.randrange(100)
        answer = f"{a} plus {b} is {a + b}."
        if think:
            answer = f"<think>\n{a}+{b}\n</think>\n\n{answer}"
        messages += [
            {"role": "user", "content": f"What is {a}+{b}?"},
            {"role": "assistant", "content": answer},
        ]
    return messages


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------
# ShareGPT rows and roles

SHAREGPT = {
    "conversations": [
        {"from": "system", "value": "Be brief."},
        {"from": "human", "value": "Say hello."},
        {"from": "gpt", "value": "Hello!"},
        {"from": "human", "value": "And goodbye?"},
        {"from": "gpt", "value": "Goodbye!"},
    ]
}
SHAREGPT_KEYS = {"messages_field": "conversations", "role_key": "from", "content_key": "value"}


def test_sharegpt_rows_train_with_the_default_role_map(tmp_path):
    tok = load("qwen2")
    path = jsonl(tmp_path / "train.jsonl", [SHAREGPT] * 8)
    cfg = config(path, format="chat", seq_len=256, **SHAREGPT_KEYS)
    batches = build_map_style(
        cfg, str(path), tok, rank=0, world_size=1, micro_batch_size=4, grad_accum_steps=1, seed=0
    )
    step = next(iter(batches))
    assert batches.metrics()["rows_kept"] == 4 and "rows_skipped" not in batches.metrics()
    sample = batches.dataset.samples[0]
    assert turns(sample, tok) == ["Hello!<|im_end|>", "Goodbye!<|im_end|>"]
    text = tok.decode(sample.input_ids)
    assert "<|im_start|>user\nSay hello.<|im_end|>" in text  # human -> user
    assert "<|im_start|>assistant\nHello!<|im_end|>" in text  # gpt -> assistant
    assert int((step[0]["targets"] != IGNORE_INDEX).sum()) == 4 * sample.num_target_tokens


def test_roles_outside_the_map_are_bad_chat_rows_naming_the_role_map():
    tok = load("qwen2")
    row = {"conversations": [*SHAREGPT["conversations"][:2], {"from": "bot", "value": "Hi"}]}
    cfg = config("unused", format="chat", **SHAREGPT_KEYS)
    with pytest.raises(RowError, match=r"conversations\[2\] has role 'bot'") as e:
        encode_row(row, tok, cfg)
    assert e.value.kind == "bad_chat" and "data.role_map" in e.value.hint
    role_map = {"human": "user", "bot": "assistant"}
    mapped = config("unused", format="chat", role_map=role_map, **SHAREGPT_KEYS)
    assert turns(encode_row(row, tok, mapped), tok) == ["Hi<|im_end|>"]


def test_sharegpt_rows_read_with_the_default_keys_get_a_hint():
    with pytest.raises(RowError) as e:
        encode_row(SHAREGPT, load("gpt-2"), config("unused", format="chat"))
    assert e.value.kind == "missing_field"
    assert e.value.hint.endswith(
        "(ShareGPT rows? data.messages_field=conversations data.role_key=from "
        "data.content_key=value)"
    )


# ---------------------------------------------------------------------------------------------
# Templates that are not prefix-stable


def prefix_stable(tok, template: str, messages: list[dict]) -> bool:
    """What the old encoder required: every prefix renders as a prefix of the whole."""
    whole = render(tok, template, messages, generation_prompt=False)
    return all(
        whole.startswith(render(tok, template, messages[:k], generation_prompt=False))
        for k in range(1, len(messages))
    )


@pytest.mark.parametrize(
    ("name", "template", "think"),
    [("phi-3", PHI35_TEMPLATE, False), ("qwen2", QWEN3_TEMPLATE, True)],
    ids=["phi-3.5", "qwen3"],
)
def test_phi35_and_qwen3_multi_turn_rows_encode_and_mask_exactly_the_assistant_turns(
    name, template, think
):
    tok = load(name)
    text = template.read_text(encoding="utf-8")
    rng = random.Random(0)
    convs = [conversation(rng, 2 + i % 2, think) for i in range(100)]
    assert not any(prefix_stable(tok, text, c) for c in convs[:10])  # refused before
    cfg = config("unused", format="chat", chat_template=str(template), seq_len=1024)
    records = ((f"row:{i}", json.dumps({"messages": c}).encode()) for i, c in enumerate(convs))
    dataset = InstructionDataset("rows", tok, cfg, records)
    assert dataset.counts["rows_kept"] == 100 and not dataset.counts["rows_skipped"]
    end = "<|end|>" if name == "phi-3" else "<|im_end|>"
    for conv, sample in zip(convs, dataset.samples, strict=True):
        answers = [m["content"] for m in conv if m["role"] == "assistant"]
        if think:  # Qwen3 keeps the think block of the last turn only
            answers = [a.split("</think>\n\n")[1] for a in answers[:-1]] + answers[-1:]
        assert turns(sample, tok) == [a + end for a in answers]


def test_a_rewritten_turn_is_not_matched_to_a_later_copy_of_its_content():
    """Qwen3 renders an earlier turn's answer without its think block; the full content then
    appears only in the last turn, which must not be taken for the earlier one."""
    tok = load("qwen2")
    answer = "<think>\n1+1\n</think>\n\n2."
    conv = [
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "Again: 1+1?"},
        {"role": "assistant", "content": answer},
    ]
    cfg = config("unused", format="chat", chat_template=str(QWEN3_TEMPLATE), seq_len=512)
    assert turns(encode_row({"messages": conv}, tok, cfg), tok) == [
        "2.<|im_end|>",
        answer + "<|im_end|>",
    ]


# ---------------------------------------------------------------------------------------------
# data.chat_template and the template saved with the model


@pytest.mark.parametrize(
    ("name", "setting"),
    [("gpt-2", None), ("qwen2", str(QWEN3_TEMPLATE)), ("phi-3", "chatml"), ("phi-3", "llama3")],
    ids=["gpt-2-fallback", "qwen2-qwen3-file", "phi-3-chatml", "phi-3-llama3"],
)
def test_the_saved_tokenizer_reproduces_the_training_format(tmp_path, name, setting):
    """The template training used (the fallback for GPT-2, which has none; an override) is
    what the saved tokenizer renders, and `apply_chat_template` gives the training ids."""
    tok = load(name)
    convs = [conversation(random.Random(i), 2) for i in range(4)]
    path = jsonl(tmp_path / "train.jsonl", [{"messages": c} for c in convs])
    cfg = config(path, format="chat", chat_template=setting, seq_len=512)
    batches = build_map_style(
        cfg, str(path), tok, rank=0, world_size=1, micro_batch_size=2, grad_accum_steps=1, seed=0
    )
    tok.save_pretrained(tmp_path / "model")
    saved = AutoTokenizer.from_pretrained(tmp_path / "model")
    assert saved.chat_template == chat_template_for(load(name), setting)
    for conv, sample in zip(convs, batches.dataset.samples, strict=True):
        assert saved.apply_chat_template(conv, tokenize=True)["input_ids"] == sample.input_ids
        # the generation prompt is the training text up to the last answer
        prompt, _ = split_prompt_reference(sample)
        inference = saved.apply_chat_template(conv[:-1], add_generation_prompt=True)
        assert inference["input_ids"] == prompt


def _train(argv: list[str]) -> dict:
    from launch.train import run

    return run(argv)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_model_trained_with_the_fallback_template_is_saved_with_it(tmp_path):
    """Through the CLI: GPT-2's tokenizer has no chat template; RUN_DIR/model gets the one the
    run trained with, and its `apply_chat_template` gives the training ids."""
    tok = load("gpt-2")
    assert tok.chat_template is None
    model_dir = tmp_path / "base"
    tiny_llama(vocab=len(tok), hidden=16, heads=2, layers=1).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    convs = [conversation(random.Random(i), 1 + i % 2) for i in range(16)]
    jsonl(tmp_path / "train.jsonl", [{"messages": c} for c in convs])
    run_dir = tmp_path / "run"
    argv = [
        str(CONFIGS / "tiny.yaml"),
        f"run_dir={run_dir}",
        f"model.name_or_path={model_dir}",
        f"data.train_path={tmp_path / 'train.jsonl'}",
        f"data.eval_path={tmp_path / 'train.jsonl'}",
        "data.format=chat",
        "data.seq_len=128",
        "train.max_steps=2",
        "eval.num_generate=4",
        "eval.max_new_tokens=4",
    ]
    (summary,) = run_ranks(_train, 1, argv, timeout=240)
    assert summary["steps"] == 2
    saved = AutoTokenizer.from_pretrained(run_dir / "model")
    assert saved.chat_template == chat_template_for(tok)
    cfg = config("unused", format="chat", seq_len=128)
    for conv in convs:
        expected = encode_row({"messages": conv}, load("gpt-2"), cfg).input_ids
        assert saved.apply_chat_template(conv, tokenize=True)["input_ids"] == expected
    # ... and so does an export of its checkpoint.
    from launch.export import main as export_main

    out = tmp_path / "exported"
    assert export_main([str(run_dir / "checkpoints"), "--output", str(out)]) == 0
    assert AutoTokenizer.from_pretrained(out).chat_template == saved.chat_template


def test_phi35_renders_eos_only_without_a_generation_prompt():
    """The layout is learned from the template: Phi-3.5 ends a conversation with EOS (not part
    of any turn) and a generation prompt instead of EOS when asked for one."""
    tok = load("phi-3")
    template = chat_template_for(tok)
    layout = turn_layout(tok, template)
    assert (layout.header, layout.end) == ("assistant|>\n", "<|end|>")
    conv = conversation(random.Random(0), 2)
    text = render(tok, template, conv, generation_prompt=False)
    assert text.endswith("<|end|>\n<|endoftext|>")
    spans = assistant_spans(text, conv, layout)
    assert [text[s.start : s.end] for s in spans] == [
        m["content"] + "<|end|>" for m in conv if m["role"] == "assistant"
    ]


def test_a_chat_template_that_cannot_be_used_stops_the_run_naming_the_key(tmp_path):
    path = jsonl(tmp_path / "train.jsonl", [{"messages": conversation(random.Random(0), 1)}])
    missing = tmp_path / "nope.jinja"
    with pytest.raises(DataError, match=r"^data\.chat_template: .*nope\.jinja: no such file"):
        use_training_template(
            config(path, format="chat", chat_template=str(missing)), load("gpt-2")
        )
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}{{ m.content }}", encoding="utf-8")
    with pytest.raises(DataError, match=r"^data\.chat_template: .*not valid Jinja"):
        use_training_template(config(path, format="chat", chat_template=str(broken)), load("gpt-2"))


def test_a_conversation_whose_turns_cannot_be_found_is_a_bad_chat_row_with_a_hint():
    tok = load("gpt-2")
    tok.chat_template = "{% for m in messages %}{{ m.content | upper }}{% endfor %}"
    conv = conversation(random.Random(0), 1)
    with pytest.raises(RowError, match="message 2 .assistant.") as e:
        encode_row({"messages": conv}, tok, config("unused", format="chat"))
    assert e.value.kind == "bad_chat" and "data.chat_template" in e.value.hint


def test_tokenizers_without_offsets_get_the_same_ids_and_mask():
    """A tokenizer without a Rust backend (no offsets) finds boundaries by tokenizing prefixes."""

    class NoOffsets:  # the tokenizer's interface, minus backend_tokenizer
        def __init__(self, tok):
            self._tok = tok

        def __getattr__(self, name):
            if name == "backend_tokenizer":
                raise AttributeError(name)
            return getattr(self._tok, name)

        def __call__(self, *args, **kwargs):
            return self._tok(*args, **kwargs)

    for name in ("phi-3", "qwen2"):
        tok = load(name)
        rows = [
            ({"messages": conversation(random.Random(1), 2)}, config("u", format="chat")),
            ({"instruction": "Say ok.", "response": "ok"}, config("u", template="alpaca")),
        ]
        for row, cfg in rows:
            assert encode_row(row, NoOffsets(tok), cfg) == encode_row(row, tok, cfg)


# ---------------------------------------------------------------------------------------------
# Exact-match eval of chat rows


class ForcedModel(torch.nn.Module):
    """A real tiny Llama whose greedy generation is forced, after each prompt, to emit a planned
    continuation: HF `generate` with its stopping and padding, on chosen tokens."""

    def __init__(self, vocab: int, stop_ids: list[int], plans: dict[tuple, list[int]]):
        super().__init__()
        self.model = tiny_llama(vocab=vocab, hidden=16, heads=2, layers=1)
        self.model.generation_config.eos_token_id = stop_ids
        self.generation_config = self.model.generation_config
        self.plans = plans

    def generate(self, input_ids, attention_mask, **kwargs):
        width = input_ids.shape[1]
        prompts = [
            tuple(r[m.bool()].tolist()) for r, m in zip(input_ids, attention_mask, strict=True)
        ]

        def allowed(row: int, sent: torch.Tensor) -> list[int]:
            plan = self.plans[prompts[row]]
            step = len(sent) - width
            return [plan[step] if step < len(plan) else kwargs["pad_token_id"]]

        return self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            prefix_allowed_tokens_fn=allowed,
            **kwargs,
        )


@pytest.mark.parametrize(
    ("name", "model_stops"),
    # a base Qwen2: EOS <|endoftext|>, its config does not list ChatML's <|im_end|>
    [("qwen2", ["<|endoftext|>"]), ("llama3-style", ["<|end_of_text|>", "<|eot_id|>"])],
)
def test_chat_exact_match_scores_the_assistant_turn(name, model_stops):
    tok = load(name)
    cfg = config("unused", format="chat", seq_len=512)
    samples = [
        encode_row({"messages": conversation(random.Random(i), 1 + i % 3)}, tok, cfg)
        for i in range(6)
    ]
    stops = tok.convert_tokens_to_ids(model_stops)
    junk = tok("\n<|im_start|>user\nMore?", add_special_tokens=False)["input_ids"]
    right, wrong = {}, {}
    for s in samples:
        prompt, reference = split_prompt_reference(s)
        # the last assistant turn only: no end-of-turn, no later user turn
        assert tok.decode(reference).endswith(".") and "user" not in tok.decode(reference)
        # what a model that learnt the format emits: the answer, its end-of-turn, then more
        right[tuple(prompt)] = reference + list(s.end_of_turn) + junk
        wrong[tuple(prompt)] = reference[:-1] + list(s.end_of_turn) + junk
    for plans, accuracy in ((right, 1.0), (wrong, 0.0)):
        model = ForcedModel(len(tok), stops, plans)
        assert model_stop_ids(model, tok.eos_token_id) == {tok.eos_token_id, *stops}
        result = eval_exact_match(
            model,
            samples,
            CPU1,
            num_samples=len(samples),
            max_new_tokens=64,
            pad_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
            eos_id=tok.eos_token_id,
            batch_size=4,
        )
        assert result["eval/accuracy"] == accuracy


@pytest.mark.parametrize(
    ("name", "setting", "end"),
    [("qwen2", None, "<|im_end|>"), ("llama3-style", "llama3", "<|eot_id|>")],
)
def test_the_saved_generation_config_stops_at_the_end_of_turn(tmp_path, name, setting, end):
    """A base model trained on a chat template must stop at the template's end-of-turn token;
    its own generation config only knows its EOS, so the saved one gets the token added."""
    from transformers import GenerationConfig

    from data.chat import end_of_turn_id
    from trainer.build import write_hf_model

    tok = load(name)
    use_training_template(config("unused", format="chat", chat_template=setting), tok)
    eot = tok.convert_tokens_to_ids(end)
    assert end_of_turn_id(tok) == eot
    model = tiny_llama(vocab=len(tok), hidden=16, heads=2, layers=1)
    model.generation_config.eos_token_id = tok.eos_token_id
    assert eot != tok.eos_token_id  # the base model would not stop there by itself
    write_hf_model(model, model.state_dict(), tok, tmp_path, torch.float32, (eot,))
    saved = GenerationConfig.from_pretrained(tmp_path).eos_token_id
    assert saved == [tok.eos_token_id, eot]
