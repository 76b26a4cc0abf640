"""Checkpoint checksums at scale: every rank hashes a share of the files, on save and on resume
(a corrupted file is named whichever rank finds it); an async save hashes off the training
thread; the collective timeout reaches the checkpoint groups; format-1 checkpoints (sha256
manifests) still resume.

Trainer modules are imported inside the rank functions and tests (spawned ranks import this
module first)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import signal
from pathlib import Path

import pytest

from tests.conftest import tiny_config_args

STEP1, STEP2 = "step_00000001", "step_00000002"


def _relative(path: Path) -> str:
    """A hashed file's path inside its checkpoint (published or temporary) directory."""
    parts = path.parts
    top = max(i for i, p in enumerate(parts) if p.startswith(("step_", ".tmp-step_")))
    return str(Path(*parts[top + 1 :]))


def _group_timeout_s(group) -> float:
    import torch

    return group._get_backend(torch.device("cpu")).options._timeout.total_seconds()


def _verify_on_two_ranks(root: Path, timeout_s: float) -> dict:
    """Async-save steps 1 and 2 on this rank, resume-verify, corrupt the largest file of rank
    1's share, resume again. Returns what each phase hashed (file, thread) and decided."""
    import threading

    import torch
    import torch.distributed as dist

    from trainer.checkpoint import files as ck
    from trainer.checkpoint import manager as ck_manager
    from trainer.dist import init_distributed, shutdown
    from trainer.engine.ddp import DDPEngine

    ctx = init_distributed(timeout_s=timeout_s)
    hashed: list[tuple[str, str]] = []
    real_digest = ck.file_digest

    def spy(path: Path, algorithm: str = ck.CHECKSUM) -> str:
        hashed.append((_relative(Path(path)), threading.current_thread().name))
        return real_digest(path, algorithm)

    ck.file_digest = ck_manager.file_digest = spy  # hashing (files) and the marker (manager)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 64))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    engine = DDPEngine(model, opt, sched, ctx, "fp32")
    manager = ck_manager.CheckpointManager(root, ctx, async_save=True)
    out: dict = {
        "timeouts": [
            _group_timeout_s(g) for g in (dist.group.WORLD, manager.group, manager.async_group)
        ]
    }
    for step in (1, 2):
        model(torch.randn(4, 256)).square().sum().backward()
        opt.step()
        hashed.clear()
        manager.save(step, engine, {"data": {}, "rng": {}}, {"train_state": {}}, "x: 1\n")
        manager.wait()
    out["save_hashed"] = list(hashed)

    hashed.clear()
    out["chosen"] = manager.resolve_resume("auto").name
    out["verify_hashed"] = list(hashed)

    shares: list = [None] * ctx.world_size
    mine = [f for f, _ in hashed if f != ck.MANIFEST]
    dist.all_gather_object(shares, mine, group=manager.group)
    target = max(shares[1], key=lambda rel: (root / STEP2 / rel).stat().st_size)
    if ctx.is_main:
        data = bytearray((root / STEP2 / target).read_bytes())
        data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
        (root / STEP2 / target).write_bytes(bytes(data))
    manager._barrier()
    out["corrupted"] = target

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            notes.append(record.getMessage())

    notes: list[str] = []
    handler = Keep(logging.WARNING)
    logging.getLogger("fttrain").addHandler(handler)
    try:
        out["chosen_after"] = manager.resolve_resume("auto").name
    finally:
        logging.getLogger("fttrain").removeHandler(handler)
    out["notes"] = notes
    try:
        manager.resolve_resume(str(root / STEP2))
        out["explicit"] = None
    except ck.CheckpointError as e:
        out["explicit"] = str(e)
    shutdown(ctx)
    return out


@pytest.mark.timeout(200)
def test_every_rank_hashes_a_share_and_any_rank_names_a_corrupted_file(tmp_path, ranks):
    from trainer.checkpoint.files import CHECKSUM, MANIFEST

    root = tmp_path / "ckpts"
    results = ranks(_verify_on_two_ranks, 2, root, 123.0, timeout=150)
    manifest = json.loads((root / STEP1 / MANIFEST).read_text())
    files = set(manifest["files"])
    assert manifest["hash"] == CHECKSUM and len(files) == 8, files  # 2 shards, .metadata, ...

    for phase in ("save_hashed", "verify_hashed"):
        shares = [{f for f, _ in r[phase] if f != MANIFEST} for r in results]
        assert all(shares), (phase, shares)  # both ranks hashed something
        assert not shares[0] & shares[1], (phase, shares)  # nothing twice
        assert shares[0] | shares[1] == files, phase  # everything once
        # Both shards are the bulk of the bytes: one each.
        assert [len([f for f in s if f.endswith(".distcp")]) for s in shares] == [1, 1], shares
    # An async save hashes in the background, never on the training thread (the manifest's
    # own sha256, the marker, is written by rank 0 on it: a few KB).
    for r in results:
        threads = {thread for f, thread in r["save_hashed"] if f != MANIFEST}
        assert threads == {"checkpoint-hash"}, threads

    rank0, rank1 = results
    target = rank0["corrupted"]
    assert target in {f for f, _ in rank1["verify_hashed"]}
    assert target not in {f for f, _ in rank0["verify_hashed"]}
    reason = f"{target} fails its {CHECKSUM} checksum (corrupted)"
    assert [r["chosen"] for r in results] == [STEP2, STEP2]
    assert [r["chosen_after"] for r in results] == [STEP1, STEP1]
    # Rank 0 tells the user what rank 1 found, naming the file; every rank gets the same error.
    assert f"resume: skipping {root / STEP2}: {reason}" in rank0["notes"], rank0["notes"]
    assert rank1["notes"] == []
    explicit = f"checkpoint.resume={root / STEP2}: not a usable checkpoint: {reason}"
    assert [r["explicit"] for r in results] == [explicit, explicit]
    # train.collective_timeout_s reaches the process group and both checkpoint groups.
    assert [r["timeouts"] for r in results] == [[123.0] * 3] * 2


def test_async_save_hashes_in_the_background_and_poll_only_publishes(tmp_path):
    import threading

    import torch

    from trainer.checkpoint import files as ck
    from trainer.checkpoint import manager as ck_manager
    from trainer.dist import DistContext
    from trainer.engine.ddp import DDPEngine

    ctx = DistContext(0, 0, 1, torch.device("cpu"), None)
    model = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    engine = DDPEngine(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), ctx)
    manager = ck_manager.CheckpointManager(tmp_path, ctx, async_save=True)
    hashed: list[tuple[str, str]] = []
    real_digest = ck.file_digest

    def spy(path: Path, algorithm: str = ck.CHECKSUM) -> str:
        hashed.append((_relative(Path(path)), threading.current_thread().name))
        return real_digest(path, algorithm)

    ck.file_digest = ck_manager.file_digest = spy  # hashing (files) and the marker (manager)
    try:
        manager.save(1, engine, {"data": {}, "rng": {}}, {"train_state": {}}, "x: 1\n")
        share = manager.pending.future.result()  # written and hashed: what poll() will find
        in_background = list(hashed)
        hashed.clear()
        manager.poll()
    finally:
        ck.file_digest = ck_manager.file_digest = real_digest
    assert manager.pending is None and manager.last_saved_step == 1
    manifest = json.loads((tmp_path / STEP1 / ck.MANIFEST).read_text())
    assert set(share) == set(manifest["files"]) == {f for f, _ in in_background}
    assert {thread for _, thread in in_background} == {"checkpoint-hash"}
    assert hashed == [(ck.MANIFEST, threading.current_thread().name)]  # the marker only
    assert ck.validate(tmp_path / STEP1) is None


def test_sha256_on_request_is_recorded_and_verified(tmp_path):
    """`checksum="sha256"` (the benchmark's "before") writes a manifest that says so."""
    import torch

    from trainer.checkpoint import files as ck
    from trainer.checkpoint import manager as ck_manager
    from trainer.dist import DistContext
    from trainer.engine.ddp import DDPEngine

    ctx = DistContext(0, 0, 1, torch.device("cpu"), None)
    model = torch.nn.Linear(8, 8)
    opt = torch.optim.AdamW(model.parameters())
    engine = DDPEngine(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), ctx)
    manager = ck_manager.CheckpointManager(tmp_path, ctx, checksum="sha256")
    manager.save(1, engine, {"data": {}, "rng": {}}, {"train_state": {}}, "x: 1\n")
    manifest = json.loads((tmp_path / STEP1 / ck.MANIFEST).read_text())
    trainer_json = tmp_path / STEP1 / "trainer.json"
    assert manifest["hash"] == "sha256"
    assert (
        manifest["files"]["trainer.json"]["sha256"]
        == hashlib.sha256(trainer_json.read_bytes()).hexdigest()
    )
    assert manager.resolve_resume("auto") == tmp_path / STEP1


def test_shares_split_the_bytes_evenly():
    """Every file goes to exactly one rank, about 1/world of the bytes each, also for DeepSpeed's
    alternating small model / large optimizer files (a round robin by name would give all the
    large ones to rank 0 and 2)."""
    from trainer.checkpoint.files import share_of

    sizes = {}
    for r in range(4):
        sizes[f"ds/zero_pp_rank_{r}_mp_rank_00_model_states.pt"] = 10
        sizes[f"ds/zero_pp_rank_{r}_mp_rank_00_optim_states.pt"] = 1000
    sizes["trainer.json"] = 1
    shares = [share_of(sizes, r, 4) for r in range(4)]
    assert sorted(f for s in shares for f in s) == sorted(sizes)
    loads = [sum(sizes[f] for f in s) for s in shares]
    assert max(loads) - min(loads) <= 11, loads
    assert share_of(sizes, 0, 1) == sorted(sizes, key=lambda f: (-sizes[f], f))


# ---------------------------------------------------------------------------------------------
# Format 1: sha256 manifests without "hash", written before xxh3_128.


def _as_format_1(ckpt: Path) -> None:
    """Rewrite a checkpoint as format 1 wrote it: format_version 1, a manifest of sha256
    checksums without a "hash" key, the marker its sha256. (Independent of trainer code.)"""

    def sha256(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    trainer = json.loads((ckpt / "trainer.json").read_text())
    trainer["format_version"] = 1
    trainer["versions"]["format"] = "1"
    (ckpt / "trainer.json").write_text(json.dumps(trainer, indent=1))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    files = {
        rel: {"bytes": (ckpt / rel).stat().st_size, "sha256": sha256(ckpt / rel)}
        for rel in manifest["files"]
    }
    (ckpt / "manifest.json").write_text(
        json.dumps({"step": manifest["step"], "files": files}, indent=1)
    )
    (ckpt / "COMPLETE").write_text(sha256(ckpt / "manifest.json"))


@pytest.fixture
def _keep_signal_handlers():
    """The in-process CLI installs its stop-signal handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.mark.usefixtures("_keep_signal_handlers")
def test_a_format_1_checkpoint_with_a_sha256_manifest_still_resumes(tiny_assets, tmp_path, capsys):
    from launch.train import main
    from trainer.checkpoint.files import CHECKSUM, FORMAT_VERSION, validate

    def cli(*extra: str) -> int:
        args = tiny_config_args(tiny_assets, run_dir, "logging.tensorboard=false", *extra)
        return main([*args, "checkpoint.every_steps=2", "output.save_hf_model=false"])

    run_dir = tmp_path / "run"
    assert cli("train.max_steps=2") == 0
    old = run_dir / "checkpoints" / STEP2
    _as_format_1(old)
    assert "hash" not in json.loads((old / "manifest.json").read_text())
    assert validate(old) is None

    damaged = tmp_path / "damaged" / STEP2
    shutil.copytree(old, damaged)
    shard = damaged / "engine" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert validate(damaged) == "engine/__0_0.distcp fails its sha256 checksum (corrupted)"

    capsys.readouterr()
    assert cli("train.max_steps=4") == 0
    assert f"resumed from {old} at step 2" in capsys.readouterr().err
    new = run_dir / "checkpoints" / "step_00000004"
    assert json.loads((new / "manifest.json").read_text())["hash"] == CHECKSUM
    assert json.loads((new / "trainer.json").read_text())["format_version"] == FORMAT_VERSION
    assert validate(old) is None and validate(new) is None


def test_collective_timeout_is_a_config_value(tiny_assets, tmp_path):
    from trainer.config import ConfigError, load_config
    from trainer.dist import DEFAULT_TIMEOUT_S

    path, *overrides = tiny_config_args(tiny_assets, tmp_path / "run")
    assert load_config(path, overrides).train.collective_timeout_s == DEFAULT_TIMEOUT_S == 1800
    cfg = load_config(path, [*overrides, "train.collective_timeout_s=7200"])
    assert cfg.train.collective_timeout_s == 7200
    with pytest.raises(ConfigError, match="train.collective_timeout_s"):
        load_config(path, [*overrides, "train.collective_timeout_s=0"])


def test_async_saves_reuse_their_staging_buffers_and_hold_each_saves_values(tmp_path):
    """The second async save copies into the first save's CPU buffers (no new allocation) and
    still writes the values of its own step; a state whose shapes change gets new buffers."""
    import torch

    from trainer.checkpoint import files as ck
    from trainer.checkpoint import manager as ck_manager
    from trainer.dist import DistContext
    from trainer.engine.ddp import DDPEngine

    ctx = DistContext(0, 0, 1, torch.device("cpu"), None)
    torch.manual_seed(0)
    model = torch.nn.Linear(16, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    engine = DDPEngine(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), ctx)
    manager = ck_manager.CheckpointManager(tmp_path, ctx, async_save=True)

    def train_step() -> None:
        model(torch.randn(4, 16)).square().sum().backward()
        opt.step()
        opt.zero_grad()

    saved: dict[int, dict[str, torch.Tensor]] = {}
    buffers = []
    for step in (1, 2, 3):
        train_step()
        manager.save(step, engine, {"data": {}, "rng": {}}, {"train_state": {}}, "x: 1\n")
        saved[step] = {k: v.clone() for k, v in model.state_dict().items()}
        buffers.append(engine._stager._buffers["model"]["weight"].data_ptr())
        train_step()  # changes the live weights while the background write may still run
    manager.wait()
    assert buffers[0] == buffers[1] == buffers[2]  # one allocation, reused

    for step in (1, 2, 3):
        fresh = torch.nn.Linear(16, 16)
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=0.1)
        fresh(torch.randn(1, 16)).sum().backward()
        fresh_opt.step()  # so the optimizer state exists to load into
        other = DDPEngine(
            fresh, fresh_opt, torch.optim.lr_scheduler.LambdaLR(fresh_opt, lambda s: 1.0), ctx
        )
        other.load_state(tmp_path / ck.checkpoint_name(step) / "engine")
        for k, v in fresh.state_dict().items():
            assert torch.equal(v, saved[step][k]), (step, k)

    stager = engine._stager
    before = stager._buffers["model"]["weight"]
    stager.stage({"model": {"weight": torch.zeros(3, 3)}})  # another layout: new buffers
    assert stager._buffers["model"]["weight"] is not before
    assert stager._buffers["model"]["weight"].shape == (3, 3)
