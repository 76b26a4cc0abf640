"""The real CLI under real torchrun, end to end, on a tiny model."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.conftest import tiny_config_args
from tests.launcher import run_torchrun


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_torchrun_two_ranks_writes_everything(tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    argv = [
        "-m",
        "launch.train",
        *tiny_config_args(
            tiny_assets, run_dir, "eval.num_generate=8", "eval.at_start=true", "eval.every_steps=3"
        ),
    ]
    proc = run_torchrun(argv, nproc=2, timeout=240)
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert "[rank1]" not in proc.stdout  # other ranks stay quiet
    assert "exact-match accuracy" in proc.stdout

    resolved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert resolved["derived"]["world_size"] == 2
    assert resolved["derived"]["global_batch_size"] == 16

    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    for key in (
        "train/lr",
        "train/grad_norm",
        "train/tokens_per_s",
        "train/tokens_seen",
        "train/step_time_s",
        "train/memory_mb",
    ):
        assert all(key in r for r in train_rows), key
    eval_rows = [r for r in rows if "eval/loss" in r]
    assert [r["step"] for r in eval_rows] == [0, 3, 6]
    assert all({"eval/perplexity", "eval/accuracy"} <= r.keys() for r in eval_rows)

    events = list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["skipped_steps"] == 0

    # The HF export loads through from_pretrained and holds the trained, not the initial, weights.
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    ids = torch.tensor([tok("12+34=").input_ids])
    initial = AutoModelForCausalLM.from_pretrained(tiny_assets / "model")
    with torch.no_grad():
        assert not torch.allclose(model(ids).logits, initial(ids).logits)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_torchrun_bad_config_fails_fast_with_one_message(tiny_assets, tmp_path):
    """Under stock torchrun the message comes once and first; no worker traceback (torchrun's
    own failure summary follows, with our line as its root cause)."""
    argv = [
        "-m",
        "launch.train",
        *tiny_config_args(tiny_assets, tmp_path / "run", "train.global_batch_size=12"),
    ]
    proc = run_torchrun(argv, nproc=2, timeout=100)
    assert proc.returncode != 0
    msg = (
        "train.global_batch_size=12 is not divisible by train.micro_batch_size=4 x world size 2 = 8"
    )
    lines = [x for x in proc.stdout.splitlines() if "accelerator" not in x and x.strip()]
    want = f"error: invalid configuration: {msg}; pick a global batch that is a multiple of 8"
    assert lines[0] == want, lines[:3]
    assert sum(x.startswith("error:") for x in lines) == 1, proc.stdout[-3000:]  # not per rank
    for frame in ("launch/train.py", "trainer/", "pydantic"):
        assert frame not in proc.stdout
    assert "Root Cause" in proc.stdout and "traceback : error: invalid configuration" in (
        proc.stdout
    )


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_launch_run_bad_config_has_no_traceback_at_all(tiny_assets, tmp_path):
    argv = tiny_config_args(tiny_assets, tmp_path / "run", "train.global_batch_size=12")
    proc = run_torchrun(argv, nproc=2, timeout=100, launcher="launch.run")
    assert proc.returncode == 2, proc.stdout[-3000:]
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    errors = [x for x in proc.stdout.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: invalid configuration"), errors
    assert proc.stdout.rstrip().splitlines()[-1].startswith("launch.run: training failed")
