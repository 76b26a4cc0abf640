"""DeepSpeed ZeRO behind the one loop: equivalence with DDP, sharded resume, export, skip.

Every multi-rank test runs real gloo ranks (DeepSpeed's CPU accelerator). Its communication op
is built by `make install` into .venv/torch_extensions (conftest points TORCH_EXTENSIONS_DIR
there); without that, the first DeepSpeed test builds it (half a minute to a few minutes).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config_args
from tests.test_distributed_training import _nonfinite_rank, _train_rank, read_losses

REPO = Path(__file__).resolve().parent.parent
DS_CONFIGS = REPO / "configs" / "deepspeed"


def ds_args(name: str) -> list[str]:
    return ["train.backend=deepspeed", f"train.deepspeed_config={DS_CONFIGS / name}"]


def assert_losses_close(got: list[float], want: list[float], rel: float) -> None:
    assert len(got) == len(want), (got, want)
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True))
    print(f"worst relative loss difference: {worst:.3g}")  # shown with -s / -rP
    assert worst <= rel, f"worst relative loss difference {worst:.3g} > {rel}: {got} vs {want}"


# ---------------------------------------------------------------------------------------------
# 1. ZeRO-1/2/3 train exactly like DDP (losses AND updates: a wrong gradient scale, a missing
#    clip or a wrong boundary changes the losses from step 2 on).

# Warmup 2 then lr 1e-3 cosine; clipping at 0.5 is active on most steps of this tiny model, so
# a wrong pre-clip norm or a clip DeepSpeed skipped shows up in the losses.
# Strong weight decay, so that decay applied to the wrong parameters (biases/norms, or not to
# matrices: ZeRO-3's partitioned parameters all look 1-D) moves the losses by ~1e-3.
EQUIV = [
    "train.max_steps=20",
    "train.max_grad_norm=0.5",
    "optim.weight_decay=1.0",
    "output.save_hf_model=false",
]


@pytest.fixture(scope="module")
def ddp_losses(tiny_assets, tmp_path_factory) -> list[float]:
    from tests.launcher import run_ranks

    run_dir = tmp_path_factory.mktemp("ddp")
    run_ranks(_train_rank, 2, tiny_config_args(tiny_assets, run_dir, *EQUIV), timeout=240)
    losses = read_losses(run_dir)
    assert len(losses) == 20 and losses[-1] < losses[0]
    return losses


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_stage_matches_ddp(stage, tiny_assets, tmp_path, ranks, ddp_losses):
    argv = tiny_config_args(tiny_assets, tmp_path, *EQUIV, *ds_args(f"zero{stage}.json"))
    ranks(_train_rank, 2, argv, timeout=300)
    assert_losses_close(read_losses(tmp_path), ddp_losses, 1e-4)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_zero3_offload_trains(tiny_assets, tmp_path, ranks):
    argv = tiny_config_args(
        tiny_assets, tmp_path, "train.max_steps=12", "output.save_hf_model=false"
    )
    ranks(_train_rank, 2, argv + ds_args("zero3_offload.json"), timeout=300)
    losses = read_losses(tmp_path)
    assert len(losses) == 12 and all(map(math.isfinite, losses))
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 - 0.1, losses


# ---------------------------------------------------------------------------------------------
# 2. save_state / load_state: a resumed run continues exactly like the uninterrupted one.


def _resume_rank(argv: list[str], total: int, save_at: int | None, save_dir, load_dir) -> list:
    """Train steps [start, total) through the loop's own `train_step`; start = save_at when
    loading. Saves after step `save_at` when `save_dir` is given. Returns the per-step losses."""
    from launch.train import prepare
    from trainer.build import build_engine
    from trainer.dist import init_distributed, shutdown
    from trainer.loop import train_step

    p = prepare(argv)
    cfg, derived, batches = p.cfg, p.derived, p.train_batches
    ctx = init_distributed()
    try:
        engine = build_engine(cfg, derived, ctx)
        engine.train()
        stream = iter(batches)
        start = 0
        if load_dir is not None:
            engine.load_state(Path(load_dir))
            start = save_at
            for _ in range(start):  # the data position a checkpoint manager would restore
                next(stream)
        losses = []
        for step in range(start, total):
            losses.append(train_step(engine, next(stream), cfg.train.max_grad_norm).loss)
            if save_dir is not None and step + 1 == save_at:
                engine.save_state(Path(save_dir))
        return losses
    finally:
        shutdown(ctx)


RESUME = [
    "train.max_steps=8",
    "train.micro_batch_size=4",
    "train.grad_accum_steps=null",
    "train.global_batch_size=16",
]


@pytest.fixture(scope="module")
def saved_runs(tiny_assets, tmp_path_factory):
    """`saved_runs(stage)` -> (argv, checkpoint dir, losses of the uninterrupted 8 steps): one
    2-rank run per ZeRO stage that saved its state after step 4, shared by the resume tests."""
    from tests.launcher import run_ranks

    cache: dict[int, tuple[list[str], Path, list[float]]] = {}

    def get(stage: int) -> tuple[list[str], Path, list[float]]:
        if stage not in cache:
            root = tmp_path_factory.mktemp(f"zero{stage}_saved")
            argv = tiny_config_args(
                tiny_assets, root / "run", *RESUME, *ds_args(f"zero{stage}.json")
            )
            ckpt = root / "ckpt"
            ckpt.mkdir()
            full = run_ranks(_resume_rank, 2, argv, 8, 4, ckpt, None, timeout=300)[0]
            cache[stage] = (argv, ckpt, full)
        return cache[stage]

    return get


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("stage", [2, 3])
def test_save_load_round_trip_continues_identically(stage, saved_runs, ranks):
    argv, ckpt, full = saved_runs(stage)
    shards = sorted(p.name for p in (ckpt / "ds").glob("*optim_states.pt"))
    assert len(shards) == 2 and "rank_0" in shards[0] and "rank_1" in shards[1], shards
    resumed = ranks(_resume_rank, 2, argv, 8, 4, None, ckpt, timeout=300)[0]
    assert len(resumed) == 4
    # DeepSpeed on CPU is deterministic here: the continuation is bitwise identical.
    assert resumed == full[4:], (resumed, full[4:])


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_zero2_resume_on_fewer_ranks(saved_runs, ranks):
    """Saved at 2 ranks x accumulation 2, resumed at 1 rank x accumulation 4 (same global batch,
    same data order) through the universal-checkpoint conversion done by load_state. Agreement
    to 1e-4 also shows the Adam moments came back: restarting them moves the loss far more."""
    argv, ckpt, full = saved_runs(2)
    resumed = ranks(_resume_rank, 1, argv, 8, 4, None, ckpt, timeout=300)[0]
    assert (ckpt / "ds_universal").is_dir()
    assert_losses_close(resumed, full[4:], 1e-4)


# ---------------------------------------------------------------------------------------------
# 3. Export from ZeRO-3: the gathered state dict is a loadable HF model with the same logits.


def _export_rank(argv: list[str], out_dir: str) -> dict | None:
    from data.loader import collate_right_pad
    from data.templates import TokenizedSample
    from trainer.build import build_engine, seed_everything
    from trainer.config import load_config, resolve_batch, with_total_steps
    from trainer.dist import init_distributed, shutdown

    cfg = load_config(argv[0], argv[1:])
    derived = with_total_steps(cfg, resolve_batch(cfg, 2), None)
    seed_everything(cfg.seed)
    ctx = init_distributed()
    try:
        engine = build_engine(cfg, derived, ctx)
        ids = torch.arange(3, 43).reshape(2, 20) % 50 + 3
        batch = collate_right_pad(
            [(i, TokenizedSample(row.tolist(), row.tolist())) for i, row in enumerate(ids)], 0
        )
        # A few real updates so the exported weights differ from the initial ones.
        for _ in range(3):
            engine.forward_backward(batch, torch.tensor(1e-2), is_last_micro_step=True)
            engine.clip_grad_norm(cfg.train.max_grad_norm)
            engine.optimizer_step(skip=False)
        engine.eval()
        with torch.no_grad():
            logits = engine.forward(batch)
        state = engine.full_state_dict_for_export()
        if not ctx.is_main:
            assert state is None
            return None
        model = engine.unwrapped_model()
        model.config.save_pretrained(out_dir)  # config only: the weights are partitioned
        # Import inside the rank: the parent must not see a ZeRO-3 HfDeepSpeedConfig.
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, f"{out_dir}/model.safetensors")
        return {"logits": logits, "batch": batch, "keys": sorted(state)}
    finally:
        shutdown(ctx)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_zero3_export_reloads_with_same_logits(tiny_assets, tmp_path, ranks):
    from transformers import AutoModelForCausalLM

    argv = tiny_config_args(tiny_assets, tmp_path / "run", *ds_args("zero3.json"))
    out = tmp_path / "export"
    out.mkdir()
    first, second = ranks(_export_rank, 2, argv, str(out), timeout=240)
    assert second is None
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    initial = AutoModelForCausalLM.from_pretrained(tiny_assets / "model").eval()
    # Every parameter of the model came out full-size (nothing left partitioned / empty).
    assert {n for n, _ in model.named_parameters()} <= set(first["keys"])
    batch = {k: first["batch"][k] for k in ("input_ids", "attention_mask")}
    with torch.no_grad():
        logits = model(**batch, use_cache=False).logits
        before = initial(**batch, use_cache=False).logits
    err = (logits - first["logits"]).abs().max().item()
    assert err <= 1e-4, err
    assert (before - first["logits"]).abs().max().item() > 1e-3  # it really trained


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("stage_json", ["zero2.json", "zero3.json"])
def test_launch_export_of_zero_checkpoint_matches_trained_model(
    tiny_assets, tmp_path, ranks, stage_json
):
    """`python -m launch.export` on a ZeRO checkpoint (merged on the CPU by zero_to_fp32) gives
    the weights the run ended with (its own HF save, gathered from the ranks)."""
    from transformers import AutoModelForCausalLM

    from launch.export import main as export_main

    run = tmp_path / "run"
    ranks(_train_rank, 2, tiny_config_args(tiny_assets, run, *ds_args(stage_json)), timeout=240)
    out = tmp_path / "exported"
    assert export_main([str(run / "checkpoints"), "--output", str(out)]) == 0
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    trained = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    initial = AutoModelForCausalLM.from_pretrained(tiny_assets / "model").eval()
    ids = torch.tensor([[1, 20, 21, 22, 23, 5, 6]])
    with torch.no_grad():
        a, b, c = exported(ids).logits, trained(ids).logits, initial(ids).logits
    assert (a - b).abs().max().item() <= 1e-5
    assert (a - c).abs().max().item() > 1e-3


# ---------------------------------------------------------------------------------------------
# 4. Config validation: every shipped JSON resolves; conflicts are named, all at once.


def _run_config(*overrides: str):
    from trainer.config import load_config, resolve_batch

    cfg = load_config(
        REPO / "configs" / "tiny.yaml",
        ["train.backend=deepspeed", f"train.deepspeed_config={DS_CONFIGS / 'zero2.json'}"]
        + list(overrides),
    )
    return cfg, resolve_batch(cfg, 2)


@pytest.mark.parametrize("path", sorted(DS_CONFIGS.glob("*.json")), ids=lambda p: p.name)
def test_shipped_configs_resolve_from_run_config(path):
    from trainer.engine.deepspeed_config import validate_deepspeed_config

    cfg, derived = _run_config(f"train.deepspeed_config={path}", "train.max_grad_norm=0.7")
    ds = validate_deepspeed_config(cfg, derived, "cpu")
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 16
    assert ds["gradient_clipping"] == 0.7
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert ds["zero_optimization"]["stage"] in (1, 2, 3)
    assert "auto" not in json.dumps(ds)
    assert validate_deepspeed_config(cfg, derived, "cuda")["bf16"]["enabled"] is True
    cfg_ddp, _ = _run_config("train.backend=ddp", "train.deepspeed_config=null")
    assert validate_deepspeed_config(cfg_ddp, derived, "cpu") is None


def test_conflicts_are_reported_together_naming_both_keys(tmp_path):
    from trainer.config import ConfigError
    from trainer.engine.deepspeed_config import validate_deepspeed_config

    user = json.loads((DS_CONFIGS / "zero2.json").read_text())
    user |= {
        "train_micro_batch_size_per_gpu": 8,
        "gradient_clipping": 2.0,
        "train_batch_size": 16,  # agrees: not reported
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4}},
    }
    path = tmp_path / "x.json"
    path.write_text(json.dumps(user))
    cfg, derived = _run_config(f"train.deepspeed_config={path}")
    with pytest.raises(ConfigError) as err:
        validate_deepspeed_config(cfg, derived, "cpu")
    problems = err.value.problems
    assert len(problems) == 3, problems
    assert f"deepspeed train_micro_batch_size_per_gpu=8 ({path}) != train.micro_batch_size=4" in (
        problems
    )
    assert f"deepspeed gradient_clipping=2.0 ({path}) != train.max_grad_norm=1.0" in problems
    assert any("deepspeed optimizer" in p and "optim.*" in p for p in problems)


def test_missing_or_broken_json_is_one_line(tmp_path):
    from trainer.config import ConfigError
    from trainer.engine.deepspeed_config import validate_deepspeed_config

    broken = tmp_path / "broken.json"
    broken.write_text("{ not json")
    for path, words in ((tmp_path / "nope.json", "file not found"), (broken, "not valid JSON")):
        cfg, derived = _run_config(f"train.deepspeed_config={path}")
        with pytest.raises(ConfigError) as err:
            validate_deepspeed_config(cfg, derived, "cpu")
        assert len(err.value.problems) == 1 and words in err.value.problems[0]


# ---------------------------------------------------------------------------------------------
# 5. A NaN loss on one rank skips the step on every rank under ZeRO-2.


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_nonfinite_loss_on_one_rank_skips_step_under_zero2(tiny_assets, tmp_path, ranks):
    argv = tiny_config_args(
        tiny_assets, tmp_path / "run", "train.max_steps=6", *ds_args("zero2.json")
    )
    results = ranks(_nonfinite_rank, 2, argv, 3, False, timeout=240)
    for r in results:
        assert r["changed"] == [True, True, False, True, True, True]  # only step 3 skipped
        assert r["summary"]["skipped_steps"] == 1 and r["summary"]["steps"] == 6
        assert math.isfinite(r["summary"]["final_loss"])
    assert torch.equal(results[0]["weights"], results[1]["weights"])


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("stage_json", ["zero2.json", "zero3.json"])
def test_sigkill_and_auto_resume_under_zero(tiny_assets, tmp_path, stage_json):
    """Real torchrun, two SIGKILLs (inside accumulation; inside a save, shards written) and an
    automatic resume: per-step losses and final weights equal the uninterrupted run's."""
    from safetensors.torch import load_file

    from tests.test_checkpoint_resume import last_losses, torchrun_train

    overrides = ("train.max_steps=6", "checkpoint.every_steps=2", *ds_args(stage_json))
    straight = tmp_path / "straight"
    proc = torchrun_train(tiny_assets, straight, *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:]
    crashy = tmp_path / "crashy"
    for fault in ("micro_step:3:1", "after_engine_state:4:0"):
        proc = torchrun_train(tiny_assets, crashy, *overrides, fault=fault)
        assert proc.returncode != 0, f"{fault}: the injected kill did not happen"
    proc = torchrun_train(tiny_assets, crashy, *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "continuing from" in proc.stdout and "step_00000002" in proc.stdout
    assert last_losses(crashy) == last_losses(straight)
    a = load_file(crashy / "model" / "model.safetensors")
    b = load_file(straight / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
