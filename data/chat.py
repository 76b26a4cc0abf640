"""Chat templates: which one a run trains with, and where each assistant turn lies in a rendered
conversation.

The template is `data.chat_template` (a file, or a name in BUILTIN_CHAT_TEMPLATES), else the
tokenizer's own, else FALLBACK_CHAT_TEMPLATE. `use_chat_template` installs it on the tokenizer,
so that the model saved at the end of a run carries the template it was trained with and
`apply_chat_template` at inference renders conversations exactly as training did.

A conversation is rendered once, whole. The loss goes on each assistant turn: from the end of
its header (`<|im_start|>assistant\\n`) through its end-of-turn marker (`<|im_end|>`). Where a
template puts these is learned once per template, by rendering a probe conversation whose
contents are placeholders (`TurnLayout`), not assumed; nothing requires the rendering of a
prefix of the conversation to be a prefix of the whole. So templates that end a conversation
with EOS unless a generation prompt follows (Phi-3.5) or rewrite earlier turns (Qwen3 drops
their `<think>` blocks) work as well as ChatML or Llama-3.
"""

from __future__ import annotations

import functools
import os.path
import weakref
from dataclasses import dataclass
from typing import Any

from jinja2 import TemplateError, TemplateSyntaxError

# Used when the tokenizer has no chat template of its own: ChatML-like, with the EOS token ending
# every turn so a model trained on it learns where an assistant turn stops.
FALLBACK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# ChatML (Qwen, many fine-tunes). `<|im_start|>` and `<|im_end|>` should be tokens of the
# vocabulary; in one without them they are plain text, which works but costs tokens.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The Llama-3 layout (headers in `<|start_header_id|>`/`<|end_header_id|>`, turns ended by
# `<|eot_id|>`), without Meta's tool-calling and date preamble.
LLAMA3_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}"
)

# `data.chat_template` names. Each is rendered after BOS when the tokenizer adds one (see
# `chat_template_for`), as real templates that start with `{{ bos_token }}` do.
BUILTIN_CHAT_TEMPLATES = {
    "fallback": FALLBACK_CHAT_TEMPLATE,
    "chatml": CHATML_TEMPLATE,
    "llama3": LLAMA3_TEMPLATE,
}

# Conversation contents that no template rewrites, to find where a template puts what.
_PROBE = ("Qzxuserone", "Qzxanswerone", "Qzxusertwo", "Qzxanswertwo")


class ChatTemplateError(ValueError):
    """A template that cannot be used (a file that cannot be read, a syntax error), or a
    conversation it rejects or whose assistant turns cannot be found in its rendering."""


def special_prefix(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer itself puts before a text (BOS, when it adds one: Llama,
    Mistral; nothing for GPT-2 or Qwen2, whatever their `bos_token`)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        enc = backend.encode("a", add_special_tokens=True)
        ids, mask = enc.ids, enc.special_tokens_mask
    else:
        out = tokenizer("a", add_special_tokens=True, return_special_tokens_mask=True)
        ids, mask = out["input_ids"], out["special_tokens_mask"]
    n = 0
    while n < len(ids) and mask[n]:
        n += 1
    return list(ids[:n])


def special_tokens(tokenizer: Any) -> set[str]:
    """The text of every special token (BOS/EOS/PAD/UNK and added ones marked special, such as
    `<|im_end|>` or `<|eot_id|>`)."""
    found = set(tokenizer.all_special_tokens)
    for token in getattr(tokenizer, "added_tokens_decoder", {}).values():
        if token.special:
            found.add(token.content)
    found.discard("")
    return found


@functools.lru_cache(maxsize=16)
def _read_template(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        raise ChatTemplateError(
            f"{path}: no such file (nor a built-in: {', '.join(BUILTIN_CHAT_TEMPLATES)})"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ChatTemplateError(f"{path}: cannot read it ({e})") from None


def chat_template_for(tokenizer: Any, setting: str | None = None) -> str:
    """The template chat rows are rendered with: `setting` (`data.chat_template`: a built-in
    name or a file), else the tokenizer's own, else FALLBACK_CHAT_TEMPLATE. A built-in starts
    with `{{ bos_token }}` when the tokenizer adds a BOS, so that it renders the same text the
    model is trained on (the token ids of a rendering are what `apply_chat_template` gives)."""
    if setting:
        if setting in BUILTIN_CHAT_TEMPLATES:
            return _with_bos(tokenizer, BUILTIN_CHAT_TEMPLATES[setting])
        return _read_template(os.path.expanduser(setting))
    return _own_template(tokenizer) or _with_bos(tokenizer, FALLBACK_CHAT_TEMPLATE)


def _own_template(tokenizer: Any) -> str | None:
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default is the chat one
        own = own.get("default")
    return own or None


def _with_bos(tokenizer: Any, template: str) -> str:
    bos = tokenizer.bos_token_id
    if bos is not None and special_prefix(tokenizer) == [bos]:
        return "{{ bos_token }}" + template
    return template


def use_chat_template(tokenizer: Any, setting: str | None = None) -> str:
    """Install the template `chat_template_for` picks on `tokenizer` (which `save_pretrained`
    then writes) and return it. Mutates the tokenizer: a run's tokenizer is its own. A template
    with a syntax error is a ChatTemplateError here, not one bad row per conversation."""
    template = chat_template_for(tokenizer, setting)
    try:
        render(tokenizer, template, _probe(), generation_prompt=False)
    except ChatTemplateError as e:
        if isinstance(e.__cause__, TemplateSyntaxError):
            raise
    if template != _own_template(tokenizer):  # a tokenizer's own keeps its named variants
        tokenizer.chat_template = template
    return template


def render(
    tokenizer: Any, template: str, messages: list[dict[str, str]], *, generation_prompt: bool
) -> str:
    """`apply_chat_template(..., tokenize=False)`: the text inference renders too."""
    try:
        return tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=False,
            add_generation_prompt=generation_prompt,
        )
    except TemplateSyntaxError as e:
        where = f" (line {e.lineno})" if e.lineno else ""
        raise ChatTemplateError(f"the chat template is not valid Jinja{where}: {e.message}") from e
    except TemplateError as e:  # templates reject rows themselves (roles must alternate, ...)
        raise ChatTemplateError(f"chat template: {e}") from e


def _probe(system: bool = False) -> list[dict[str, str]]:
    u1, a1, u2, a2 = _PROBE
    head = [{"role": "system", "content": "Qzxsystem"}] if system else []
    return [
        *head,
        {"role": "user", "content": u1},
        {"role": "assistant", "content": a1},
        {"role": "user", "content": u2},
        {"role": "assistant", "content": a2},
    ]


@dataclass(frozen=True)
class TurnLayout:
    """Where a template puts an assistant turn's edges, as text it renders around it.

    `header`: the text that ends an assistant turn's header, e.g. `assistant\\n` of ChatML's
    `<|im_start|>assistant\\n` (the part that differs from a user header); "" if unknown, when
    the turn is found by its content. `end`: the end-of-turn marker after the message, through
    its first special token (`<|im_end|>`, `<|eot_id|>`, `<|end|>`, `</s>`, not the newline
    after them); "" if the template has none.
    """

    header: str
    end: str


_layouts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def turn_layout(tokenizer: Any, template: str) -> TurnLayout:
    """The TurnLayout of `template` with `tokenizer`'s special tokens, learned from a probe
    conversation (user, assistant, user, assistant; with a system message first if the
    template refuses that) and cached per tokenizer and template."""
    per_template = _layouts.setdefault(tokenizer, {})
    layout = per_template.get(template)
    if layout is None:
        layout = per_template[template] = _learn_layout(tokenizer, template)
    return layout


def _learn_layout(tokenizer: Any, template: str) -> TurnLayout:
    text = None
    for system in (False, True):
        try:
            text = render(tokenizer, template, _probe(system), generation_prompt=False)
            break
        except ChatTemplateError:
            continue
    if text is None:  # refuses even the probe: turns are found by their content
        return TurnLayout("", "")
    at = []
    for piece in _PROBE:
        at.append(text.find(piece, at[-1] + 1 if at else 0))
        if at[-1] < 0:  # rewrites contents: turns are found by their content
            return TurnLayout("", "")
    u1, a1, u2, a2 = _PROBE
    user_to_answer = text[at[0] + len(u1) : at[1]]
    answer_to_user = text[at[1] + len(a1) : at[2]]
    after_last = text[at[3] + len(a2) :]
    shared = os.path.commonprefix([user_to_answer, answer_to_user])
    header = user_to_answer[len(shared) :]
    if not header.strip():  # whitespace alone would match anywhere
        header = ""
    end_text = os.path.commonprefix([answer_to_user, after_last]) or answer_to_user
    return TurnLayout(header, _end_marker(end_text, special_tokens(tokenizer)))


def _end_marker(text: str, specials: set[str]) -> str:
    """`text` (what follows an assistant message) through its first special token; without
    one, its first line without trailing whitespace (a marker spelled in plain text)."""
    hits = [(text.find(s), -len(s), s) for s in specials if s in text]
    if hits:
        pos, _, token = min(hits)
        return text[: pos + len(token)]
    return text.split("\n", 1)[0].rstrip()


def end_of_turn_id(tokenizer: Any) -> int | None:
    """The special token that ends an assistant turn in `tokenizer`'s chat template
    (`<|im_end|>`, `<|eot_id|>`, `<|end|>`, ...), or None when the template has no such token.
    A model trained on the template must stop generating there, which a base model's
    generation config does not know."""
    template = getattr(tokenizer, "chat_template", None)
    if not isinstance(template, str):
        return None
    end = turn_layout(tokenizer, template).end
    token = next((t for t in special_tokens(tokenizer) if end and end.endswith(t)), None)
    if token is None:
        return None
    token_id = tokenizer.convert_tokens_to_ids(token)
    return token_id if isinstance(token_id, int) and token_id >= 0 else None


@dataclass(frozen=True)
class Span:
    """One assistant turn in a rendering: text[start:end] carries the loss; text[marker:end] is
    its end-of-turn marker (empty when the template has none)."""

    start: int
    marker: int
    end: int


def _find(text: str, content: str, start: int) -> tuple[int, int] | None:
    """Where `content` (or, for templates that trim it, its stripped form) is, from `start`."""
    for candidate in (content, content.strip()):
        if candidate:
            at = text.find(candidate, start)
            if at >= 0:
                return at, at + len(candidate)
    return None


def assistant_spans(text: str, messages: list[dict[str, str]], layout: TurnLayout) -> list[Span]:
    """The Span of each assistant message of `messages` in `text`, their rendering.

    Messages are walked in order with a cursor, so a header or marker that a user message
    happens to contain is never taken for the template's. An assistant turn starts after the
    first `layout.header` past the cursor (or, with no header known, at its content) and ends
    after the first `layout.end` past its content (or at its content's end). Content that the
    template rewrote (Qwen3's `<think>` blocks) needs a known header and marker; without them
    such a turn is a ChatTemplateError.
    """
    spans = []
    cursor = 0
    for i, message in enumerate(messages):
        found = _find(text, message["content"], cursor)
        if message["role"] != "assistant":
            if found is not None:
                cursor = found[1]
            continue
        start = -1
        if layout.header:
            start = text.find(layout.header, cursor)
            if start >= 0:
                start += len(layout.header)
                found = _find(text, message["content"], start)
                stop = text.find(layout.end, start) if layout.end else -1
                if found is not None and 0 <= stop < found[0]:
                    found = None  # the template rewrote this turn: that is a later message
        if start < 0:
            if found is None:
                raise ChatTemplateError(
                    f"message {i} (assistant) is not in the rendered conversation as it is "
                    "given, and the template's assistant header is unknown"
                )
            start = found[0]
        marker = -1
        if layout.end:
            marker = text.find(layout.end, found[1] if found else start)
        if marker >= 0:
            end = marker + len(layout.end)
        elif found is not None:
            marker = end = found[1]
        else:
            raise ChatTemplateError(
                f"message {i} (assistant): the template rewrote it and no end-of-turn "
                f"marker ({layout.end!r}) follows it"
            )
        spans.append(Span(start, marker, end))
        cursor = end
    return spans
