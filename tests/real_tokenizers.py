"""Real tokenizers and chat templates for the tests, from tests/assets (see its README): unpacked
once per session into Hugging Face tokenizer directories and loaded with AutoTokenizer, the way
users load theirs. Nothing is downloaded.

| name | vocabulary | its chat template | BOS added by the tokenizer |
|---|---|---|---|
| `phi-3` | Phi-3 SentencePiece (Metaspace `▁`, byte fallback) | Phi-3.5-mini-instruct's | `<s>` |
| `qwen2` | Qwen2 byte-level BPE; EOS `<|endoftext|>` (a base model's) | Qwen2.5-Instruct's (ChatML) | none |
| `gpt-2` | GPT-2 byte-level BPE; `bos_token` set but not added | none | none |
| `llama3-style` | GPT-2's + Llama-3's special tokens; EOS `<|end_of_text|>` | built-in `llama3` | `<|begin_of_text|>` |
"""

from __future__ import annotations

import copy
import functools
import lzma
import shutil
import tempfile
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from data.chat import chat_template_for

ASSETS = Path(__file__).resolve().parent / "assets"
CHAT_TEMPLATES = ASSETS / "chat_templates"
PHI35_TEMPLATE = CHAT_TEMPLATES / "microsoft-Phi-3.5-mini-instruct.jinja"
QWEN25_TEMPLATE = CHAT_TEMPLATES / "Qwen-Qwen2.5-7B-Instruct.jinja"
QWEN3_TEMPLATE = CHAT_TEMPLATES / "Qwen-Qwen3-0.6B.jinja"

NAMES = ("phi-3", "qwen2", "gpt-2", "llama3-style")
OWN_TEMPLATES = {"phi-3": PHI35_TEMPLATE, "qwen2": QWEN25_TEMPLATE}
LLAMA3_SPECIAL_TOKENS = {
    "bos_token": "<|begin_of_text|>",
    "eos_token": "<|end_of_text|>",
    "additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
}


@functools.cache
def tokenizer_dir(name: str) -> Path:
    """The HF tokenizer directory of `name` (one of NAMES), built once per session."""
    if name not in NAMES:
        raise ValueError(f"unknown test tokenizer {name!r}; expected one of {NAMES}")
    out = Path(tempfile.mkdtemp(prefix=f"tok-{name}-"))
    if name == "llama3-style":
        tok = AutoTokenizer.from_pretrained(tokenizer_dir("gpt-2"))
        tok.add_special_tokens(LLAMA3_SPECIAL_TOKENS)
        tok.add_bos_token = True  # Llama-3's tokenizer starts every encoding with BOS
        tok.chat_template = chat_template_for(tok, "llama3")
        tok.save_pretrained(out)
        return out
    src = ASSETS / "tokenizers" / name
    (out / "tokenizer.json").write_bytes(lzma.decompress((src / "tokenizer.json.xz").read_bytes()))
    shutil.copy(src / "tokenizer_config.json", out)
    if name in OWN_TEMPLATES:
        shutil.copy(OWN_TEMPLATES[name], out / "chat_template.jinja")
    return out


@functools.cache
def _cached(name: str) -> Any:
    return AutoTokenizer.from_pretrained(tokenizer_dir(name))


def load(name: str) -> Any:
    """A fresh copy of tokenizer `name` (training installs its chat template on it)."""
    return copy.deepcopy(_cached(name))
