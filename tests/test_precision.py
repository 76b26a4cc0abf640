"""Precision policy (trainer/engine/precision.py): fp32 master weights under bf16, fp16 loss scaling,
DeepSpeed's bf16 settings filled from the policy, and DDP vs ZeRO-1/2/3 under bf16 on CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from data.loader import collate_right_pad
from data.templates import TokenizedSample
from tests.conftest import tiny_config_args
from tests.test_deepspeed import DS_CONFIGS, _resume_rank, ds_args
from tests.test_distributed_training import _train_rank
from tests.tiny_models import CPU1
from trainer.config import ConfigError
from trainer.engine.precision import resolve_precision

REPO = Path(__file__).resolve().parent.parent
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# ---------------------------------------------------------------------------------------------
# 1. The policy table: train.precision x model.dtype x device -> what each backend does.


@pytest.mark.parametrize(
    ("precision", "model_dtype", "device", "params", "compute", "autocast", "accum", "scaler"),
    [
        ("auto", "float32", "cpu", FP32, FP32, None, FP32, False),
        ("auto", "bfloat16", "cpu", FP32, FP32, None, FP32, False),
        ("fp32", "bfloat16", "cpu", FP32, FP32, None, FP32, False),
        ("bf16", "float32", "cpu", FP32, BF16, BF16, FP32, False),
        ("bf16", "bfloat16", "cpu", FP32, BF16, BF16, FP32, False),
        ("bf16-pure", "bfloat16", "cpu", BF16, BF16, None, BF16, False),
        ("fp16", "float16", "cpu", FP32, FP16, FP16, FP32, True),
        ("fp16", "bfloat16", "cpu", FP32, FP16, FP16, FP32, True),
    ],
)
def test_policy_table(precision, model_dtype, device, params, compute, autocast, accum, scaler):
    p = resolve_precision(precision, model_dtype, device, "ddp")
    assert p.load_dtype == getattr(torch, model_dtype)
    assert (p.param_dtype, p.compute_dtype, p.autocast_dtype) == (params, compute, autocast)
    assert (p.grad_accum_dtype, p.loss_scaling) == (accum, scaler)


def test_auto_is_bf16_compute_on_a_gpu():
    p = resolve_precision("auto", "bfloat16", "cuda", "deepspeed")
    assert (p.param_dtype, p.compute_dtype, p.grad_accum_dtype) == (FP32, BF16, FP32)
    assert p.deepspeed_bf16 and "compute in bf16" in p.describe()
    ddp = resolve_precision("auto", "float32", "cuda", "ddp")
    assert (ddp.param_dtype, ddp.autocast_dtype) == (FP32, BF16)


def _config(*overrides: str):
    from trainer.config import load_config

    return load_config(REPO / "configs" / "tiny.yaml", list(overrides))


@pytest.mark.parametrize(
    ("overrides", "words"),
    [
        (["train.precision=bf16-pure"], "set model.dtype=bfloat16"),
        (
            ["train.precision=fp16", "train.backend=deepspeed", "train.deepspeed_config=x.json"],
            "train.precision=fp16 is not supported with train.backend=deepspeed",
        ),
        (
            [
                "train.precision=bf16-pure",
                "model.dtype=bfloat16",
                "train.backend=deepspeed",
                "train.deepspeed_config=x.json",
            ],
            "train.precision=bf16-pure is not supported with train.backend=deepspeed",
        ),
    ],
)
def test_combinations_no_backend_honours_are_refused(overrides, words):
    with pytest.raises(ConfigError) as err:
        _config(*overrides)
    assert len(err.value.problems) == 1 and words in err.value.problems[0], err.value.problems


# ---------------------------------------------------------------------------------------------
# 2. bf16 full fine-tuning keeps fp32 master weights: a 1e-5 update to a 0.02 weight survives.


def _one_step_delta(tiny_assets: Path, tmp_path: Path, *overrides: str) -> tuple[torch.Tensor, Any]:
    """Build the engine the CLI builds (model.dtype=bfloat16, lr 1e-5, no decay), set one weight
    to 0.02, take one optimizer step; return (that weight's change, the engine)."""
    from trainer.build import build_engine
    from trainer.config import load_config, resolve_batch, with_total_steps
    from trainer.loop import train_step

    argv = tiny_config_args(
        tiny_assets,
        tmp_path,
        "model.dtype=bfloat16",
        "optim.lr=1e-5",
        "optim.weight_decay=0.0",
        "schedule.warmup_steps=0",
        "schedule.decay=constant",
        "train.max_grad_norm=null",
        *overrides,
    )
    cfg = load_config(argv[0], argv[1:])
    derived = with_total_steps(cfg, resolve_batch(cfg, 1), None)
    engine = build_engine(cfg, derived, CPU1)
    weight = engine.unwrapped_model().model.layers[0].mlp.down_proj.weight
    with torch.no_grad():
        weight[0, 0] = 0.02
    before = weight[0, 0].item()
    ids = (torch.arange(40).reshape(2, 20) % 50 + 3).tolist()
    batch = collate_right_pad([(i, TokenizedSample(r, r)) for i, r in enumerate(ids)], 0)
    result = train_step(engine, [batch], None)
    assert not result.skipped
    return torch.tensor(weight[0, 0].item() - before), engine


def test_bf16_full_finetuning_keeps_fp32_master_weights(tiny_assets, tmp_path):
    delta, engine = _one_step_delta(tiny_assets, tmp_path / "mixed", "train.precision=bf16")
    assert engine.policy.load_dtype == BF16
    assert {p.dtype for p in engine.unwrapped_model().parameters()} == {FP32}
    # Adam's first step moves every weight by lr * g / (|g| + eps) ~ lr = 1e-5.
    assert abs(abs(delta.item()) - 1e-5) < 5e-7, delta.item()
    # The control: in pure bf16 the same update is below half the spacing of bf16 numbers at
    # 0.02 (2^-13 ~ 1.2e-4) and rounds away: this is what the fp32 masters prevent.
    pure, engine = _one_step_delta(tiny_assets, tmp_path / "pure", "train.precision=bf16-pure")
    assert {p.dtype for p in engine.unwrapped_model().parameters()} == {BF16}
    assert pure.item() == 0.0


# ---------------------------------------------------------------------------------------------
# 3. fp16: a GradScaler inside DDPEngine; an overflow skips the step and the scale backs off.


def set_scale(scaler: torch.amp.GradScaler, scale: float) -> None:
    scaler.load_state_dict({**scaler.state_dict(), "scale": scale})


def test_fp16_trains_with_a_loss_scaler_that_backs_off_on_overflow(tiny_assets, tmp_path):
    from trainer.build import build_engine
    from trainer.config import load_config, resolve_batch, with_total_steps
    from trainer.engine.base import GRAD_SCALER_FILE
    from trainer.loop import train_step

    argv = tiny_config_args(tiny_assets, tmp_path, "train.precision=fp16", "model.dtype=float16")
    cfg = load_config(argv[0], argv[1:])
    derived = with_total_steps(cfg, resolve_batch(cfg, 1), None)
    engine = build_engine(cfg, derived, CPU1)
    model = engine.unwrapped_model()
    assert engine.scaler is not None and {p.dtype for p in model.parameters()} == {FP32}
    ids = (torch.arange(40).reshape(2, 20) % 50 + 3).tolist()
    batch = collate_right_pad([(i, TokenizedSample(r, r)) for i, r in enumerate(ids)], 0)
    set_scale(engine.scaler, 2.0**10)
    losses = [train_step(engine, [batch], 1.0) for _ in range(3)]
    assert not any(r.skipped for r in losses) and losses[-1].loss < losses[0].loss

    set_scale(engine.scaler, 2.0**40)  # far beyond fp16's 65504: the backward overflows
    before = [p.detach().clone() for p in model.parameters()]
    result = train_step(engine, [batch], 1.0)
    assert result.skipped  # the loop saw a non-finite norm and skipped on every rank
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert engine.scaler.get_scale() == 2.0**39  # backed off

    engine.save_state(tmp_path / "state")  # the scale is part of the training state
    assert json.loads((tmp_path / "state" / GRAD_SCALER_FILE).read_text())["scale"] == 2.0**39
    again = build_engine(cfg, derived, CPU1)
    again.load_state(tmp_path / "state")
    assert again.scaler.get_scale() == 2.0**39


# ---------------------------------------------------------------------------------------------
# 4. DeepSpeed's JSON from the policy: bf16 with fp32 gradient accumulation, conflicts named.


def _ds_config(path: Path | str, *overrides: str):
    from trainer.config import resolve_batch
    from trainer.engine.deepspeed_config import validate_deepspeed_config

    cfg = _config("train.backend=deepspeed", f"train.deepspeed_config={path}", *overrides)
    return validate_deepspeed_config(cfg, resolve_batch(cfg, 2), "cpu")


@pytest.mark.parametrize("path", sorted(DS_CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_deepspeed_bf16_accumulates_gradients_in_fp32(path):
    ds = _ds_config(path, "train.precision=bf16")
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    # Without it DeepSpeed sums gradients in bf16 (and ZeRO-1 crashed on step 1 with it set).
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    fp32 = _ds_config(path)  # auto on CPU: fp32 throughout, as before
    assert fp32["bf16"]["enabled"] is False and fp32["data_types"]["grad_accum_dtype"] == "fp32"


def test_deepspeed_bf16_gradient_accumulation_is_refused_naming_keys(tmp_path):
    user = json.loads((DS_CONFIGS / "zero1.json").read_text())
    for given, ok in (("bf16", False), ("fp32", True), ("float32", True)):
        user["data_types"] = {"grad_accum_dtype": given}
        path = tmp_path / f"{given}.json"
        path.write_text(json.dumps(user))
        if ok:
            assert _ds_config(path, "train.precision=bf16")["data_types"]["grad_accum_dtype"]
            continue
        with pytest.raises(ConfigError) as err:
            _ds_config(path, "train.precision=bf16")
        (problem,) = err.value.problems
        assert f"deepspeed data_types.grad_accum_dtype='bf16' ({path}) != fp32" in problem
        assert "train.precision='bf16'" in problem


# ---------------------------------------------------------------------------------------------
# 5. DDP vs ZeRO-1/2/3 under bf16 on CPU (2 ranks, 20 steps, clipping and weight decay active;
#    ZeRO-1 runs on DeepSpeed's BF16_Optimizer: the bf16 + fp32-accumulation case).
#
# Tolerances. bf16 keeps 8 significant bits: one rounding is off by up to 2^-9 ~ 2e-3 relative
# (2^-8 ~ 4e-3 between neighbours). The backends round in different places: DDP autocasts fp32
# weights per matmul and keeps the residual stream in fp32; DeepSpeed runs a bf16 copy of the
# weights, so every activation between matmuls is bf16 too. Both start from the same
# bf16-representable weights (model.dtype=bfloat16), keep fp32 masters and sum gradients in fp32.
# - The gradient is computed through a bf16 backward in both, so its pre-clip norm carries about
#   one bf16 rounding of relative error: measured worst 2.8e-3 over the 3 x 20 steps (CPU, torch
#   2.13, DeepSpeed 0.19.8; 1.1e-3 between DDP in bf16 and in fp32). Bound: 1e-2 (3.6x margin,
#   ~2.5 bf16 spacings).
# - The loss is computed in fp32 from bf16 logits and averages the rounding of ~100 target
#   tokens, so it agrees far better than one rounding: measured worst 1.4e-4 (ZeRO-2/3; 0.95e-4
#   ZeRO-1). Bound: 5e-4 (3.6x margin).
# A wrong normalization exceeds them: a wrong gradient scale (a missing x world_size, DeepSpeed
# dividing by the accumulation steps again) moves the norm by a factor of 2 or more, and
# mean-of-means, the subtle one, by up to 2.7e-2 here
# (`test_wrong_normalization_exceeds_the_bf16_tolerance`).
BF16_LOSS_TOLERANCE = 5e-4
BF16_NORM_TOLERANCE = 1e-2
BF16_RUN = [
    "train.precision=bf16",
    "model.dtype=bfloat16",
    "train.max_steps=20",
    "train.max_grad_norm=0.5",
    "optim.weight_decay=1.0",
    "output.save_hf_model=false",
    "checkpoint.save_at_end=false",
]


def read_curves(run_dir: Path) -> dict[str, list[float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = ("train/loss", "train/grad_norm")
    return {k: [r[k] for r in rows if k in r] for k in keys}


def worst_relative_difference(got: list[float], want: list[float]) -> float:
    assert len(got) == len(want), (got, want)
    return max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True))


@pytest.fixture(scope="module")
def ddp_bf16(tiny_assets, tmp_path_factory) -> dict[str, list[float]]:
    from tests.launcher import run_ranks

    run_dir = tmp_path_factory.mktemp("ddp_bf16")
    run_ranks(_train_rank, 2, tiny_config_args(tiny_assets, run_dir, *BF16_RUN), timeout=240)
    curves = read_curves(run_dir)
    losses = curves["train/loss"]
    assert len(losses) == 20 and losses[-1] < losses[0]
    return curves


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_ddp_under_bf16(stage, tiny_assets, tmp_path, ranks, ddp_bf16):
    argv = tiny_config_args(tiny_assets, tmp_path, *BF16_RUN, *ds_args(f"zero{stage}.json"))
    ranks(_train_rank, 2, argv, timeout=300)
    got = read_curves(tmp_path)
    loss = worst_relative_difference(got["train/loss"], ddp_bf16["train/loss"])
    norm = worst_relative_difference(got["train/grad_norm"], ddp_bf16["train/grad_norm"])
    print(f"ZeRO-{stage} vs DDP, bf16: worst relative difference loss {loss:.3g}, norm {norm:.3g}")
    assert loss <= BF16_LOSS_TOLERANCE and norm <= BF16_NORM_TOLERANCE, (loss, norm)


class _MeanOfMeans:
    """Wraps an engine: each micro-batch's loss is divided by its own target-token count and the
    micro-batches are averaged (the classic wrong normalization), instead of dividing by the
    step's global count."""

    def __init__(self, inner, num_micro_steps: int):
        self.inner, self.num_micro_steps = inner, num_micro_steps

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward_backward(self, batch, loss_scale, is_last_micro_step):
        from trainer.model.loss import count_target_tokens

        # DDP averages over ranks: the gradient is the mean of every micro-batch's mean loss.
        tokens = count_target_tokens(batch["targets"]).clamp(min=1).float()
        scale = (1.0 / (tokens * self.num_micro_steps)).to(loss_scale.device)
        return self.inner.forward_backward(batch, scale, is_last_micro_step)


def _mean_of_means_rank(argv: list[str]) -> dict:
    import launch.train as lt

    build = lt.build_engine
    lt.build_engine = lambda cfg, derived, ctx: _MeanOfMeans(
        build(cfg, derived, ctx), derived.grad_accum_steps
    )
    return lt.run(argv)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_wrong_normalization_exceeds_the_bf16_tolerance(tiny_assets, tmp_path, ranks, ddp_bf16):
    ranks(_mean_of_means_rank, 2, tiny_config_args(tiny_assets, tmp_path, *BF16_RUN))
    got = read_curves(tmp_path)
    norm = worst_relative_difference(got["train/grad_norm"], ddp_bf16["train/grad_norm"])
    print(f"mean-of-means vs token-exact, bf16: worst relative norm difference {norm:.3g}")
    assert norm > 2 * BF16_NORM_TOLERANCE, norm


def _resume_rank_with_masters(*args) -> dict:
    """`_resume_rank`, also returning the optimizer's type, its fp32 master partition at the end
    and (when loading) the model's bf16 working weights right after the load."""
    import trainer.build

    engines, loaded = [], []
    build = trainer.build.build_engine

    def capture(*a):
        engine = build(*a)
        load = engine.load_state

        def load_and_record(directory):
            load(directory)
            loaded.append({k: v.clone() for k, v in engine.unwrapped_model().state_dict().items()})

        engine.load_state = load_and_record
        engines.append(engine)
        return engine

    trainer.build.build_engine = capture
    losses = _resume_rank(*args)
    opt = engines[0].ds.optimizer
    masters = torch.cat([t.detach().flatten() for t in opt.fp32_groups_flat_partition])
    return {
        "losses": losses,
        "optimizer": type(opt).__name__,
        "masters": masters,
        "loaded_weights": loaded[0] if loaded else None,
    }


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero1_bf16_fp32_accumulation_resumes_and_exports(tiny_assets, tmp_path, ranks):
    """ZeRO-1 + bf16 + fp32 accumulation runs on DeepSpeed's BF16_Optimizer (it crashed on the
    first step before): a resumed run continues bit for bit, fp32 masters included (not re-made
    from the bf16 weights), and the checkpoint exports (zero_to_fp32) to those fp32 masters."""
    from transformers import AutoModelForCausalLM

    from trainer.engine.deepspeed_engine import load_zero_weights_for_export

    argv = tiny_config_args(
        tiny_assets,
        tmp_path / "run",
        "train.precision=bf16",
        "model.dtype=bfloat16",
        "train.max_steps=6",
        *ds_args("zero1.json"),
    )
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    full = ranks(_resume_rank_with_masters, 2, argv, 6, 3, ckpt, None, timeout=300)
    resumed = ranks(_resume_rank_with_masters, 2, argv, 6, 3, None, ckpt, timeout=300)
    assert full[0]["optimizer"] == "BF16_Optimizer"
    assert resumed[0]["losses"] == full[0]["losses"][3:], (resumed[0]["losses"], full[0]["losses"])
    for a, b in zip(resumed, full, strict=True):  # each rank's partition
        assert torch.equal(a["masters"], b["masters"])
    m = full[0]["masters"]
    assert not torch.equal(m, m.to(BF16).to(FP32))  # they hold what bf16 cannot

    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "model")
    load_zero_weights_for_export(ckpt, model)
    working = resumed[0]["loaded_weights"]  # bf16(masters) at the checkpoint
    for name, p in model.named_parameters():
        assert p.dtype == FP32 and torch.equal(p.detach().to(BF16), working[name]), name
    weight = model.model.layers[0].mlp.down_proj.weight.detach()
    assert not torch.equal(weight, weight.to(BF16).to(FP32))  # the masters, not the bf16 copy
