"""launch.export of LoRA/QLoRA checkpoints: the peft adapter, and with `--merge` (or
`output.merge_adapter` at the end of a run) a full HF model with the adapter merged in, for
QLoRA into the dequantized 4-bit base. Each method trains once, through the CLI code path, in a
module fixture that every test below reads; the reference is the training model rebuilt from the
checkpoint (`load_model` + the checkpoint's adapters), in eval mode (no LoRA dropout)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests import launcher
from tests.conftest import tiny_config_args
from tests.test_distributed_training import _train_rank

# Each module fixture trains in a spawned rank; the first test to use one waits for it.
pytestmark = pytest.mark.timeout(300)

CPU = torch.device("cpu")
# Ids the char tokenizer has (the tied-embedding test's); two rows, one padded with a repeat.
IDS = torch.tensor([[1, 20, 21, 22, 23, 5, 6, 30, 31, 32], [1, 40, 41, 42, 43, 44, 7, 8, 9, 10]])


@dataclass
class Exported:
    argv: list[str]  # the training command line (configs/tiny.yaml + overrides)
    run: Path
    adapter: Path  # launch.export CHECKPOINT --output
    merged: Path  # launch.export CHECKPOINT --output --merge

    @property
    def cfg(self):
        from trainer.config import load_config

        return load_config(self.argv[0], self.argv[1:])

    def newest_checkpoint(self) -> Path:
        from launch.export import resolve_checkpoint

        return resolve_checkpoint(self.run / "checkpoints")


def _train_and_export(root: Path, assets: Path, *overrides: str) -> Exported:
    from launch.export import main as export_main

    run = root / "run"
    # lr 1e-2: in 3 steps the adapters move the logits well past every tolerance below.
    argv = tiny_config_args(assets, run, "train.max_steps=3", "optim.lr=1e-2", *overrides)
    launcher.run_ranks(_train_rank, 1, argv)
    done = Exported(argv, run, root / "adapter", root / "merged")
    assert export_main([str(run / "checkpoints"), "--output", str(done.adapter)]) == 0
    assert export_main([str(run / "checkpoints"), "--output", str(done.merged), "--merge"]) == 0
    return done


@pytest.fixture(scope="module")
def lora_run(tiny_assets, tmp_path_factory) -> Exported:
    root = tmp_path_factory.mktemp("lora")
    return _train_and_export(root, tiny_assets, "method=lora", "output.merge_adapter=true")


@pytest.fixture(scope="module")
def qlora_run(tiny_assets, tmp_path_factory) -> Exported:
    root = tmp_path_factory.mktemp("qlora")
    return _train_and_export(root, tiny_assets, "method=qlora", "output.merge_adapter=true")


@pytest.fixture(scope="module")
def tied_lora_run(tiny_assets, tmp_path_factory) -> Exported:
    from launch.make_demo import build_tiny_model_dir

    root = tmp_path_factory.mktemp("tied_lora")
    base = build_tiny_model_dir(
        root / "base", seed=0, hidden=32, layers=2, heads=2, tie_word_embeddings=True
    )
    return _train_and_export(root, tiny_assets, "method=lora", f"model.name_or_path={base}")


def _logits(model: torch.nn.Module) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids=IDS).logits.float()


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def training_logits(done: Exported) -> torch.Tensor:
    """The logits of the model the checkpoint holds, built as training built it."""
    from launch.export import load_checkpoint_weights
    from trainer.model.methods import load_model

    model = load_model(done.cfg, CPU)
    load_checkpoint_weights(done.newest_checkpoint(), model, "ddp")
    return _logits(model)


def _base(done: Exported, quantized: bool = False) -> torch.nn.Module:
    """The base model as a user loads it: plain, or 4-bit as the run quantized it."""
    from transformers import AutoModelForCausalLM

    cfg = done.cfg
    if not quantized:
        return AutoModelForCausalLM.from_pretrained(cfg.model.name_or_path)
    from trainer.model.methods import _keep_cpu_4bit_weights_packed, quantization_config

    model = AutoModelForCausalLM.from_pretrained(
        cfg.model.name_or_path,
        quantization_config=quantization_config(cfg, "cpu", zero3=False),
        device_map={"": CPU},
    )
    # bitsandbytes' CPU inference kernel (AVX512-BF16, taken on no-grad forwards) computes in
    # bf16 and differs from the training path by ~1e-3 on its own; compare like with like.
    _keep_cpu_4bit_weights_packed(model)
    return model


def _adapter_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(model_dir / "adapter_model.safetensors")


def _assert_same_files(a: Path, b: Path, name: str) -> None:
    x, y = load_file(a / name), load_file(b / name)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x), (a, b)


def _assert_plain_model_dir(model_dir: Path) -> dict:
    """A full HF model: weights and config, no adapter files, no quantization left."""
    assert (model_dir / "model.safetensors").is_file()
    assert not (model_dir / "adapter_config.json").exists()
    config = json.loads((model_dir / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["dtype"] == "float32"  # output.dtype auto: the tiny base is fp32
    weights = load_file(model_dir / "model.safetensors")
    assert not any("lora_" in k or "base_layer" in k for k in weights), list(weights)[:5]
    assert {t.dtype for t in weights.values()} == {torch.float32}
    return config


# ---------------------------------------------------------------------------------------------
# LoRA


def test_lora_adapter_export_loads_onto_the_base_with_the_training_logits(lora_run):
    from peft import PeftModel

    out = lora_run.adapter
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= {
        p.name for p in out.iterdir()
    }
    assert not (out / "model.safetensors").exists()
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"
    assert adapter["base_model_name_or_path"] == lora_run.cfg.model.name_or_path
    # The run ended at its last checkpoint: the run's own adapter and the export are one.
    _assert_same_files(out, lora_run.run / "model", "adapter_model.safetensors")

    want = training_logits(lora_run)
    got = _logits(PeftModel.from_pretrained(_base(lora_run), out))
    assert _max_diff(got, want) <= 1e-5
    assert _max_diff(_logits(_base(lora_run)), want) > 1e-2  # the adapter really trained


def test_lora_merged_export_is_a_plain_model_with_the_training_logits(lora_run):
    from transformers import AutoModelForCausalLM

    _assert_plain_model_dir(lora_run.merged)
    merged = AutoModelForCausalLM.from_pretrained(lora_run.merged)
    assert not any("lora" in n for n, _ in merged.named_modules())
    assert _max_diff(_logits(merged), training_logits(lora_run)) <= 1e-5
    # output.merge_adapter: the end of the run wrote the same merged model beside its adapter.
    assert (lora_run.run / "model" / "adapter_config.json").is_file()
    _assert_same_files(lora_run.merged, lora_run.run / "model-merged", "model.safetensors")


# ---------------------------------------------------------------------------------------------
# QLoRA


def test_qlora_adapter_export_loads_onto_the_4bit_base_with_the_training_logits(qlora_run):
    from peft import PeftModel

    _assert_same_files(qlora_run.adapter, qlora_run.run / "model", "adapter_model.safetensors")
    want = training_logits(qlora_run)
    got = _logits(PeftModel.from_pretrained(_base(qlora_run, quantized=True), qlora_run.adapter))
    # The same 4-bit codes (quantization is deterministic) and the same adapter: bit for bit.
    assert torch.equal(got, want)


def test_qlora_merges_into_the_dequantized_base_within_float_rounding(qlora_run):
    """NF4 moves each base weight to the nearest of 16 levels scaled by its block's absmax: the
    adapter trained on top of those weights, not the original ones. Merging it into the
    original weights misses that whole rounding (3.2e-2 in the logits here, which reach 0.57);
    merging into the 4-bit codes rounds the update itself away (7.3e-2). Merged into the
    dequantized base, the adapter is added to the very weights it trained against, and only
    float32 summation order is left: measured 1.8e-7 here (2.4e-7 in the probe), so 1e-5 is
    tight against the wrong merges yet robust to a BLAS that sums in another order."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    _assert_plain_model_dir(qlora_run.merged)
    merged = AutoModelForCausalLM.from_pretrained(qlora_run.merged)
    assert all(type(m).__name__ != "Linear4bit" for m in merged.modules())
    want = training_logits(qlora_run)
    assert _max_diff(_logits(merged), want) <= 1e-5
    _assert_same_files(qlora_run.merged, qlora_run.run / "model-merged", "model.safetensors")

    # The wrong merge: the adapter onto the original (unquantized) weights misses the
    # quantization error the adapter was trained on top of.
    naive = PeftModel.from_pretrained(_base(qlora_run), qlora_run.adapter).merge_and_unload()
    assert _max_diff(_logits(naive), want) > 1e-3


# ---------------------------------------------------------------------------------------------
# Tied input and output embeddings


def test_tied_embeddings_lora_exports_adapter_and_merged_model_tied(tied_lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    done = tied_lora_run
    want = training_logits(done)
    base = _base(done)
    assert base.lm_head.weight is base.model.embed_tokens.weight
    adapted = PeftModel.from_pretrained(base, done.adapter)
    assert _max_diff(_logits(adapted), want) <= 1e-5

    config = _assert_plain_model_dir(done.merged)
    assert config["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(done.merged / "model.safetensors")  # written once
    merged = AutoModelForCausalLM.from_pretrained(done.merged)
    assert merged.lm_head.weight is merged.model.embed_tokens.weight
    assert _max_diff(_logits(merged), want) <= 1e-5
    assert not (done.run / "model-merged").exists()  # output.merge_adapter is off by default


# ---------------------------------------------------------------------------------------------
# Full fine-tunes and errors


def test_merge_of_a_full_checkpoint_exports_it_unchanged_with_a_note(tiny_assets, tmp_path, capsys):
    """--merge asks for a full model, which a full fine-tune's export already is: same files,
    and a note saying so (a script may pass --merge whatever the method)."""
    from launch.export import main as export_main

    run = tmp_path / "run"
    launcher.run_ranks(_train_rank, 1, tiny_config_args(tiny_assets, run, "train.max_steps=2"))
    plain, merged = tmp_path / "plain", tmp_path / "merged"
    assert export_main([str(run / "checkpoints"), "--output", str(plain)]) == 0
    capsys.readouterr()
    assert export_main([str(run / "checkpoints"), "--output", str(merged), "--merge"]) == 0
    assert "full fine-tune (method: full), exported in full as it is" in capsys.readouterr().err
    _assert_same_files(plain, merged, "model.safetensors")
    assert sorted(p.name for p in plain.iterdir()) == sorted(p.name for p in merged.iterdir())


def test_adapters_that_do_not_fit_the_checkpoint_are_refused(lora_run):
    """A base at model.name_or_path that changed since training (another layer count) builds
    other adapters than the checkpoint holds: refused, naming the first one, not exported with
    untrained (no-op) adapters."""
    from launch.export import check_adapters
    from trainer.checkpoint.files import CheckpointError
    from trainer.engine.base import model_fingerprint
    from trainer.model.methods import load_model

    ckpt = lora_run.newest_checkpoint()
    model = load_model(lora_run.cfg, CPU)
    fingerprint = model_fingerprint(model)
    check_adapters(ckpt, fingerprint, model)
    fewer = dict(list(fingerprint.items())[:-1])  # the checkpoint trained one adapter less
    gone = next(reversed(fingerprint))
    with pytest.raises(CheckpointError) as e:
        check_adapters(ckpt, fewer, model)
    assert str(e.value) == (
        f"{ckpt}: the checkpoint's adapters do not fit the model at model.name_or_path "
        f"(1 differ, first: {gone}: checkpoint None vs model {fingerprint[gone]})"
    )


def test_a_qlora_checkpoint_without_bitsandbytes_is_one_line_naming_the_config(
    qlora_run, tmp_path, capsys, monkeypatch
):
    import launch.export as export
    from trainer.model.methods import MethodError

    def no_bnb(cfg, device):
        raise MethodError("method=qlora needs a working bitsandbytes (ImportError: none)")

    monkeypatch.setattr(export, "load_model", no_bnb)
    rc = export.main([str(qlora_run.run / "checkpoints"), "--output", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    ckpt = qlora_run.newest_checkpoint()
    assert err == (
        f"error: {ckpt / 'config.yaml'}: method=qlora needs a working bitsandbytes "
        "(ImportError: none)"
    )
