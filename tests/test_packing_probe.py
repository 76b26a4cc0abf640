"""Packing is proven on the model at hand: exact models train packed, the others are refused."""

from __future__ import annotations

import signal

import pytest
import torch
from transformers import FalconConfig, FalconForCausalLM, OPTConfig, OPTForCausalLM

from tests.conftest import tiny_config_args
from tests.tiny_models import tiny_llama
from trainer.model.packing_probe import PackingNotExact, check_packing_exact, packing_error

CPU = torch.device("cpu")


def tiny_opt(vocab: int = 120) -> OPTForCausalLM:
    torch.manual_seed(0)
    cfg = OPTConfig(
        vocab_size=vocab,
        hidden_size=32,
        word_embed_proj_dim=32,
        ffn_dim=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=64,
    )
    return OPTForCausalLM(cfg)


def tiny_falcon() -> FalconForCausalLM:
    torch.manual_seed(0)
    return FalconForCausalLM(
        FalconConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=2)
    )


def test_llama_packs_exactly_and_stays_in_train_mode():
    model = tiny_llama().train()
    assert packing_error(model, CPU) <= 1e-6
    check_packing_exact(model, CPU)
    assert model.training  # the probe runs in eval mode and puts the mode back


@pytest.mark.parametrize("build", [tiny_opt, tiny_falcon], ids=["opt", "falcon"])
def test_models_that_mix_packed_samples_are_refused(build):
    model = build()
    assert packing_error(model, CPU) > 1e-2  # the check bites: these really mix samples
    with pytest.raises(PackingNotExact) as info:
        check_packing_exact(model, CPU)
    msg = str(info.value)
    assert "\n" not in msg and "data.packing=false" in msg and type(model).__name__ in msg


def test_the_bound_is_relative_to_the_logits_scale_and_still_catches_mixing():
    """Logits in the hundreds (a deep random model in half precision has them in the tens):
    the error is read against their scale, so rounding does not trip the probe, and a model
    that mixes samples is still refused at any scale."""
    opt = tiny_opt()
    small = packing_error(opt, CPU)
    # A head of its own (untied from the embedding), 1000x larger: only the logits grow.
    opt.lm_head.weight = torch.nn.Parameter(opt.lm_head.weight.detach() * 1000.0)
    scaled = packing_error(opt, CPU)
    assert scaled > 1e-2 and small / 3 < scaled < small * 3  # not 1000x: read against the scale
    with pytest.raises(PackingNotExact):
        check_packing_exact(opt, CPU)


def test_cli_refuses_packing_for_opt_in_one_line(tiny_assets, tmp_path, capsys):
    """Through the CLI: an OPT model directory with the char tokenizer, data.packing=true."""
    from transformers import AutoTokenizer

    from launch.train import main

    model_dir = tmp_path / "opt"
    tok = AutoTokenizer.from_pretrained(tiny_assets / "model")
    tiny_opt(vocab=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    try:
        code = main(
            tiny_config_args(
                tiny_assets,
                tmp_path / "run",
                f"model.name_or_path={model_dir}",
                "data.packing=true",
            )
        )
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
    err = capsys.readouterr().err
    errors = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err[-2000:]
    assert "OPTForCausalLM" in errors[0] and "data.packing=false" in errors[0]


def test_tolerance_follows_the_least_precise_weights():
    """QLoRA keeps its embedding in fp32 but its 4-bit layers (integer storage) and bf16 ones
    round like half precision: the bound must be the half one, not the first parameter's."""
    from torch import nn

    from trainer.model.packing_probe import HALF_TOLERANCE, TOLERANCE, tolerance

    fp32 = nn.Sequential(nn.Embedding(4, 4), nn.Linear(4, 4))
    assert tolerance(fp32) == TOLERANCE[torch.float32]
    mixed = nn.Sequential(nn.Embedding(4, 4), nn.Linear(4, 4).to(torch.bfloat16))
    assert tolerance(mixed) == HALF_TOLERANCE
    quantized = nn.Sequential(nn.Embedding(4, 4))
    quantized.register_parameter("q", nn.Parameter(torch.zeros(4, dtype=torch.uint8), False))
    assert tolerance(quantized) == HALF_TOLERANCE
