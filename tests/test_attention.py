"""Attention implementation: `model.attn_implementation=auto` (the default) picks one the model
supports, so a model without sdpa (Gemma2) trains with the default config, and logs the choice."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import Gemma2Config, Gemma2ForCausalLM

from data.tokenizer import build_char_tokenizer
from tests.conftest import tiny_config_args
from tests.launcher import run_torchrun
from trainer.config import ModelConfig
from trainer.model.load import ModelLoadError, build_model

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def gemma2_dir(tmp_path_factory) -> Path:
    """A tiny random Gemma2 (no sdpa support in transformers) with the char tokenizer, saved in
    HF format like a user's checkpoint."""
    out = tmp_path_factory.mktemp("gemma2")
    tokenizer = build_char_tokenizer()
    torch.manual_seed(0)
    config = Gemma2Config(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        sliding_window=16,  # shorter than the rows: the local layers' window really applies
        max_position_embeddings=512,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    Gemma2ForCausalLM(config).save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


def test_auto_picks_sdpa_where_supported_else_eager(tiny_assets, gemma2_dir):
    llama = build_model(ModelConfig(name_or_path=str(tiny_assets / "model")), CPU)
    assert llama.config._attn_implementation == "sdpa"
    gemma2 = build_model(ModelConfig(name_or_path=str(gemma2_dir)), CPU)
    assert gemma2.config._attn_implementation == "eager"


def test_an_unsupported_explicit_choice_is_one_line_naming_the_key(gemma2_dir):
    with pytest.raises(ModelLoadError) as err:
        build_model(ModelConfig(name_or_path=str(gemma2_dir), attn_implementation="sdpa"), CPU)
    message = str(err.value)
    assert "\n" not in message and "set model.attn_implementation=auto" in message, message


@pytest.mark.timeout(300)
def test_gemma2_trains_with_the_default_config(tiny_assets, gemma2_dir, tmp_path):
    """The real CLI, default attention, packing on (the probe checks that packed samples stay
    apart under the chosen implementation)."""
    run_dir = tmp_path / "run"
    argv = tiny_config_args(
        tiny_assets,
        run_dir,
        f"model.name_or_path={gemma2_dir}",
        "data.packing=true",
        "train.max_steps=8",
        "optim.lr=3e-3",
    )
    proc = run_torchrun(["-m", "launch.train", *argv], nproc=1, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "attention: eager (model.attn_implementation=auto)" in proc.stdout, proc.stdout[-4000:]
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["train/loss"] for r in rows if "train/loss" in r]
    assert len(losses) == 8 and all(map(math.isfinite, losses))
    assert sum(losses[-2:]) / 2 < sum(losses[:2]) / 2, losses
