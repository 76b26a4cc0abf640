"""Config: every problem reported at once, each naming its key; nothing starts before it is valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from trainer.config import ConfigError, load_config, resolve_batch, with_total_steps

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, tree: dict) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(tree))
    return path


def base_tree() -> dict:
    return {
        "model": {"name_or_path": "some/model"},
        "data": {"train_path": "train.jsonl"},
        "train": {"micro_batch_size": 4, "grad_accum_steps": 2, "max_steps": 10},
    }


def problems_of(tmp_path: Path, tree: dict, overrides: list[str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, tree), overrides)
    return info.value.problems


def test_valid_config_and_overrides(tmp_path):
    cfg = load_config(write(tmp_path, base_tree()), ["optim.lr=1e-4", "train.max_grad_norm=null"])
    assert cfg.optim.lr == 1e-4
    assert cfg.train.max_grad_norm is None
    assert cfg.model.attn_implementation == "auto"
    assert cfg.model.trust_remote_code is False


def test_unknown_key_names_it_and_suggests(tmp_path):
    tree = base_tree()
    tree["optim"] = {"learning_rate": 1e-4}
    tree["trian"] = {}
    problems = problems_of(tmp_path, tree)
    joined = "\n".join(problems)
    assert "optim.learning_rate: unknown key" in joined
    assert "trian: unknown key (did you mean 'train'?)" in joined


def test_unknown_key_from_override_suggests_nearest(tmp_path):
    problems = problems_of(tmp_path, base_tree(), ["train.micro_batchsize=3"])
    assert problems == [
        "train.micro_batchsize: unknown key (did you mean 'train.micro_batch_size'?)"
    ]


def test_wrong_type_and_out_of_range_reported_together(tmp_path):
    tree = base_tree()
    tree["train"]["micro_batch_size"] = "eight"
    tree["optim"] = {"lr": -1}
    problems = problems_of(tmp_path, tree)
    assert len(problems) == 2
    assert any(p.startswith("train.micro_batch_size:") and "'eight'" in p for p in problems)
    assert any(p.startswith("optim.lr:") and "greater than 0" in p for p in problems)


def test_mutually_exclusive_options(tmp_path):
    tree = base_tree()
    tree["train"]["num_epochs"] = 2
    tree["schedule"] = {"warmup_steps": 5, "warmup_ratio": 0.1}
    problems = problems_of(tmp_path, tree)
    assert any("train.max_steps / train.num_epochs" in p for p in problems)
    assert any("schedule.warmup_steps / schedule.warmup_ratio" in p for p in problems)


def test_missing_required_key(tmp_path):
    tree = base_tree()
    del tree["model"]
    assert problems_of(tmp_path, tree) == ["model: required but not set"]


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  name_or_path: x\ntrain: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert f"{path}:line" in str(info.value)


def test_global_batch_must_divide(tmp_path):
    tree = base_tree()
    tree["train"] = {"micro_batch_size": 4, "global_batch_size": 20, "max_steps": 5}
    cfg = load_config(write(tmp_path, tree))
    assert resolve_batch(cfg, 1).grad_accum_steps == 5
    with pytest.raises(ConfigError) as info:
        resolve_batch(cfg, 2)
    msg = str(info.value)
    assert "train.global_batch_size=20" in msg and "train.micro_batch_size=4" in msg
    assert "world size 2" in msg


def test_derived_numbers(tmp_path):
    tree = base_tree()
    tree["train"] = {"micro_batch_size": 2, "global_batch_size": 16, "num_epochs": 2}
    tree["schedule"] = {"warmup_ratio": 0.25}
    cfg = load_config(write(tmp_path, tree))
    derived = with_total_steps(cfg, resolve_batch(cfg, 4), steps_per_epoch=6)
    assert (derived.grad_accum_steps, derived.global_batch_size) == (2, 16)
    assert (derived.steps_per_epoch, derived.total_steps, derived.warmup_steps) == (6, 12, 3)


def test_every_shipped_config_validates():
    for path in sorted((REPO / "configs").glob("*.yaml")):
        cfg = load_config(path)
        resolve_batch(cfg, 1)


def _bad_config_rank(config_path: str) -> tuple[int, bool]:
    """Runs in a spawned rank: the CLI must refuse before any process group starts."""
    import torch.distributed as dist

    import launch.train as lt

    started = []
    dist.init_process_group = lambda *a, **k: started.append(True)  # record, don't start
    code = lt.main([config_path])
    return code, bool(started)


def test_cli_rejects_bad_config_before_process_group(tmp_path, ranks):
    tree = base_tree()
    tree["train"]["micro_batchsize"] = 3
    path = write(tmp_path, tree)
    for code, started in ranks(_bad_config_rank, 2, str(path), timeout=120):
        assert code == 2
        assert not started


def test_progress_bar_on_off_unquoted(tmp_path):
    """YAML 1.1 reads an unquoted on/off as a boolean, in the file and on the command line."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(base_tree()) + "logging:\n  progress_bar: off\n")
    assert load_config(path).logging.progress_bar == "off"
    assert load_config(path, ["logging.progress_bar=on"]).logging.progress_bar == "on"
    assert load_config(path, ["logging.progress_bar=off"]).logging.progress_bar == "off"
    assert load_config(path, ["logging.progress_bar=auto"]).logging.progress_bar == "auto"
    problems = problems_of(tmp_path, base_tree(), ["logging.progress_bar=sometimes"])
    assert len(problems) == 1 and problems[0].startswith("logging.progress_bar:")


@pytest.mark.parametrize(
    ("theirs", "ours"),
    [
        ("learning_rate", "optim.lr"),
        ("save_total_limit", "checkpoint.keep_last"),
        ("max_seq_length", "data.seq_len"),
        ("per_device_train_batch_size", "train.micro_batch_size"),
        ("gradient_accumulation_steps", "train.grad_accum_steps"),
        ("num_train_epochs", "train.num_epochs"),
        ("warmup_ratio", "schedule.warmup_ratio"),
        ("lr_scheduler_type", "schedule.decay"),
    ],
)
def test_hf_trainer_and_axolotl_names_are_answered_with_ours(tmp_path, theirs, ours):
    """Wherever the familiar name is put (top level, or the section a user guesses), the
    error names our key."""
    top = problems_of(tmp_path, {**base_tree(), theirs: 1})
    assert top == [f"{theirs}: unknown key (did you mean '{ours}'?)"]
    nested = problems_of(tmp_path, base_tree(), [f"train.{theirs}=1"])
    assert nested == [f"train.{theirs}: unknown key (did you mean '{ours}'?)"]


def test_data_workers_default_to_two_on_a_gpu_and_none_on_cpu(monkeypatch):
    from data.config import DataConfig

    cfg = DataConfig(train_path="x.jsonl")
    assert cfg.num_workers == "auto"
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert cfg.workers() == 0  # on CPU the ranks' compute needs the cores
    monkeypatch.setattr("torch.cuda.is_available", lambda: True)
    assert cfg.workers() == 2
    assert DataConfig(train_path="x.jsonl", num_workers=3).workers() == 3
    with pytest.raises(ValueError, match="num_workers"):
        DataConfig(train_path="x.jsonl", num_workers=-1)
