"""A character-level tokenizer built locally, for the embedded default and the tests.

It is saved with `save_pretrained` and loaded back with `AutoTokenizer.from_pretrained`, the same
path a real model's tokenizer takes, so nothing downstream knows it is a toy. Character level
matters for the demo: arithmetic is learnable quickly when every digit is its own token.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = {
    "pad_token": "<pad>",
    "bos_token": "<s>",
    "eos_token": "</s>",
    "unk_token": "<unk>",
}

# Template markers (see data.templates) that get a token of their own.
TEMPLATE_MARKERS = ("### Instruction:\n", "\n\n### Input:\n", "\n\n### Response:\n")

# A minimal ChatML-style template so the `chat` data format works with this tokenizer too. It
# renders BOS, as the tokenizer adds one: `apply_chat_template` gives the ids training used.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Return a tokenizer with one token per printable ASCII character plus 4 special tokens."""
    chars = [c for c in string.printable if c not in "\x0b\x0c\r"]
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS.values(), *chars])}
    core = Tokenizer(models.WordLevel(vocab, unk_token=SPECIAL_TOKENS["unk_token"]))
    # `[\s\S]` rather than `.` so that newlines become tokens too.
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, **SPECIAL_TOKENS)
    # Every encoding starts with BOS, as with Llama's tokenizer (data.templates follows it).
    tok.add_bos_token = True
    tok.chat_template = CHAT_TEMPLATE
    # A real BPE vocabulary spells the template's markers in a few tokens; one token each keeps
    # a char-level demo from spending most of its compute on boilerplate.
    tok.add_tokens(list(TEMPLATE_MARKERS))
    return tok


def save_char_tokenizer(directory: str | Path) -> Path:
    """Build the character tokenizer and save it in HF format under `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    build_char_tokenizer().save_pretrained(directory)
    return directory
