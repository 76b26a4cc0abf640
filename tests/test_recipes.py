"""Every shipped config (configs/*.yaml, configs/recipes/*.yaml) and DeepSpeed JSON loads and
validates through the real config code, at world sizes 1 and 2, without downloading anything:
load_config reads no model or data, so a Hub id and a data directory that do not exist here are
fine; only run_dir is pointed at a temporary directory (it must be creatable)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from trainer.config import load_config, resolve_batch, with_total_steps
from trainer.engine.deepspeed_config import validate_deepspeed_config, zero_stage

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs"
SHIPPED_YAMLS = sorted(CONFIGS.rglob("*.yaml"))
SHIPPED_JSONS = sorted(CONFIGS.rglob("*.json"))
RECIPES = {
    "ddp": CONFIGS / "recipes" / "mistral7b_qlora_dolly.yaml",
    "zero3": CONFIGS / "recipes" / "mistral7b_qlora_dolly_zero3.yaml",
}


def _id(path: Path) -> str:
    return str(path.relative_to(CONFIGS))


def _load(path: Path, tmp_path: Path, *overrides: str):
    return load_config(path, [f"run_dir={tmp_path / 'run'}", *overrides])


def _device_type(path: Path) -> str:
    """Where a config is meant to run: the recipes on GPUs, the rest (demos, tiny) on CPU."""
    return "cuda" if "recipes" in path.parts else "cpu"


@pytest.fixture(autouse=True)
def _from_repo_root(monkeypatch):
    # Configs name their DeepSpeed JSONs relative to the repository root, as the CLI runs them.
    monkeypatch.chdir(REPO)


def test_the_shipped_configs_are_found():
    found = {_id(p) for p in SHIPPED_YAMLS}
    assert {"demo.yaml", "demo_qlora.yaml", *(_id(p) for p in RECIPES.values())} <= found
    assert "recipes/mistral7b_qlora_dolly_zero3.json" in {_id(p) for p in SHIPPED_JSONS}


@pytest.mark.parametrize("path", SHIPPED_YAMLS, ids=_id)
@pytest.mark.parametrize("world_size", [1, 2])
def test_shipped_config_validates(path, world_size, tmp_path):
    cfg = _load(path, tmp_path)
    derived = resolve_batch(cfg, world_size)
    # Configs that count epochs need the data's size; any will do for validation.
    derived = with_total_steps(cfg, derived, steps_per_epoch=100)
    assert derived.total_steps and derived.global_batch_size
    ds = validate_deepspeed_config(cfg, derived, _device_type(path))
    assert (ds is None) == (cfg.train.backend == "ddp")
    if cfg.method == "qlora":
        from trainer.model.methods import describe_quantization, quantization_config

        # Builds the BitsAndBytesConfig the run would load with (storage dtype, ZeRO-3 rules),
        # and the log line that says what the base weights became.
        qc = quantization_config(cfg, "cpu", zero3=bool(ds) and zero_stage(ds) == 3)
        line = describe_quantization(qc)
        q = cfg.quantization
        assert (f"4-bit {q.quant_type}" if q.bits == 4 else "8-bit") in line, line


@pytest.mark.parametrize("path", SHIPPED_JSONS, ids=_id)
@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_shipped_deepspeed_json_validates(path, device_type, tmp_path):
    cfg = _load(
        CONFIGS / "tiny.yaml",
        tmp_path,
        "train.backend=deepspeed",
        f"train.deepspeed_config={path}",
    )
    ds = validate_deepspeed_config(cfg, resolve_batch(cfg, 2), device_type)
    assert ds["train_micro_batch_size_per_gpu"] == cfg.train.micro_batch_size
    assert ds["bf16"]["enabled"] == (device_type == "cuda")


@pytest.mark.parametrize("kind", sorted(RECIPES))
def test_mistral_qlora_recipe_is_the_reference_one(kind, tmp_path):
    cfg = _load(RECIPES[kind], tmp_path)
    assert cfg.model.name_or_path == "mistralai/Mistral-7B-Instruct-v0.3"  # a Hub id, kept
    assert cfg.model.gradient_checkpointing
    assert cfg.method == "qlora"
    lora, q = cfg.lora, cfg.quantization
    assert (lora.r, lora.alpha, lora.dropout) == (16, 32, 0.05)
    assert lora.target_modules == ["q_proj", "v_proj"]
    assert (q.bits, q.quant_type, q.compute_dtype) == (4, "nf4", "bfloat16")
    d = cfg.data
    assert (d.format, d.template) == ("instruction", "alpaca")
    assert (d.instruction_field, d.context_field, d.response_field) == (
        "instruction",
        "context",
        "response",
    )
    t = cfg.train
    assert (t.micro_batch_size, t.grad_accum_steps, t.num_epochs) == (4, 4, 3)
    assert cfg.optim.lr == 2e-4

    from trainer.model.methods import quantization_config

    zero3 = kind == "zero3"
    if zero3:
        ds = validate_deepspeed_config(cfg, resolve_batch(cfg, 8), "cuda")
        assert zero_stage(ds) == 3 and ds["bf16"]["enabled"]
    bnb = quantization_config(cfg, "cpu", zero3=zero3)
    assert bnb.load_in_4bit and bnb.bnb_4bit_use_double_quant
    assert bnb.bnb_4bit_compute_dtype == torch.bfloat16
    # ZeRO-3 shards the packed 4-bit weights only when they share the other weights' dtype.
    assert bnb.bnb_4bit_quant_storage == (torch.bfloat16 if zero3 else torch.uint8)


def test_the_zero3_recipe_differs_from_the_ddp_one_only_in_the_backend(tmp_path):
    ddp, zero3 = (_load(RECIPES[k], tmp_path).model_dump() for k in ("ddp", "zero3"))
    backend = [
        (t["train"].pop("backend"), t["train"].pop("deepspeed_config")) for t in (ddp, zero3)
    ]
    assert backend == [
        ("ddp", None),
        ("deepspeed", "configs/recipes/mistral7b_qlora_dolly_zero3.json"),
    ]
    assert ddp == zero3


@pytest.mark.parametrize("context", ["", "Dolly was released in April 2023."])
def test_the_recipe_data_keys_read_a_dolly_row(context, tmp_path):
    """A row shaped like databricks-dolly-15k's renders in the Alpaca prompt with the loss on
    the response (the char tokenizer stands in for Mistral's: one token per character)."""
    from data.templates import encode_row
    from data.tokenizer import build_char_tokenizer

    cfg = _load(RECIPES["ddp"], tmp_path)
    tokenizer = build_char_tokenizer()
    row = {
        "instruction": "When was Dolly released?",
        "context": context,
        "response": "In April 2023.",
        "category": "closed_qa" if context else "open_qa",
    }
    sample = encode_row(row, tokenizer, cfg.data)
    text = tokenizer.decode(sample.input_ids)
    assert text.startswith("<s>Below is an instruction")
    assert ("### Input:\n" + context in text) == bool(context)
    assert sample.num_target_tokens == len(row["response"]) + 1  # the response and EOS


def test_demo_qlora_adapts_the_model_its_base_run_writes():
    """`make demo-qlora` runs configs/demo_qlora_base.yaml, then QLoRA on the model it saves."""
    base = yaml.safe_load((CONFIGS / "demo_qlora_base.yaml").read_text())
    qlora = yaml.safe_load((CONFIGS / "demo_qlora.yaml").read_text())
    assert qlora["model"]["name_or_path"] == f"{base['run_dir']}/model"
    assert base.get("method", "full") == "full" and qlora["method"] == "qlora"
