"""Turn one data row into token ids and labels, with the loss on the response only by default.

Labels follow the Hugging Face convention: aligned with `input_ids` (the loss function shifts
them), and -100 wherever no loss is taken.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError

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


def token_ids(tokenizer: Any, text: str) -> list[int]:
    """`tokenizer(text, add_special_tokens=False)["input_ids"]`, faster for fast tokenizers.

    The HF call wraps the Rust tokenizer's encode in a few hundred microseconds of Python per
    call, most of the data pipeline's time for short rows; the Rust encode it delegates to gives
    the same ids.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return backend.encode(text, add_special_tokens=False).ids
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_prompt_response(
    tokenizer: Any, prompt: str, response: str, *, loss_on_prompt: bool = False
) -> TokenizedSample:
    """Tokenize prompt + response + EOS; BOS first if the tokenizer has one."""
    prompt_ids = token_ids(tokenizer, prompt)
    response_ids = token_ids(tokenizer, response)
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


# ---------------------------------------------------------------------------------------------
# Plain text and chat formats, and one entry point that validates a row of any format.

FORMATS = ("instruction", "text", "chat")

# Used when the tokenizer has no chat template of its own: ChatML-like, with the EOS token ending
# every turn so a model trained on it learns where an assistant turn stops.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


class RowError(ValueError):
    """A data row that cannot become a sample. `kind` is the counter it is counted under
    (missing_field, wrong_type, empty_text, bad_chat; data.rows adds the decoding kinds).
    `hint` names the likely cause in config terms when the row suggests one (field names that
    do not match `data.*_field`, rows of another format)."""

    def __init__(self, kind: str, message: str, hint: str = ""):
        super().__init__(message)
        self.kind = kind
        self.hint = hint


def encode_text(tokenizer: Any, text: str) -> TokenizedSample:
    """Plain text: BOS (if any) + text + EOS, loss on every token but BOS."""
    ids = token_ids(tokenizer, text) + [tokenizer.eos_token_id]
    labels = list(ids)
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id, *ids]
        labels = [IGNORE_INDEX, *labels]
    return TokenizedSample(input_ids=ids, labels=labels)


def encode_chat(
    tokenizer: Any, messages: list[dict[str, str]], *, loss_on_prompt: bool = False
) -> TokenizedSample:
    """Render `messages` ({role, content} dicts) with the tokenizer's chat template (or
    FALLBACK_CHAT_TEMPLATE) and put the loss on assistant turns only, unless `loss_on_prompt`.

    The template is rendered once per prefix of the conversation; the text an assistant message
    adds after the generation prompt (its content and end-of-turn) is what carries the loss. This
    needs a template whose renderings of a prefix are prefixes of the full rendering, which holds
    for the usual templates; one that does not is reported as a `bad_chat` row.
    """
    template = getattr(tokenizer, "chat_template", None) or FALLBACK_CHAT_TEMPLATE

    def render(msgs: list[dict[str, str]], generation_prompt: bool) -> str:
        try:
            return tokenizer.apply_chat_template(
                msgs,
                chat_template=template,
                tokenize=False,
                add_generation_prompt=generation_prompt,
            )
        except TemplateError as e:  # templates reject rows themselves (roles must alternate...)
            raise RowError("bad_chat", f"chat template: {e}") from None

    pieces: list[tuple[str, bool]] = []  # (text, carries loss)
    done = ""
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            # An empty conversation has no generation prompt to render: a leading assistant
            # turn is answer from its first character.
            head = render(messages[:i], True) if i else done
            full = render(messages[: i + 1], False)
            if not head.startswith(done) or not full.startswith(head):
                raise RowError("bad_chat", "chat template output is not prefix-stable")
            pieces += [(head[len(done) :], loss_on_prompt), (full[len(head) :], True)]
        else:
            full = render(messages[: i + 1], False)
            if not full.startswith(done):
                raise RowError("bad_chat", "chat template output is not prefix-stable")
            pieces.append((full[len(done) :], loss_on_prompt))
        done = full
    ids: list[int] = []
    labels: list[int] = []
    for text, with_loss in pieces:
        if not text:
            continue
        piece = token_ids(tokenizer, text)
        ids += piece
        labels += piece if with_loss else [IGNORE_INDEX] * len(piece)
    if tokenizer.bos_token_id is not None and (not ids or ids[0] != tokenizer.bos_token_id):
        # Templates that emit BOS themselves already start with it; others get it prepended.
        ids = [tokenizer.bos_token_id, *ids]
        labels = [IGNORE_INDEX, *labels]
    return TokenizedSample(input_ids=ids, labels=labels)


def _text_field(row: dict[str, Any], key: str, *, required: bool = True) -> str | None:
    if key not in row or row[key] is None:
        if required:
            raise RowError("missing_field", f"missing field '{key}'")
        return None
    value = row[key]
    if not isinstance(value, str):
        raise RowError("wrong_type", f"field '{key}' must be a string, got {type(value).__name__}")
    if required and not value.strip():
        raise RowError("empty_text", f"field '{key}' is empty")
    return value


def _messages(row: dict[str, Any], cfg: Any) -> list[dict[str, str]]:
    key = cfg.messages_field
    if key not in row:
        raise RowError("missing_field", f"missing field '{key}'")
    raw = row[key]
    if not isinstance(raw, list) or not raw:
        raise RowError("wrong_type", f"field '{key}' must be a non-empty list of messages")
    messages = []
    for j, m in enumerate(raw):
        if not isinstance(m, dict):
            raise RowError("wrong_type", f"{key}[{j}] must be an object, got {type(m).__name__}")
        role = m.get(cfg.role_key)
        content = m.get(cfg.content_key)
        if not isinstance(role, str) or not isinstance(content, str):
            raise RowError(
                "wrong_type", f"{key}[{j}] needs string '{cfg.role_key}' and '{cfg.content_key}'"
            )
        messages.append({"role": role, "content": content})
    answers = [m for m in messages if m["role"] == "assistant"]
    if not answers or not all(m["content"].strip() for m in answers):
        raise RowError("empty_text", f"field '{key}' has no (or an empty) assistant message")
    return messages


def _keys(obj: dict[str, Any], limit: int = 8) -> str:
    keys = sorted(map(str, obj))
    return str(keys[:limit])[:-1] + ", ...]" if len(keys) > limit else str(keys)


def field_hint(row: dict[str, Any], cfg: Any) -> str:
    """Why a row lacks what `cfg.format` needs, in config terms: the row's keys against the
    `data.*_field` settings, and the format the row looks like when it is another one. Every row
    of a data set failing the same way is what this names (rows all skipped, the run stopped)."""
    looks_chat = isinstance(row.get(cfg.messages_field, row.get("messages")), list)
    looks_instruction = cfg.instruction_field in row and cfg.response_field in row
    if cfg.format == "chat":
        if cfg.messages_field not in row:
            other = " (instruction rows? data.format=instruction)" if looks_instruction else ""
            return (
                f"data.format=chat needs data.messages_field={cfg.messages_field!r} (a list of "
                f"messages), but rows have keys {_keys(row)}{other}"
            )
        messages = row[cfg.messages_field]
        first = messages[0] if isinstance(messages, list) and messages else None
        if isinstance(first, dict) and not {cfg.role_key, cfg.content_key} <= set(first):
            return (
                f"messages have keys {_keys(first)} but data.role_key={cfg.role_key!r} / "
                f"data.content_key={cfg.content_key!r}"
            )
        return ""
    fields = (
        [cfg.text_field] if cfg.format == "text" else [cfg.instruction_field, cfg.response_field]
    )
    if all(f in row for f in fields):
        return ""  # the keys match; a value is null: the row's fault, not the config's
    if cfg.format == "text":
        need = f"data.text_field={cfg.text_field!r}"
    else:
        need = (
            f"data.instruction_field={cfg.instruction_field!r} / "
            f"data.response_field={cfg.response_field!r}"
        )
    other = (
        " (chat rows? data.format=chat)"
        if looks_chat
        else " (instruction rows? data.format=instruction)"
        if cfg.format == "text" and looks_instruction
        else ""
    )
    return f"rows have keys {_keys(row)} but {need}{other}"


def encode_row(row: Any, tokenizer: Any, cfg: Any) -> TokenizedSample:
    """Validate and encode one row for `cfg.format` (a `DataConfig`); raise RowError if unusable."""
    if not isinstance(row, dict):
        raise RowError("not_object", f"expected a JSON object, got {type(row).__name__}")
    try:
        return _encode(row, tokenizer, cfg)
    except RowError as e:
        # A wrong type is the row's fault, except chat messages keyed unlike data.role_key etc.
        if not e.hint and (
            e.kind == "missing_field" or (e.kind, cfg.format) == ("wrong_type", "chat")
        ):
            e.hint = field_hint(row, cfg)
        raise


def _encode(row: dict[str, Any], tokenizer: Any, cfg: Any) -> TokenizedSample:
    if cfg.format == "text":
        return encode_text(tokenizer, _text_field(row, cfg.text_field))
    if cfg.format == "chat":
        return encode_chat(tokenizer, _messages(row, cfg), loss_on_prompt=cfg.loss_on_prompt)
    if cfg.format == "instruction":
        instruction = _text_field(row, cfg.instruction_field)
        response = _text_field(row, cfg.response_field)
        context = _text_field(row, cfg.context_field, required=False) or None
        return encode_instruction(
            tokenizer,
            instruction,
            response,
            context,
            template=cfg.template,
            loss_on_prompt=cfg.loss_on_prompt,
        )
    raise ValueError(f"data.format: unknown format {cfg.format!r}; expected one of {FORMATS}")
