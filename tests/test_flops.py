"""Model FLOPs per token against hand counts, LoRA's accounting, the GPU peak table, the
throughput arithmetic, and the CLI logging tokens/s and MFU to metrics.jsonl and TensorBoard."""

from __future__ import annotations

import json
import math
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, GPTNeoXConfig, LlamaConfig

from data.packing import pack
from data.templates import TokenizedSample
from tests.conftest import tiny_config_args
from trainer.flops import (
    FlopsPerToken,
    flops_per_token,
    known_peak_tflops,
    matmul_params,
    model_flops_per_token,
    num_attention_pairs,
    resolve_peak_tflops,
)
from trainer.metrics import Throughput

# The tiny Llama of the tests, with GQA: 4 query heads of 8 dims, 2 key/value heads.
LLAMA = LlamaConfig(
    vocab_size=60,
    hidden_size=32,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
GPT2 = GPT2Config(vocab_size=50, n_positions=64, n_embd=32, n_layer=2, n_head=4)
NEOX = GPTNeoXConfig(
    vocab_size=50, hidden_size=32, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4
)


def test_llama_with_gqa_by_hand():
    d, head_dim = 32, 8
    q = d * 4 * head_dim  # 1024
    k = d * 2 * head_dim  # 512: two key/value heads
    v = d * 2 * head_dim  # 512
    o = 4 * head_dim * d  # 1024
    mlp = 3 * d * 96  # gate, up, down: 9216
    per_layer = q + k + v + o + mlp  # 12288
    lm_head = d * 60  # 1920
    n = 2 * per_layer + lm_head
    assert n == 26496
    attention = 12 * 2 * 4 * head_dim  # layers x query heads x head dim: 768 per position

    f = flops_per_token(LLAMA, seq_len=48)
    assert f.num_matmul_params == 26496
    assert f.matmul == 6 * 26496 == 158976
    assert f.attention == attention == 768
    assert f.per_token() == 158976 + 768 * 48 == 195840  # at the nominal seq_len
    assert f.per_token(context=10) == 158976 + 7680  # a short sample attends fewer positions
    # 3 tokens of a 3-token sample (9 pairs) and 5 of a 5-token one (25 pairs).
    assert f.flops(num_tokens=8, num_attention_pairs=34) == 8 * 158976 + 34 * 768


def test_llama_agrees_with_torchtitans_formula_up_to_norm_weights():
    """torchtitan: 6 x (parameters - embeddings) + 12 x layers x heads x head_dim x seq_len. It
    counts the RMSNorm weights as parameters; they are no matmul, so we leave them out."""
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(LLAMA)
    params = sum(p.numel() for p in model.parameters())
    embedding = model.model.embed_tokens.weight.numel()
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    assert norms == 2 * 2 * 32 + 32
    torchtitan = 6 * (params - embedding) + 12 * 2 * 4 * 8 * 48
    assert model_flops_per_token(model, 48).per_token() == torchtitan - 6 * norms


def test_gpt2_by_hand():
    d, inner = 32, 4 * 32  # n_inner unset: 4 x n_embd
    c_attn = d * 3 * d  # 3072: q, k and v in one matmul
    c_proj = d * d  # 1024
    mlp = d * inner + inner * d  # c_fc, c_proj: 8192
    lm_head = d * 50  # 1600: tied to wte, but its matmul runs
    f = flops_per_token(GPT2)
    assert f.num_matmul_params == 2 * (c_attn + c_proj + mlp) + lm_head == 26176
    assert f.attention == 12 * 2 * 4 * 8
    assert f.seq_len == 64  # n_positions when no seq_len is given
    assert f.per_token() == 6 * 26176 + 768 * 64


@pytest.mark.parametrize("config", [LLAMA, GPT2, NEOX], ids=["llama", "gpt2", "gpt_neox"])
def test_config_count_matches_the_built_models_linear_layers(config):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(config)
    total, frozen, adapter = matmul_params(model)
    assert (total, frozen, adapter) == (flops_per_token(config).num_matmul_params, 0, 0)


def test_unknown_architecture_falls_back_to_the_linear_layers():
    config = SimpleNamespace(
        model_type="mystery", num_hidden_layers=2, num_attention_heads=4, hidden_size=32
    )
    f = flops_per_token(config, 16, num_params=1000)
    assert (f.num_matmul_params, f.source, f.attention) == (1000, "linear layers", 768)
    with pytest.raises(ValueError, match="mystery"):
        flops_per_token(config, 16)


def test_lora_counts_frozen_weights_at_4_and_adapters_at_6():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    model = get_peft_model(
        LlamaForCausalLM(LLAMA), LoraConfig(r=4, target_modules="all-linear")
    )  # every linear layer but lm_head; the whole base model is frozen
    r = 4
    per_layer = (
        r * (32 + 32)  # q_proj: A is 32 -> 4, B is 4 -> 32
        + r * (32 + 16)  # k_proj
        + r * (32 + 16)  # v_proj
        + r * (32 + 32)  # o_proj
        + r * (32 + 96)  # gate_proj
        + r * (32 + 96)  # up_proj
        + r * (96 + 32)  # down_proj
    )
    assert per_layer == 2432
    f = model_flops_per_token(model, 48)
    assert (f.num_matmul_params, f.num_frozen_params) == (26496, 26496)
    assert f.num_adapter_params == 2 * 2432
    # forward 2N + input gradient 2N for the frozen base; 6 per adapter weight.
    assert f.matmul == 4 * 26496 + 6 * 4864 == 135168
    assert f.attention == 768  # attention's backward still runs in full
    assert "frozen" in f.describe() and "LoRA" in f.describe()


def test_a_frozen_layer_of_a_full_run_skips_only_its_weight_gradient():
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM(LLAMA)
    model.lm_head.weight.requires_grad_(False)
    f = model_flops_per_token(model, 48)
    assert f.num_frozen_params == 32 * 60
    assert f.matmul == 6 * 26496 - 2 * 1920


def sample(n: int) -> TokenizedSample:
    return TokenizedSample(input_ids=list(range(1, n + 1)), labels=list(range(1, n + 1)))


def test_attention_pairs_of_padded_and_packed_batches():
    padded = {
        "input_ids": torch.zeros(2, 5, dtype=torch.long),
        "attention_mask": torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]),
    }
    assert num_attention_pairs(padded) == 3 * 3 + 5 * 5

    # First fit into rows of 8: [3, 4] and [2]; the row width is 7, so the second row ends in a
    # 5-token pad tail with positions of its own, which is no sample.
    packed = pack([(0, sample(3)), (1, sample(4)), (2, sample(2))], seq_len=8, pad_id=0)
    assert packed["position_ids"].tolist()[1] == [0, 1, 0, 1, 2, 3, 4]
    assert num_attention_pairs(packed) == 3 * 3 + 4 * 4 + 2 * 2

    bare = {"input_ids": torch.zeros(2, 6, dtype=torch.long)}  # one sample per row
    assert num_attention_pairs(bare) == 2 * 6 * 6


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.0),
        ("NVIDIA H100 NVL", 835.5),
        ("NVIDIA H200", 989.4),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A100 80GB PCIe", 312.0),
        ("NVIDIA A10G", 70.0),
        ("NVIDIA L4", 121.0),
        ("NVIDIA L40S", 362.05),
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("NVIDIA A10", None),  # not A10G, not A100: not guessed
        ("NVIDIA L40", None),
        ("Tesla T4", None),
    ],
)
def test_peak_table(name, peak):
    assert known_peak_tflops(name) == peak


def test_peak_on_cpu_is_unknown_unless_configured():
    peak, why = resolve_peak_tflops(None, torch.device("cpu"))
    assert peak is None and "MFU not logged" in why and "logging.peak_tflops" in why
    peak, why = resolve_peak_tflops(2.5, torch.device("cpu"))
    assert peak == 2.5 and "logging.peak_tflops=2.5" in why


def test_throughput_rates_per_device_and_mfu():
    f = FlopsPerToken(1000, 0, 0, attention=10, seq_len=8, source="test")
    meter = Throughput(f, peak_tflops=1e-6, world_size=2)
    meter.add_step(num_tokens=300, num_total_tokens=400, num_attention_pairs=5000)
    meter.window_start = time.perf_counter() - 2.0  # a 2 s window
    s = meter.scalars()
    approx = lambda x: pytest.approx(x, rel=1e-2)  # noqa: E731
    assert s["train/tokens_per_s"] == approx(400 / 2 / 2)  # per device, padding included
    assert s["train/nonpad_tokens_per_s"] == approx(300 / 2 / 2)
    assert s["train/tokens_per_s_total"] == approx(400 / 2)
    flops = 6 * 1000 * 300 + 10 * 5000
    assert s["train/tflops_per_device"] == approx(flops / 2 / 2 / 1e12)
    assert s["train/mfu"] == approx(flops / 2 / 2 / 1e12 / 1e-6)
    assert meter.summary()["mfu"] == approx(s["train/mfu"])
    assert "train/mfu" not in Throughput(f, None, 1).scalars()


@pytest.fixture
def _keep_signal_handlers():
    """The in-process CLI installs its stop-signal handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def train_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


def tensorboard_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


THROUGHPUT_KEYS = (
    "train/tokens_per_s",
    "train/nonpad_tokens_per_s",
    "train/tokens_per_s_total",
    "train/tflops_per_device",
)


@pytest.mark.slow
@pytest.mark.usefixtures("_keep_signal_handlers")
def test_cli_logs_throughput_and_mfu_every_logged_step(tiny_assets, tmp_path, capsys):
    from launch.train import main

    run_dir = tmp_path / "run"
    assert main(tiny_config_args(tiny_assets, run_dir, "logging.peak_tflops=1.0")) == 0
    err = capsys.readouterr().err
    assert "MFU against logging.peak_tflops=1 TFLOP/s" in err
    assert "mfu=" in err and "tok/s=" in err  # the progress log line

    rows = train_rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    board = tensorboard_scalars(run_dir)
    for key in (*THROUGHPUT_KEYS, "train/mfu"):
        assert all(math.isfinite(r[key]) and r[key] > 0 for r in rows), key
        assert [step for step, _ in board[key]] == [1, 2, 3, 4, 5, 6], key
    for r in rows:
        # Padded batches: every token the device ran >= the real ones; peak 1 TFLOP/s.
        assert r["train/tokens_per_s"] >= r["train/nonpad_tokens_per_s"]
        assert r["train/mfu"] == pytest.approx(r["train/tflops_per_device"])

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mfu"] > 0 and summary["nonpad_tokens_per_s_per_device"] > 0


@pytest.mark.slow
@pytest.mark.usefixtures("_keep_signal_handlers")
def test_cli_on_cpu_without_a_peak_logs_no_mfu(tiny_assets, tmp_path, capsys):
    from launch.train import main

    run_dir = tmp_path / "run"
    assert main(tiny_config_args(tiny_assets, run_dir)) == 0
    err = capsys.readouterr().err
    assert "MFU not logged: no peak FLOP/s is known for cpu" in err

    rows = train_rows(run_dir)
    assert rows and all("train/mfu" not in r for r in rows)  # absent: not 0, not NaN
    assert all(all(math.isfinite(r[k]) for k in THROUGHPUT_KEYS) for r in rows)
    assert "train/mfu" not in tensorboard_scalars(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert "mfu" not in summary and summary["nonpad_tokens_per_s_per_device"] > 0
