"""Paths: output directories that cannot be used are config errors naming the key; local model
paths are stored absolute, so a checkpoint exports from any working directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

from tests.conftest import tiny_config_args
from trainer.config import ConfigError, load_config


def problems_of(args: list[str]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(args[0], args[1:])
    return info.value.problems


def test_run_dir_that_is_a_file(tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.write_text("")
    problems = problems_of(tiny_config_args(tiny_assets, run_dir))
    assert problems == [f"run_dir: {run_dir} is a file, not a directory"]


def test_run_dir_under_a_file(tiny_assets, tmp_path):
    (tmp_path / "runs").write_text("")
    run_dir = tmp_path / "runs" / "a"
    problems = problems_of(tiny_config_args(tiny_assets, run_dir))
    assert problems == [
        f"run_dir: {run_dir}: its parent {tmp_path / 'runs'} is a file, not a directory"
    ]


def test_checkpoint_dir_that_is_a_file(tiny_assets, tmp_path):
    ckpts = tmp_path / "ckpts"
    ckpts.write_text("")
    problems = problems_of(
        tiny_config_args(tiny_assets, tmp_path / "run", f"checkpoint.dir={ckpts}")
    )
    assert problems == [f"checkpoint.dir: {ckpts} is a file, not a directory"]


def test_default_checkpoint_dir_that_is_a_file(tiny_assets, tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("")
    problems = problems_of(tiny_config_args(tiny_assets, run_dir))
    assert problems == [f"checkpoint.dir: {run_dir / 'checkpoints'} is a file, not a directory"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root may write anywhere")
def test_run_dir_that_cannot_be_created(tiny_assets, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    problems = problems_of(tiny_config_args(tiny_assets, locked / "run"))
    assert problems == [f"run_dir: {locked / 'run'} cannot be created: {locked} is not writable"]


def test_local_model_paths_are_stored_absolute(tiny_assets, tmp_path, monkeypatch):
    monkeypatch.chdir(tiny_assets)
    args = tiny_config_args(tiny_assets, tmp_path / "run", "model.name_or_path=model")
    cfg = load_config(args[0], [*args[1:], "model.tokenizer=./model"])
    assert cfg.model.name_or_path == str(tiny_assets / "model")
    assert cfg.model.tokenizer == str(tiny_assets / "model")
    hub = load_config(args[0], [*args[1:], "model.name_or_path=org/name"])
    assert hub.model.name_or_path == "org/name"  # a Hub id (nothing here by that name)


def _train_in(workdir: Path, args: list[str]) -> dict:
    """Runs in a spawned rank: train from `workdir`, where the model path is relative."""
    from launch.train import run

    os.chdir(workdir)
    return run(args)


def _export(capsys, checkpoint: Path, output: Path) -> tuple[int, str]:
    from launch.export import main

    capsys.readouterr()
    code = main([str(checkpoint), "--output", str(output)])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return code, err


def test_export_from_another_directory_after_training_on_a_relative_path(
    tiny_assets, tmp_path, monkeypatch, capsys
):
    from transformers import AutoModelForCausalLM

    from tests.launcher import run_ranks

    work = tmp_path / "work"
    shutil.copytree(tiny_assets / "model", work / "assets" / "model")
    run_dir = tmp_path / "run"
    args = tiny_config_args(
        tiny_assets,
        run_dir,
        "model.name_or_path=assets/model",
        "train.max_steps=1",
        "schedule.warmup_steps=0",
        "output.save_hf_model=false",
        "eval.max_batches=1",
    )
    run_ranks(_train_in, 1, work, args, timeout=150)
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["model"]["name_or_path"] == str(work / "assets" / "model")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    code, err = _export(capsys, run_dir / "checkpoints", Path("out"))
    assert code == 0, err[-3000:]
    assert AutoModelForCausalLM.from_pretrained(elsewhere / "out").config.hidden_size == 32

    # The model the checkpoint was trained from is gone: one line naming the checkpoint's
    # config and the path it holds.
    (work / "assets" / "model").rename(work / "assets" / "moved")
    code, err = _export(capsys, run_dir / "checkpoints", Path("out2"))
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert code == 2 and len(lines) == 1, err[-3000:]
    ckpt_config = next((run_dir / "checkpoints").glob("step_*")) / "config.yaml"
    model = work / "assets" / "model"
    assert lines[0] == (
        f"error: {ckpt_config}: model.name_or_path='{model}': no such directory ({model})"
    )


def test_export_to_a_file_is_refused(tmp_path, capsys):
    out = tmp_path / "out"
    out.write_text("")
    code, err = _export(capsys, tmp_path / "no-checkpoints", out)
    assert code == 2
    assert err.strip() == f"error: --output: {out} is a file, not a directory"
