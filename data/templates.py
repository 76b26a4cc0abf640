"""Turn one data row into token ids and labels, with the loss on the response only by default.

Labels follow the Hugging Face convention: aligned with `input_ids` (the loss function shifts
them), and -100 wherever no loss is taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IGNORE_INDEX = -100

# The Alpaca prompt, as the Dolly fine-tuning recipes use it: one variant with an input/context
# paragraph, one without.
ALPACA_PREAMBLE = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n"
)
ALPACA_PREAMBLE_WITH_CONTEXT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
)

TEMPLATES = ("alpaca", "compact")


def render_instruction_prompt(instruction: str, context: str | None, template: str) -> str:
    """The prompt text that precedes the response, for `template` in TEMPLATES.

    `compact` drops Alpaca's preamble sentence: same structure, a fraction of the tokens, which
    matters for a character-level tokenizer on a CPU.
    """
    if template == "alpaca":
        head = ALPACA_PREAMBLE_WITH_CONTEXT if context else ALPACA_PREAMBLE
    elif template == "compact":
        head = ""
    else:
        raise ValueError(f"unknown template {template!r}; expected one of {TEMPLATES}")
    body = f"### Instruction:\n{instruction}\n\n"
    if context:
        body += f"### Input:\n{context}\n\n"
    return f"{head}{body}### Response:\n"


@dataclass
class TokenizedSample:
    """One sample's tokens. `labels[i]` is the target for position i (unshifted)."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def num_target_tokens(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def encode_prompt_response(
    tokenizer: Any, prompt: str, response: str, *, loss_on_prompt: bool = False
) -> TokenizedSample:
    """Tokenize prompt + response + EOS; BOS first if the tokenizer has one."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt_ids = [tokenizer.bos_token_id, *prompt_ids]
    response_ids = [*response_ids, tokenizer.eos_token_id]
    prompt_labels = list(prompt_ids) if loss_on_prompt else [IGNORE_INDEX] * len(prompt_ids)
    return TokenizedSample(input_ids=prompt_ids + response_ids, labels=prompt_labels + response_ids)


def encode_instruction(
    tokenizer: Any,
    instruction: str,
    response: str,
    context: str | None = None,
    *,
    template: str = "alpaca",
    loss_on_prompt: bool = False,
) -> TokenizedSample:
    """Encode an instruction-format row."""
    prompt = render_instruction_prompt(instruction, context, template)
    return encode_prompt_response(tokenizer, prompt, response, loss_on_prompt=loss_on_prompt)
