"""Damaged or half-written checkpoints never win: the previous one stays usable and resume picks
the newest valid checkpoint, saying why it passed over a newer one.

Checkpoints here come from the real CLI (`launch.train.run`) on spawned gloo ranks. Trainer
modules are imported inside the rank functions and tests, never at module level: a spawned rank
imports this module first, and `trainer.faults` reads `FTTRAIN_FAULT` when it is imported.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import tiny_config_args

SHARD = "engine/__0_0.distcp"  # rank 0's DCP shard: the largest file of a checkpoint


# ---------------------------------------------------------------------------------------------
# Rank functions (module level: spawned ranks unpickle them by name).


def _train(assets: Path, run_dir: Path, *extra: str) -> dict:
    from launch.train import run

    return run(tiny_config_args(assets, run_dir, "output.save_hf_model=false", *extra))


def _train_recording_resume(assets: Path, run_dir: Path, *extra: str) -> dict:
    """Train, and report which checkpoint the run resumed from and at what step."""
    from trainer.checkpoint.checkpointing import Checkpointing

    seen: list = []
    original = Checkpointing.restore

    def restore(self, state):
        path = original(self, state)
        seen.append((None if path is None else path.name, state.step))
        return path

    Checkpointing.restore = restore
    try:
        summary = _train(assets, run_dir, *extra)
    finally:
        Checkpointing.restore = original
    return {"summary": summary, "resumed": seen[0]}


def _train_with_injected_fault(assets: Path, run_dir: Path, fault: str, *extra: str) -> tuple:
    # Must precede every trainer import in this process: faults reads the env at import time.
    assert "trainer.faults" not in __import__("sys").modules
    os.environ["FTTRAIN_FAULT"] = fault
    from trainer.checkpoint.files import CheckpointSaveError

    try:
        return ("finished", _train(assets, run_dir, *extra))
    except CheckpointSaveError as e:
        return ("CheckpointSaveError", str(e))


def _train_then_fill_disk(assets: Path, run_dir: Path) -> dict:
    """Publish step 2, then cap the file size below the engine shard and resume towards step 4."""
    import resource
    import signal

    from trainer.checkpoint.files import CheckpointSaveError

    _train(assets, run_dir, "checkpoint.every_steps=2", "train.max_steps=2")
    ckpt = run_dir / "checkpoints" / "step_00000002"
    sizes = {str(p.relative_to(ckpt)): p.stat().st_size for p in ckpt.rglob("*") if p.is_file()}
    shard = sizes.pop(SHARD)
    limit = (shard + max(sizes.values())) // 2
    assert max(sizes.values()) < limit < shard, sizes

    # Past the limit a write fails with EFBIG instead of the process dying of SIGXFSZ.
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        _train(assets, run_dir, "checkpoint.every_steps=2", "train.max_steps=4")
    except CheckpointSaveError as e:
        return {"error": str(e), "limit": limit, "shard": shard}
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, old_handler)
    return {"error": None}


# ---------------------------------------------------------------------------------------------
# Corruptions of the newest checkpoint (step 4) and what resume must say about them.


def _truncate_shard(root: Path) -> None:
    shard = root / "step_00000004" / SHARD
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)


def _flip_byte_in_shard(root: Path) -> None:
    shard = root / "step_00000004" / SHARD
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))


def _empty_latest(root: Path) -> None:
    (root / "latest").write_text("")


def _dangling_latest(root: Path) -> None:
    (root / "latest").write_text("step_00000006")


def _unfinished_tmp_and_unmarked_dir(root: Path) -> None:
    # A save that died before publishing (temp name), and one that has its final name but no
    # marker (e.g. copied by hand, or a filesystem that lost the marker).
    shutil.copytree(root / "step_00000004", root / ".tmp-step_00000008")
    (root / ".tmp-step_00000008" / "COMPLETE").unlink()
    shutil.copytree(root / "step_00000004", root / "step_00000006")
    (root / "step_00000006" / "COMPLETE").unlink()


CASES: dict[str, tuple[Callable[[Path], None], str, list[str]]] = {
    # name: (corrupt, checkpoint resume must pick, note fragments naming why)
    "truncated_shard": (
        _truncate_shard,
        "step_00000002",
        ["step_00000004", SHARD, "truncated"],
    ),
    "flipped_byte": (
        _flip_byte_in_shard,
        "step_00000002",
        ["step_00000004", f"{SHARD} fails its xxh3_128 checksum"],
    ),
    "empty_latest": (_empty_latest, "step_00000004", ["latest is empty"]),
    "dangling_latest": (
        _dangling_latest,
        "step_00000004",
        ["names step_00000006, which does not exist"],
    ),
    "unfinished_save": (
        _unfinished_tmp_and_unmarked_dir,
        "step_00000004",
        ["step_00000006", "no COMPLETE marker"],
    ),
}


@pytest.fixture(scope="module")
def trained_run(tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real run with checkpoints at steps 2 and 4 (never modified: tests work on copies)."""
    from tests.launcher import run_ranks

    run_dir = tmp_path_factory.mktemp("integrity") / "run"
    run_ranks(
        _train,
        1,
        tiny_assets,
        run_dir,
        "checkpoint.every_steps=2",
        "train.max_steps=4",
        timeout=150,
    )
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text() == "step_00000004"
    return run_dir


def _copy_run(trained_run: Path, tmp_path: Path) -> Path:
    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    return run_dir


def _manager(root: Path):
    import torch

    from trainer.checkpoint.manager import CheckpointManager
    from trainer.dist import DistContext

    return CheckpointManager(root, DistContext(0, 0, 1, torch.device("cpu"), None))


@pytest.mark.parametrize("case", list(CASES))
def test_damaged_newest_checkpoint_is_passed_over_with_a_note(case, trained_run, tmp_path, caplog):
    from trainer.checkpoint.files import find_latest_valid, validate

    corrupt, expected, note_parts = CASES[case]
    root = _copy_run(trained_run, tmp_path) / "checkpoints"
    corrupt(root)

    # The previous checkpoint is untouched and valid.
    assert validate(root / "step_00000002") is None

    path, notes = find_latest_valid(root)
    assert path == root / expected
    joined = "\n".join(notes)
    for part in note_parts:
        assert part in joined, (part, notes)

    # The manager's resume makes the same choice and logs the same notes.
    with caplog.at_level(logging.WARNING, logger="fttrain"):
        chosen = _manager(root).resolve_resume("auto")
    assert chosen == root / expected
    for part in note_parts:
        assert part in caplog.text, (part, caplog.text)


def test_unfinished_temp_dir_is_never_chosen_and_is_cleaned_up(trained_run, tmp_path, caplog):
    from trainer.checkpoint.files import find_latest_valid

    root = _copy_run(trained_run, tmp_path) / "checkpoints"
    shutil.copytree(root / "step_00000004", root / ".tmp-step_00000006")  # even a full copy
    path, notes = find_latest_valid(root)
    assert path == root / "step_00000004" and notes == []

    with caplog.at_level(logging.WARNING, logger="fttrain"):
        manager = _manager(root)
    assert not (root / ".tmp-step_00000006").exists()
    assert "removing unfinished checkpoint" in caplog.text
    assert manager.resolve_resume("auto") == root / "step_00000004"


def test_explicit_resume_of_a_corrupted_checkpoint_is_refused(trained_run, tmp_path):
    from trainer.checkpoint.files import CheckpointError

    root = _copy_run(trained_run, tmp_path) / "checkpoints"
    _flip_byte_in_shard(root)
    with pytest.raises(CheckpointError, match="fails its xxh3_128 checksum") as e:
        _manager(root).resolve_resume(str(root / "step_00000004"))
    assert str(root / "step_00000004") in str(e.value)


@pytest.mark.timeout(200)
def test_rerun_after_corruption_resumes_from_previous_and_republishes(
    trained_run, tiny_assets, tmp_path, ranks
):
    from trainer.checkpoint.files import find_latest_valid, validate

    run_dir = _copy_run(trained_run, tmp_path)
    root = run_dir / "checkpoints"
    _flip_byte_in_shard(root)
    [out] = ranks(
        _train_recording_resume,
        1,
        tiny_assets,
        run_dir,
        "checkpoint.every_steps=2",
        "train.max_steps=4",
        timeout=150,
    )
    assert out["resumed"] == ("step_00000002", 2)
    assert out["summary"]["steps"] == 4
    # The corrupted step 4 was replaced by a fresh, valid one.
    assert validate(root / "step_00000004") is None
    assert find_latest_valid(root) == (root / "step_00000004", [])
    assert (root / "latest").read_text() == "step_00000004"


@pytest.mark.timeout(300)
def test_exception_after_one_ranks_shard_keeps_previous_checkpoint(tiny_assets, tmp_path, ranks):
    from trainer.checkpoint.files import find_latest_valid, validate

    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    extra = ("checkpoint.every_steps=2", "train.max_steps=6")
    results = ranks(
        _train_with_injected_fault,
        2,
        tiny_assets,
        run_dir,
        "after_engine_state:4:1:raise",
        *extra,
        timeout=150,
    )
    for rank, (outcome, message) in enumerate(results):
        assert outcome == "CheckpointSaveError", (rank, message)
        assert "checkpoint save at step 4" in message
        assert "the previous checkpoint is intact" in message
        assert "rank 1: InjectedFault: injected fault at after_engine_state" in message
    # Rank 1's shard reached the temp dir, but nothing was published.
    assert not (root / "step_00000004").exists()
    assert validate(root / "step_00000002") is None
    assert (root / "latest").read_text() == "step_00000002"
    assert find_latest_valid(root) == (root / "step_00000002", [])

    # Without the fault, the same command resumes from step 2 and finishes.
    results = ranks(_train_recording_resume, 2, tiny_assets, run_dir, *extra, timeout=150)
    for out in results:
        assert out["resumed"] == ("step_00000002", 2)
        assert out["summary"]["steps"] == 6
    assert (root / "latest").read_text() == "step_00000006"
    assert not list(root.glob(".tmp-*"))
    for step in (2, 4, 6):
        assert validate(root / f"step_{step:08d}") is None
    trainer_json = json.loads((root / "step_00000006" / "trainer.json").read_text())
    assert trainer_json["world_size"] == 2 and trainer_json["step"] == 6


@pytest.mark.timeout(200)
def test_full_disk_during_save_raises_and_keeps_previous_checkpoint(tiny_assets, tmp_path, ranks):
    from trainer.checkpoint.files import find_latest_valid, validate

    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    [out] = ranks(_train_then_fill_disk, 1, tiny_assets, run_dir, timeout=150)
    message = out["error"]
    assert message is not None, "the save past the file-size limit did not fail"
    assert "checkpoint save at step 4" in message
    assert "the previous checkpoint is intact" in message
    assert "File too large" in message, message
    assert not (root / "step_00000004").exists()
    assert validate(root / "step_00000002") is None
    assert (root / "latest").read_text() == "step_00000002"
    assert find_latest_valid(root) == (root / "step_00000002", [])


def test_async_save_holds_the_state_at_save_time(tmp_path):
    """Training continues while an async save is written: the checkpoint must hold the values
    from when `save` returned, not the ones the optimizer writes meanwhile."""
    import torch

    from trainer.checkpoint.files import validate
    from trainer.checkpoint.manager import CheckpointManager
    from trainer.dist import DistContext
    from trainer.engine.ddp import DDPEngine

    def make():
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8))
        opt = torch.optim.AdamW(model.parameters(), lr=0.1)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        return model, opt, sched

    def step(model, opt, sched):
        model(torch.randn(4, 64)).square().sum().backward()
        opt.step()
        sched.step()
        opt.zero_grad()

    ctx = DistContext(0, 0, 1, torch.device("cpu"), None)
    model, opt, sched = make()
    step(model, opt, sched)
    engine = DDPEngine(model, opt, sched, ctx, "fp32")
    manager = CheckpointManager(tmp_path / "ckpts", ctx, async_save=True)
    manager.save(1, engine, {"data": {}, "rng": {}}, {"train_state": {}}, "x: 1\n")
    saved = {k: v.clone() for k, v in model.state_dict().items()}
    saved_moment = opt.state[model[0].weight]["exp_avg"].clone()
    for _ in range(3):  # training goes on while the write is in flight
        step(model, opt, sched)
    assert not torch.equal(model[0].weight, saved["0.weight"])
    manager.wait()
    path = tmp_path / "ckpts" / "step_00000001"
    assert validate(path) is None and manager.last_saved_step == 1

    model2, opt2, sched2 = make()
    step(model2, opt2, sched2)
    step(model2, opt2, sched2)  # different values, same structure
    engine2 = DDPEngine(model2, opt2, sched2, ctx, "fp32")
    engine2.load_state(path / "engine")
    for k, v in model2.state_dict().items():
        assert torch.equal(v, saved[k]), k
    assert torch.equal(opt2.state[model2[0].weight]["exp_avg"], saved_moment)
    assert sched2.last_epoch == 1


def _train_counting_publishes(assets: Path, run_dir: Path, *extra: str) -> list[int]:
    from trainer.checkpoint.manager import CheckpointManager

    published: list[int] = []
    original = CheckpointManager._publish

    def publish(self):
        published.append(self.pending.step)
        return original(self)

    CheckpointManager._publish = publish
    try:
        _train(assets, run_dir, *extra)
    finally:
        CheckpointManager._publish = original
    return published


@pytest.mark.timeout(200)
def test_async_run_publishes_each_step_once(tiny_assets, tmp_path, ranks):
    """The save at the last step is still in flight when the run finishes: `finish` must wait
    for it rather than save (and replace) the same step again."""
    from trainer.checkpoint.files import validate

    run_dir = tmp_path / "run"
    [published] = ranks(
        _train_counting_publishes,
        1,
        tiny_assets,
        run_dir,
        "checkpoint.every_steps=2",
        "train.max_steps=4",
        "checkpoint.async_save=true",
        timeout=150,
    )
    assert published == [2, 4]
    root = run_dir / "checkpoints"
    assert (root / "latest").read_text() == "step_00000004"
    assert validate(root / "step_00000004") is None
