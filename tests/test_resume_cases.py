"""Resume edge cases say what they do: a finished run, a run past its new end, changed optimizer
settings, data counters, checkpoints of another line of training, and runs that would train on
nothing. The CLI runs in this process (world size 1, no process group): seconds per run."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config_args


@pytest.fixture(autouse=True)
def _keep_signal_handlers():
    """The in-process CLI installs its stop-signal handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def cli(assets: Path, run_dir: Path, *extra: str) -> int:
    from launch.train import main

    return main(tiny_config_args(assets, run_dir, "logging.tensorboard=false", *extra))


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    return lines[0]


def test_rerunning_a_finished_run_keeps_its_summary(tiny_assets, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli(tiny_assets, run_dir) == 0
    before = (run_dir / "summary.json").read_text()
    assert json.loads(before)["final_loss"] is not None
    capsys.readouterr()
    assert cli(tiny_assets, run_dir) == 0
    assert (run_dir / "summary.json").read_text() == before
    assert "already complete at step 6" in capsys.readouterr().err

    # Killed after the final checkpoint but before the summary: the rerun writes it from the
    # run's own metrics, not with a null loss.
    (run_dir / "summary.json").unlink()
    assert cli(tiny_assets, run_dir) == 0
    after = json.loads((run_dir / "summary.json").read_text())
    assert after["final_loss"] == json.loads(before)["final_loss"]
    assert after["eval"] == json.loads(before)["eval"]


def test_checkpoint_past_the_new_end_is_refused_naming_the_key(tiny_assets, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert cli(tiny_assets, run_dir) == 0
    capsys.readouterr()
    assert cli(tiny_assets, run_dir, "train.max_steps=4") == 2
    line = error_line(capsys)
    assert "step 6" in line and "train.max_steps" in line and "step_00000006" in line


def test_changed_optimizer_settings_apply_on_resume_and_are_logged(tiny_assets, tmp_path, capsys):
    """Resume with another peak lr, weight decay and betas: the restored optimizer takes the
    new values (its moments are kept), the lr follows this run's schedule, the change is logged."""
    from trainer.config import load_config
    from trainer.optim import lr_multiplier

    run_dir = tmp_path / "run"
    assert cli(tiny_assets, run_dir, "checkpoint.every_steps=3") == 0
    capsys.readouterr()
    changed = ("train.max_steps=10", "optim.lr=3.0e-3", "optim.betas=[0.8,0.9]")
    (run_dir / "checkpoints" / "step_00000006").rename(run_dir / "unused")  # resume at 3
    seen: dict = {}

    import trainer.loop as loop

    original = loop.train_step

    def spy(engine, *args, **kwargs):
        if "groups" not in seen:  # the optimizer as restored, before the first new step
            seen["groups"] = [
                {k: g[k] for k in ("lr", "betas", "weight_decay")}
                for g in engine.optimizer.param_groups
            ]
            state = engine.optimizer.state
            seen["moments"] = sum(float(s["exp_avg_sq"].sum()) for s in state.values())
        return original(engine, *args, **kwargs)

    loop.train_step = spy
    try:
        assert cli(tiny_assets, run_dir, *changed) == 0
    finally:
        loop.train_step = original
    cfg = load_config(tiny_config_args(tiny_assets, run_dir)[0], changed)
    mult = lr_multiplier(cfg.schedule, 10, 2)
    assert [g["lr"] for g in seen["groups"]] == [3.0e-3 * mult(3)] * 2
    assert all(tuple(g["betas"]) == (0.8, 0.9) for g in seen["groups"])
    assert [g["weight_decay"] for g in seen["groups"]] == [0.1, 0.0]
    assert seen["moments"] > 0  # Adam's moments came back from the checkpoint
    err = capsys.readouterr().err
    assert "resume: optim.lr: 0.001 -> 0.003" in err
    assert "resume: optim.betas: [0.9, 0.95] -> [0.8, 0.9]" in err
    assert "resume: train.max_steps: 6 -> 10" in err
    rows = (run_dir / "metrics.jsonl").read_text().splitlines()
    lrs = {r["step"]: r["train/lr"] for r in map(json.loads, rows) if "train/lr" in r}
    assert lrs[4] == 3.0e-3 * mult(3)  # the first step after the resume, with its lr


def test_data_counters_carry_over_a_resume(tiny_assets, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert cli(tiny_assets, straight) == 0
    assert cli(tiny_assets, resumed, "checkpoint.every_steps=3") == 0
    # Go back to step 3 and redo the rest: the counters must not restart at 0.
    (resumed / "checkpoints" / "step_00000006").rename(resumed / "unused")
    (resumed / "summary.json").unlink()
    assert cli(tiny_assets, resumed) == 0
    want = json.loads((straight / "summary.json").read_text())["data"]
    got = json.loads((resumed / "summary.json").read_text())["data"]
    assert want and got == want


def test_starting_over_moves_the_other_runs_checkpoints_aside(tiny_assets, tmp_path, capsys):
    run_dir = tmp_path / "run"
    ckpts = run_dir / "checkpoints"
    assert cli(tiny_assets, run_dir, "checkpoint.every_steps=2") == 0  # steps 2, 4, 6
    capsys.readouterr()

    # From an older checkpoint of this directory: the newer ones are set aside, not replaced.
    older = ckpts / "step_00000002"
    assert cli(tiny_assets, run_dir, f"checkpoint.resume={older}", "train.max_steps=5") == 0
    aside = sorted(p.name for p in ckpts.glob("superseded-*/step_*"))
    assert aside == ["step_00000004", "step_00000006"]
    assert "moved 2 checkpoint(s)" in capsys.readouterr().err
    capsys.readouterr()
    assert (ckpts / "latest").read_text() == "step_00000005"

    # Starting over: every checkpoint of the earlier run is set aside; nothing is deleted.
    assert cli(tiny_assets, run_dir, "checkpoint.resume=never", "train.max_steps=2") == 0
    assert sorted(p.name for p in ckpts.glob("step_*")) == ["step_00000002"]
    assert len(list(ckpts.glob("superseded-*/step_*"))) == 4
    assert "checkpoint.resume=never: moved 2 checkpoint(s)" in capsys.readouterr().err
    assert list(run_dir.glob("metrics-superseded-*.jsonl"))  # old metrics kept too


def test_seq_len_that_cuts_every_response_stops_naming_it(tiny_assets, tmp_path, capsys):
    assert cli(tiny_assets, tmp_path / "run", "data.seq_len=8", "data.eval_path=null") == 2
    line = error_line(capsys)
    assert "no target token" in line and "data.seq_len=8" in line


def test_closing_line_with_one_eval_does_not_compare_it_to_itself():
    from launch.train import describe_eval_change

    one = [{"step": 6, "eval/loss": 3.958}]
    assert describe_eval_change(one) == "eval loss 3.958 (step 6)"
    two = [{"step": 0, "eval/loss": 4.0}, {"step": 6, "eval/loss": 3.5}]
    assert describe_eval_change(two) == "eval loss 4.000 -> 3.500"


def test_empty_steps_are_skipped_and_counted(tiny_assets):
    """A step whose global batch has no target token applies no update (AdamW would still move
    the weights through momentum and weight decay)."""
    from tests.tiny_models import CPU1, tiny_llama
    from trainer.config import OptimConfig, ScheduleConfig
    from trainer.engine.ddp import DDPEngine
    from trainer.loop import train_step
    from trainer.optim import build_optimizer, build_scheduler

    model = tiny_llama()
    opt = build_optimizer(model, OptimConfig(lr=1e-2, weight_decay=0.5))
    engine = DDPEngine(model, opt, build_scheduler(opt, ScheduleConfig(), 4, 0), CPU1)
    ids = torch.randint(0, 60, (2, 10))
    batch = {"input_ids": ids, "targets": ids.clone(), "attention_mask": torch.ones_like(ids)}
    train_step(engine, [batch], 1.0)  # a real step: moments now non-zero
    before = [p.detach().clone() for p in model.parameters()]
    empty = dict(batch, targets=torch.full_like(ids, -100))
    res = train_step(engine, [empty], 1.0)
    assert res.empty and res.num_target_tokens == 0 and not res.skipped
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_logged_lr_is_the_lr_the_step_used(tiny_assets, tmp_path):
    """Step k's update uses the schedule's multiplier for update k-1 (0-based); the logged lr
    is that one, not the next step's (step 1 of a 2-step warmup logs half the peak)."""
    from trainer.config import load_config
    from trainer.optim import lr_multiplier

    run_dir = tmp_path / "run"
    assert cli(tiny_assets, run_dir) == 0
    cfg = load_config(tiny_config_args(tiny_assets, run_dir)[0])
    mult = lr_multiplier(cfg.schedule, 6, 2)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}
    assert logged == {k: cfg.optim.lr * mult(k - 1) for k in range(1, 7)}
    assert logged[1] == cfg.optim.lr / 2
