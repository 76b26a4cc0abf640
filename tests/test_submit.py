"""launch.submit without a cluster: time formats, sweeps, validation before submitting, and
--dry-run printing the batch script while submitting nothing (an `sbatch` on PATH that records
any call). Jobs on a real cluster: tests/test_slurm_jobs.py."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from launch import submit

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "text, mins",
    [("90", 90), ("1:30", 2), ("02:00:00", 120), ("1-0", 1440), ("1-2:30", 1590), ("0:0:30", 1)],
)
def test_slurm_time_formats_in_minutes(text, mins):
    assert submit.minutes(text) == mins


def test_sweep_jobs_each_get_their_own_run_dir():
    jobs = submit.variants("runs/x", [("optim.lr", ["1e-3", "2e-3"]), ("seed", ["1", "2"])])
    assert len(jobs) == 4
    assert jobs[0] == ["optim.lr=1e-3", "seed=1", "run_dir=runs/x/optim.lr=1e-3,seed=1"]
    assert len({j[-1] for j in jobs}) == 4
    assert submit.variants("runs/x", []) == [[]]


@pytest.fixture
def no_sbatch(tmp_path, monkeypatch) -> Path:
    """An `sbatch` on PATH that records that it was called (it must not be)."""
    calls = tmp_path / "sbatch-calls"
    fake = tmp_path / "bin" / "sbatch"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {calls}\necho "Submitted batch job 1"\n')
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    return calls


def test_dry_run_prints_the_script_and_submits_nothing(tiny_assets, tmp_path, no_sbatch, capsys):
    from tests.conftest import tiny_config_args

    args = tiny_config_args(tiny_assets, tmp_path / "run")
    code = submit.main(
        [
            *args,
            "--nodes=2",
            "--gpus-per-node=4",
            "--partition=gpu",
            "--time=2:00:00",
            "--account=proj",
            "--qos=high",
            "--mem=200G",
            "--constraint=h100",
            "--dry-run",
            "--sweep",
            "optim.lr=1e-3,2e-3",
        ]  # fmt: skip
    )
    out = capsys.readouterr().out
    assert code == 0
    assert not no_sbatch.exists(), "sbatch was called by a dry run"
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=4",
        "#SBATCH --gpus-per-node=4",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=120",
        "#SBATCH --account=proj",
        "#SBATCH --qos=high",
        "#SBATCH --mem=200G",
        "#SBATCH --constraint=h100",
        "#SBATCH --requeue",
        "#SBATCH --signal=USR1@300",
        "#SBATCH --array=0-1%2",
    ):
        assert line in out, (line, out)
    assert "srun" in out and "submitit.core._submit" in out
    assert out.count("# task: python -m launch.train") == 2
    assert f"run_dir={tmp_path / 'run'}/optim.lr=2e-3" in out
    assert "nothing submitted (2 job(s), 8 ranks each)" in out


@pytest.mark.parametrize(
    "extra, message",
    [
        (["optim.lrr=1"], "optim.lrr: unknown key"),
        (["--time=3"], "slurm.signal_delay_s: 300 s leaves less than 120 s of --time 3"),
        (["--time=6"], "slurm.signal_delay_s: 300 s leaves less than 120 s of --time 6"),
        (["--time=soon"], "--time 'soon': not a Slurm time"),
        (["--sweep", "optim.lr"], "--sweep 'optim.lr': expected section.key=value1,value2"),
        (["--sweep", "train.micro_batch_size=4,0"], "train.micro_batch_size"),
    ],
    ids=[
        "bad-key",
        "delay-vs-time",
        "delay-vs-short-time",
        "bad-time",
        "bad-sweep",
        "bad-sweep-value",
    ],
)
def test_bad_submissions_are_one_line_errors_before_sbatch(
    tiny_assets, tmp_path, no_sbatch, capsys, extra, message
):
    from tests.conftest import tiny_config_args

    code = submit.main([*tiny_config_args(tiny_assets, tmp_path / "run"), *extra])
    err = capsys.readouterr().err
    assert code == submit.EXIT_USER_ERROR
    assert err.startswith("error: ") and message in err, err
    assert "Traceback" not in err
    assert not no_sbatch.exists()
