"""LoRA and QLoRA under DeepSpeed ZeRO-2 and ZeRO-3, on 2 CPU ranks through the real CLI.

Each DeepSpeed run is compared with the same run under DDP (no LoRA dropout, fp32 compute):
per-step losses agree to 1e-4 (relative), the end-of-run adapter has the DDP adapter's keys and
shapes and values (not the empty adapter ZeRO-3 runs are known to write, trl #4416), and the
checkpoints hold the adapters and their optimizer state only (`launch.export` turns them into
the run's own adapter). Gradient checkpointing is on in every run: non-reentrant under DDP and
ZeRO-2, reentrant under ZeRO-3 (build_deepspeed_engine). The ZeRO-3 QLoRA run is SIGKILLed once
and resumes by itself, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_checkpoint_resume import last_losses, torchrun_train
from tests.test_deepspeed import DS_CONFIGS, _run_config, assert_losses_close, ds_args

# Every run: 2 ranks x micro-batch 4 x accumulation 2 (configs/tiny.yaml), checkpoints every 2
# steps. A small rank keeps the adapter far smaller than the base, so a checkpoint that carried
# any of the base would show in its tensor count.
COMMON = [
    "lora.dropout=0",  # its masks depend on how samples fall on ranks
    "lora.r=4",
    "train.precision=fp32",
    "train.max_steps=6",
    "checkpoint.every_steps=2",
    "model.gradient_checkpointing=true",
]
METHODS = {
    "lora": ["method=lora"],
    "qlora": ["method=qlora", "quantization.compute_dtype=float32"],
}
REENTRANT_LINE = "gradient checkpointing: reentrant (ZeRO-3 with frozen parameters)"


# ---------------------------------------------------------------------------------------------
# Configs: every shipped DeepSpeed JSON takes both methods; ZeRO++ weight quantization does not
# take a bitsandbytes base.


@pytest.mark.parametrize("method", ["lora", "qlora"])
@pytest.mark.parametrize("path", sorted(DS_CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_take_adapter_methods(path, method):
    from trainer.engine.deepspeed_config import validate_deepspeed_config

    cfg, derived = _run_config(f"train.deepspeed_config={path}", *METHODS[method])
    assert validate_deepspeed_config(cfg, derived, "cpu") is not None


@pytest.mark.parametrize("key", ["zero_quantized_weights", "zero_quantized_nontrainable_weights"])
def test_zero_quantized_weights_refused_with_qlora(tmp_path, key):
    from trainer.config import ConfigError
    from trainer.engine.deepspeed_config import validate_deepspeed_config

    ds = json.loads((DS_CONFIGS / "zero3.json").read_text())
    ds["zero_optimization"][key] = True
    path = tmp_path / "zeropp.json"
    path.write_text(json.dumps(ds))
    cfg, derived = _run_config(f"train.deepspeed_config={path}", *METHODS["qlora"])
    with pytest.raises(ConfigError) as err:
        validate_deepspeed_config(cfg, derived, "cpu")
    assert err.value.problems == [
        f"deepspeed zero_optimization.{key}=true ({path}) conflicts with method=qlora: ZeRO++ "
        "re-quantizes the weights to int8, which corrupts the bitsandbytes-quantized base; "
        "remove it (or use method=lora)"
    ]
    # A float base (LoRA) is only rounded, as ZeRO++ intends.
    cfg, derived = _run_config(f"train.deepspeed_config={path}", *METHODS["lora"])
    assert validate_deepspeed_config(cfg, derived, "cpu")["zero_optimization"][key] is True


# ---------------------------------------------------------------------------------------------
# Training on 2 ranks against DDP.


def _train(assets: Path, run_dir: Path, *overrides: str, fault: str | None = None) -> str:
    """One 2-rank torchrun of launch.train; its output. A fault must kill it, else it must
    succeed."""
    proc = torchrun_train(assets, run_dir, *COMMON, *overrides, fault=fault)
    if fault is None:
        assert proc.returncode == 0, proc.stdout[-3000:]
    else:
        assert proc.returncode != 0, f"{fault}: the injected kill did not happen"
    return proc.stdout


def _losses(run_dir: Path) -> list[float]:
    return [loss for _, loss in sorted(last_losses(run_dir).items())]


@pytest.fixture(scope="module")
def ddp_run(tiny_assets, tmp_path_factory):
    """`ddp_run(method)`: the run directory of the DDP reference run (made once per module)."""
    cache: dict[str, Path] = {}

    def get(method: str) -> Path:
        if method not in cache:
            run_dir = tmp_path_factory.mktemp(f"ddp_{method}") / "run"
            _train(tiny_assets, run_dir, *METHODS[method])
            cache[method] = run_dir
        return cache[method]

    return get


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "adapter_model.safetensors")


def assert_adapter_matches(run_dir: Path, ddp_dir: Path) -> dict[str, torch.Tensor]:
    """The run's adapter has the DDP run's tensors (names, shapes) and values."""
    got, want = _adapter(run_dir), _adapter(ddp_dir)
    assert want, "the DDP adapter is empty"
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
    assert all(v.numel() > 0 for v in got.values())
    assert any(bool(v.abs().sum() > 0) for k, v in got.items() if "lora_B" in k)  # trained
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    print(f"adapter: {len(got)} tensors, worst absolute difference to DDP's {worst:.3g}")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)
    return got


def _tensors(obj) -> list[torch.Tensor]:
    if torch.is_tensor(obj):
        return [obj]
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _tensors(v)]
    if isinstance(obj, (list, tuple)):
        return [t for v in obj for t in _tensors(v)]
    return []


def assert_checkpoint_holds_adapter_only(run_dir: Path, adapter: dict[str, torch.Tensor]) -> int:
    """The newest checkpoint's DeepSpeed files hold the adapter and its optimizer state, nothing
    of the frozen base: its module states name LoRA weights only (no 4-bit weight, no
    quantization state), and all the files together hold at most the adapter's numbers 4 times
    over (the module copy ZeRO-1/2 write, fp32 masters and two Adam moments) plus padding.
    Returns the files' total size in bytes."""
    step_dir = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    files = sorted((step_dir / "engine" / "ds").glob("*.pt"))
    assert files, step_dir
    num_trainable = sum(v.numel() for v in adapter.values())
    num_saved = 0
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=False)
        if "module" in state:
            names = set(state["module"])
            assert names and all(".lora_A." in n or ".lora_B." in n for n in names), (f, names)
            assert len(names) == len(adapter), (f, len(names), len(adapter))
        num_saved += sum(t.numel() for t in _tensors(state) if t.is_floating_point())
    assert num_saved <= 4 * num_trainable + 1024, (num_saved, num_trainable)
    size = sum(f.stat().st_size for f in files)
    print(f"{run_dir.name}: {num_saved} numbers saved for {num_trainable} trainable, {size} B")
    return size


def assert_export_is_the_runs_adapter(run_dir: Path, out: Path) -> None:
    """`launch.export` of the run's last checkpoint (the ZeRO shards merged by zero_to_fp32, onto
    the base from model.name_or_path) writes the adapter the run itself wrote at its end."""
    from launch.export import main as export_main

    assert export_main([str(run_dir / "checkpoints"), "--output", str(out)]) == 0
    got, want = load_file(out / "adapter_model.safetensors"), _adapter(run_dir)
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero2_qlora_matches_ddp(tiny_assets, tmp_path, ddp_run):
    ddp = ddp_run("qlora")
    run = tmp_path / "run"
    out = _train(tiny_assets, run, *METHODS["qlora"], *ds_args("zero2.json"))
    assert REENTRANT_LINE not in out  # ZeRO-2 keeps the non-reentrant checkpointing
    assert_losses_close(_losses(run), _losses(ddp), 1e-4)
    adapter = assert_adapter_matches(run, ddp)
    assert_checkpoint_holds_adapter_only(run, adapter)
    assert_export_is_the_runs_adapter(run, tmp_path / "exported")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_lora_matches_ddp(tiny_assets, tmp_path, ddp_run):
    ddp = ddp_run("lora")
    run = tmp_path / "run"
    out = _train(tiny_assets, run, *METHODS["lora"], *ds_args("zero3.json"))
    assert REENTRANT_LINE in out
    assert_losses_close(_losses(run), _losses(ddp), 1e-4)
    adapter = assert_adapter_matches(run, ddp)  # gathered from the partitions, not empty
    assert_checkpoint_holds_adapter_only(run, adapter)
    assert_export_is_the_runs_adapter(run, tmp_path / "exported")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero3_qlora_matches_ddp_and_resumes_after_sigkill(tiny_assets, tmp_path, ddp_run):
    """Rank 0 is killed with step 4's shards written (nothing else of that checkpoint); the
    rerun resumes from step 2 and redoes steps 3-4 with the losses they had before the kill,
    bit for bit (the adapter, its fp32 masters and Adam moments came back; the 4-bit base was
    loaded and quantized again), then goes on as the DDP run does."""
    ddp = ddp_run("qlora")
    run = tmp_path / "run"
    args = (*METHODS["qlora"], *ds_args("zero3.json"))
    _train(tiny_assets, run, *args, fault="after_engine_state:4:0")
    before_kill = last_losses(run)
    assert sorted(before_kill) == [1, 2, 3, 4], before_kill
    out = _train(tiny_assets, run, *args)
    assert "continuing from" in out and "step_00000002" in out, out[-3000:]
    assert REENTRANT_LINE in out
    resumed = last_losses(run)
    assert [resumed[s] for s in (3, 4)] == [before_kill[s] for s in (3, 4)], (resumed, before_kill)
    assert_losses_close(_losses(run), _losses(ddp), 1e-4)
    adapter = assert_adapter_matches(run, ddp)
    assert_checkpoint_holds_adapter_only(run, adapter)
    config = json.loads((run / "model" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4
