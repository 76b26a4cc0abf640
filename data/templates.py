"""Turn one data row into token ids and labels, with the loss on the response only by default.

Labels follow the Hugging Face convention: aligned with `input_ids`, -100 wherever no loss is
taken. The collators shift them once, per sample, into the batches' `targets`
(`TokenizedSample.targets`); no loss shifts again.

A row is rendered to one text and tokenized once, whole: the ids are those inference sees for
the same text. Which tokens carry the loss follows from character offsets (the response, each
assistant turn), never from tokenizing pieces apart: SentencePiece/Metaspace tokenizers (Llama-2,
Mistral, Gemma) would put a `▁` at every piece boundary, ids the model never sees at inference.
BOS comes first when the tokenizer adds one itself (`add_bos_token`), whatever its `bos_token`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from data.chat import (
    ChatTemplateError,
    assistant_spans,
    chat_template_for,
    render,
    special_prefix,
    turn_layout,
)

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
    """One sample's tokens. `labels[i]` is the label of token i, unshifted as in HF (position i
    is scored on `labels[i + 1]`); the collators shift them once, per sample (`targets`).

    `end_of_turn`: the ids that end the sample's (last) answer, as they stand at the end of its
    last labelled span: EOS for instruction and text rows, the template's end-of-turn marker
    (`<|im_end|>`, `<|eot_id|>`) for chat rows; () when there is none. Evaluation stops
    generation at it and strips it from the reference."""

    input_ids: list[int]
    labels: list[int]
    end_of_turn: tuple[int, ...] = ()
    # Segment ids of a sentence pair (BERT's 0 for the first text, 1 for the second), as the
    # tokenizer gives them; None where every one is 0 (the models' default).
    token_type_ids: list[int] | None = None
    # Cut to data.seq_len by its encoder (a classification row: the tokenizer truncates a pair
    # itself, keeping the closing [SEP]); counted as truncated like a row the reader cuts.
    cut: bool = False
    # True: `labels` are next-token targets, shifted by the collator (`targets`). False: a
    # classification row, whose class id is scored where it stands.
    next_token: bool = True

    def __len__(self) -> int:
        return len(self.input_ids)

    def targets(self) -> list[int]:
        """What each position is scored on, the batches' `targets`: for a causal LM, the label of
        the next position (the last position scores nothing). Shifting here, per sample, rather
        than in the loss over a whole row keeps a packed row's samples apart: the last token of
        one sample is never scored on the first token of the next, and a sample's count of
        scored tokens is the same packed or alone."""
        if not self.next_token:
            return list(self.labels)
        return [*self.labels[1:], IGNORE_INDEX] if self.labels else []

    @property
    def num_target_tokens(self) -> int:
        """Positions scored (as in `targets`): a first label is never a next-token target."""
        labels = self.labels[1:] if self.next_token else self.labels
        return sum(1 for x in labels if x != IGNORE_INDEX)


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


def _tokenize(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]] | None]:
    """The ids of `text` (no special tokens added) and each token's character range, when the
    tokenizer gives ranges (fast tokenizers do)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        enc = backend.encode(text, add_special_tokens=False)
        return enc.ids, enc.offsets
    return tokenizer(text, add_special_tokens=False)["input_ids"], None


def _token_ranges(
    tokenizer: Any,
    text: str,
    ids: list[int],
    offsets: list[tuple[int, int]] | None,
    chars: list[tuple[int, int]],
) -> list[tuple[int, int]]:
    """Token ranges [i, j) of `ids` (the tokens of `text`) covering the character ranges `chars`
    (ascending, disjoint). A token that straddles a range's start belongs to the range: the
    model has to emit it. Without offsets (slow tokenizers) a boundary is where the tokens of
    the text before it stop agreeing with the tokens of the whole text."""
    ranges = []
    if offsets is not None:
        k, n = 0, len(ids)
        for start, end in chars:
            while k < n and offsets[k][1] <= start and offsets[k][0] < start:
                k += 1
            first = k
            while k < n and offsets[k][0] < end:
                k += 1
            ranges.append((first, k))
        return ranges

    def boundary(pos: int) -> int:
        head = token_ids(tokenizer, text[:pos])
        n = 0
        while n < len(head) and n < len(ids) and head[n] == ids[n]:
            n += 1
        return n

    return [(boundary(start), boundary(end)) for start, end in chars]


def _sample(
    prefix: list[int],
    ids: list[int],
    ranges: list[tuple[int, int]],
    end_of_turn: tuple[int, ...],
    *,
    loss_everywhere: bool,
) -> TokenizedSample:
    """`prefix` (the tokenizer's BOS, no loss) + `ids`, the loss on `ranges` of `ids`, or on all
    of them with `loss_everywhere`. A prefix that `ids` already start with (a template that
    renders BOS itself) is not repeated."""
    if loss_everywhere:
        labels = list(ids)
    else:
        labels = [IGNORE_INDEX] * len(ids)
        for i, j in ranges:
            labels[i:j] = ids[i:j]
    n = len(prefix)
    if n and ids[:n] == prefix:
        labels[:n] = [IGNORE_INDEX] * n
    elif n:
        ids, labels = [*prefix, *ids], [IGNORE_INDEX] * n + labels
    return TokenizedSample(input_ids=ids, labels=labels, end_of_turn=end_of_turn)


def encode_prompt_response(
    tokenizer: Any, prompt: str, response: str, *, loss_on_prompt: bool = False
) -> TokenizedSample:
    """Tokenize prompt + response as one text, then EOS; BOS first if the tokenizer adds one.
    The loss is on the tokens of the response (one that straddles the seam included) and EOS."""
    text = prompt + response
    ids, offsets = _tokenize(tokenizer, text)
    ranges = _token_ranges(tokenizer, text, ids, offsets, [(len(prompt), len(text))])
    eos = tokenizer.eos_token_id
    ids.append(eos)
    ranges = [(i, j + 1) for i, j in ranges]
    sample = _sample(special_prefix(tokenizer), ids, ranges, (eos,), loss_everywhere=False)
    if loss_on_prompt:  # BOS included: position 0 is never a target after the shift anyway
        sample.labels = list(sample.input_ids)
    return sample


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

FORMATS = ("instruction", "text", "chat", "classification")
# Roles a template is given; `data.role_map` renames others (ShareGPT's human/gpt) to these.
ROLES = ("system", "user", "assistant", "tool")


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
    """Plain text: BOS (if the tokenizer adds one) + text + EOS, loss on every token but BOS."""
    eos = tokenizer.eos_token_id
    ids = token_ids(tokenizer, text) + [eos]
    return _sample(special_prefix(tokenizer), ids, [], (eos,), loss_everywhere=True)


CHAT_TEMPLATE_HINT = (
    "the chat template rejects these conversations, or their assistant turns cannot be found "
    "in its output; data.chat_template overrides it (a Jinja file, or fallback / chatml / llama3)"
)


def encode_chat(
    tokenizer: Any,
    messages: list[dict[str, str]],
    *,
    template: str | None = None,
    loss_on_prompt: bool = False,
) -> TokenizedSample:
    """Render `messages` ({role, content} dicts) with `template` (default: the tokenizer's
    own, else data.chat.FALLBACK_CHAT_TEMPLATE) and put the loss on assistant turns only, unless
    `loss_on_prompt`.

    The conversation is rendered once and tokenized once; each assistant turn's tokens, from
    the end of its header through its end-of-turn marker (data.chat.assistant_spans), carry the
    loss. A conversation the template rejects, or whose assistant turns cannot be found in the
    rendering, is a `bad_chat` row.
    """
    template = template or chat_template_for(tokenizer)
    try:
        text = render(tokenizer, template, messages, generation_prompt=False)
        spans = assistant_spans(text, messages, turn_layout(tokenizer, template))
    except ChatTemplateError as e:
        raise RowError("bad_chat", str(e), CHAT_TEMPLATE_HINT) from None
    ids, offsets = _tokenize(tokenizer, text)
    ranges = _token_ranges(tokenizer, text, ids, offsets, [(s.start, s.end) for s in spans])
    end_of_turn: tuple[int, ...] = ()
    last = spans[-1] if spans else None
    if last is not None and last.marker < last.end:
        ((i, j),) = _token_ranges(tokenizer, text, ids, offsets, [(last.marker, last.end)])
        end_of_turn = tuple(ids[i:j])
    return _sample(
        special_prefix(tokenizer), ids, ranges, end_of_turn, loss_everywhere=loss_on_prompt
    )


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
        role = cfg.role_map.get(role, role)
        if role not in ROLES and role not in cfg.role_map.values():
            raise RowError(
                "bad_chat",
                f"{key}[{j}] has role {role!r}",
                f"roles must be {' / '.join(ROLES)} after data.role_map={cfg.role_map} renames "
                "them; add the data's roles to it",
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
            other = ""
            if looks_instruction:
                other = " (instruction rows? data.format=instruction)"
            elif isinstance(row.get("conversations"), list):
                other = (
                    " (ShareGPT rows? data.messages_field=conversations data.role_key=from "
                    "data.content_key=value)"
                )
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
        [cfg.text_field]
        if cfg.format == "text"
        else [cfg.text_field, cfg.label_field]
        if cfg.format == "classification"
        else [cfg.instruction_field, cfg.response_field]
    )
    if all(f in row for f in fields):
        return ""  # the keys match; a value is null: the row's fault, not the config's
    if cfg.format == "text":
        need = f"data.text_field={cfg.text_field!r}"
    elif cfg.format == "classification":
        need = f"data.text_field={cfg.text_field!r} / data.label_field={cfg.label_field!r}"
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


def label_value(value: Any) -> Any:
    """A row's label as a name or an id: a boolean is the name "false"/"true", a float with no
    fraction (1.0, as pandas writes integer columns with gaps) the integer id. Anything else is
    returned as it is."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def label_id(value: Any, labels: list[str] | None, key: str) -> int:
    """The class id of a row's label: a string (or boolean) is a name of `labels`, an integer its
    id.
    RowError(missing_field / wrong_type / unknown_label) otherwise."""
    if value is None:
        raise RowError("missing_field", f"missing field '{key}'")
    if labels is None:  # discovery has not run (data.labels unset outside a training run)
        raise RowError("unknown_label", f"label {value!r}: data.labels is not set")
    value = label_value(value)
    if not isinstance(value, int | str):
        raise RowError(
            "wrong_type",
            f"field '{key}' must be a string, an integer or a boolean, got {value!r}",
        )
    if isinstance(value, int):
        if 0 <= value < len(labels):
            return value
        raise RowError("unknown_label", f"label {value} is not an id of the {len(labels)} labels")
    try:
        return labels.index(value)
    except ValueError:
        shown = ", ".join(labels[:8]) + (", ..." if len(labels) > 8 else "")
        raise RowError(
            "unknown_label", f"label {value!r} is not one of data.labels ({shown})"
        ) from None


def encode_classification(row: dict[str, Any], tokenizer: Any, cfg: Any) -> TokenizedSample:
    """A classification row: the text (and the optional pair) tokenized as the tokenizer does
    for a pair ([CLS] a [SEP] b [SEP] for BERT), and the class id carried at the last position
    of `labels` (-100 elsewhere), so that padding, truncation, batching and the per-example
    count (one target per row; classification targets are not shifted) work as for the other formats.
    The loss reads each row's one label (`labels.max(1)`)."""
    text = _text_field(row, cfg.text_field)
    pair = _text_field(row, cfg.text_pair_field) if cfg.text_pair_field else None
    target = label_id(row.get(cfg.label_field), cfg.labels, cfg.label_field)
    enc = tokenizer(text, pair)
    cut = len(enc["input_ids"]) > cfg.seq_len
    if cut:
        if cfg.overlong == "drop":
            raise RowError(
                "too_long",
                f"{len(enc['input_ids'])} tokens > data.seq_len",
                f"rows are longer than data.seq_len={cfg.seq_len} (data.overlong=drop)",
            )
        enc = tokenizer(text, pair, truncation=True, max_length=cfg.seq_len)
    ids = list(enc["input_ids"])
    # The pair's segment ids, as the tokenizer makes them for inference too (a pipeline, the
    # ONNX export): a model trained without them would be served other inputs than it learned.
    types = list(enc.get("token_type_ids") or [])
    types = types if any(types) else None
    return TokenizedSample(
        ids,
        [IGNORE_INDEX] * (len(ids) - 1) + [target],
        token_type_ids=types,
        cut=cut,
        next_token=False,
    )


def truncated(sample: TokenizedSample, seq_len: int) -> TokenizedSample:
    """`sample` cut to its first `seq_len` positions (data.overlong=truncate)."""
    types = sample.token_type_ids
    return dataclasses.replace(
        sample,
        input_ids=sample.input_ids[:seq_len],
        labels=sample.labels[:seq_len],
        token_type_ids=None if types is None else types[:seq_len],
        cut=True,
    )


def _encode(row: dict[str, Any], tokenizer: Any, cfg: Any) -> TokenizedSample:
    if cfg.format == "classification":
        return encode_classification(row, tokenizer, cfg)
    if cfg.format == "text":
        return encode_text(tokenizer, _text_field(row, cfg.text_field))
    if cfg.format == "chat":
        return encode_chat(
            tokenizer,
            _messages(row, cfg),
            template=chat_template_for(tokenizer, cfg.chat_template),
            loss_on_prompt=cfg.loss_on_prompt,
        )
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
