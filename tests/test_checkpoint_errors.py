"""A checkpoint that cannot be resumed gives one clear message through the CLI (exit 2, `error:`
on stderr), naming what is wrong; a tampered DCP metadata pickle is refused, never executed.

The checkpoint is written once by the real CLI on a spawned rank; each test edits a copy. The
CLI is then run in this process (world size 1, no process group), which fails at resume, before
training.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import shutil
import signal
from pathlib import Path

import pytest
import xxhash

from tests.conftest import tiny_config_args

STEP2 = "step_00000002"


def _train(assets: Path, run_dir: Path) -> dict:
    from launch.train import run

    return run(
        tiny_config_args(
            assets,
            run_dir,
            "output.save_hf_model=false",
            "checkpoint.every_steps=2",
            "train.max_steps=2",
        )
    )


@pytest.fixture(scope="module")
def saved_checkpoint(tiny_assets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A published step-2 checkpoint of the tiny model (never modified: tests edit copies)."""
    from tests.launcher import run_ranks

    run_dir = tmp_path_factory.mktemp("errors") / "run"
    run_ranks(_train, 1, tiny_assets, run_dir, timeout=150)
    return run_dir / "checkpoints" / STEP2


@pytest.fixture
def checkpoint(saved_checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "ckpts" / STEP2
    shutil.copytree(saved_checkpoint, copy)
    return copy


@pytest.fixture(autouse=True)
def _keep_signal_handlers():
    """The in-process CLI installs its stop-signal handlers; give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def digest(path: Path, algorithm: str) -> str:
    """A file's checksum by the name a manifest records (xxh3_128; sha256 before format 2)."""
    data = path.read_bytes()
    if algorithm == "xxh3_128":
        return xxhash.xxh3_128(data).hexdigest()
    return hashlib.new(algorithm, data).hexdigest()


def reseal(ckpt: Path, *changed: str) -> None:
    """Re-record `changed` files in manifest.json and rewrite the COMPLETE marker (the sha256 of
    the manifest), exactly as trainer/checkpoint/manager.py publishes them, so an edited checkpoint is
    valid again."""
    manifest = json.loads((ckpt / "manifest.json").read_text())
    algorithm = manifest.get("hash", "sha256")
    for rel in changed:
        f = ckpt / rel
        manifest["files"][rel] = {"bytes": f.stat().st_size, algorithm: digest(f, algorithm)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (ckpt / "COMPLETE").write_text(digest(ckpt / "manifest.json", "sha256"))


def _edit_trainer_json(ckpt: Path, **changes) -> None:
    path = ckpt / "trainer.json"
    saved = json.loads(path.read_text())
    saved.update(changes)
    path.write_text(json.dumps(saved, indent=1))
    reseal(ckpt, "trainer.json")


def _cli_error(capsys, argv: list[str]) -> str:
    """Run the CLI; it must exit 2 with exactly one `error:` line on stderr. Returns that line."""
    from launch.train import main

    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1, err[-3000:]
    assert "Traceback" not in err, err[-3000:]
    return lines[0]


def test_reseal_makes_an_edited_checkpoint_valid_again(checkpoint):
    """The helper the tests below rely on: editing breaks validation, resealing restores it."""
    from trainer.checkpoint.files import validate

    path = checkpoint / "trainer.json"
    path.write_text(path.read_text().replace('"full"', '"lora"'))
    assert "trainer.json fails its xxh3_128 checksum" in validate(checkpoint)
    reseal(checkpoint, "trainer.json")
    assert validate(checkpoint) is None


def test_resume_from_missing_path_names_it(tiny_assets, tmp_path, capsys):
    line = _cli_error(
        capsys,
        tiny_config_args(tiny_assets, tmp_path / "run", "checkpoint.resume=/no/such/path"),
    )
    assert line == "error: checkpoint.resume=/no/such/path: no such checkpoint"


def test_resume_with_different_model_shape_names_parameter_and_shapes(
    tiny_assets, checkpoint, tmp_path, capsys
):
    from launch.make_demo import build_tiny_model_dir

    wider = build_tiny_model_dir(tmp_path / "wider", seed=0, hidden=48, layers=2, heads=2)
    line = _cli_error(
        capsys,
        tiny_config_args(
            tiny_assets,
            tmp_path / "run",
            f"model.name_or_path={wider}",
            f"checkpoint.resume={checkpoint}",
        ),
    )
    assert str(checkpoint) in line
    assert "model shape differs" in line
    # e.g. "model.embed_tokens.weight: checkpoint [V, 32] vs model [V, 48]"
    assert re.search(r"model\.\S+\.weight: checkpoint \[[\d, ]*32[\d, ]*\] vs model \[", line), line
    assert re.search(r"vs model \[[\d, ]*48[\d, ]*\]", line), line


def test_resume_of_a_different_method_names_both(tiny_assets, checkpoint, tmp_path, capsys):
    _edit_trainer_json(checkpoint, method="lora")
    line = _cli_error(
        capsys,
        tiny_config_args(tiny_assets, tmp_path / "run", f"checkpoint.resume={checkpoint}"),
    )
    assert line == f"error: {checkpoint}: saved by a 'lora' run, this run is 'full' training"


def test_resume_of_a_newer_format_names_versions(tiny_assets, checkpoint, tmp_path, capsys):
    from trainer.checkpoint.files import FORMAT_VERSION

    _edit_trainer_json(checkpoint, format_version=99)
    line = _cli_error(
        capsys,
        tiny_config_args(tiny_assets, tmp_path / "run", f"checkpoint.resume={checkpoint}"),
    )
    assert str(checkpoint) in line
    assert "newer format (version 99" in line
    assert f"reads up to {FORMAT_VERSION}" in line


def test_auto_resume_reports_incompatible_checkpoint_instead_of_skipping_it(
    tiny_assets, checkpoint, tmp_path, capsys
):
    """`auto` picks the newest valid checkpoint; if it is incompatible, say so (not train from
    scratch over it)."""
    _edit_trainer_json(checkpoint, method="lora")
    line = _cli_error(
        capsys,
        tiny_config_args(tiny_assets, tmp_path / "run", f"checkpoint.dir={checkpoint.parent}"),
    )
    assert "saved by a 'lora' run" in line


class _RunsShell:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _tamper_metadata(checkpoint: Path, proof: Path) -> Path:
    """Replace the DCP metadata with a pickle that would run a shell command; reseal."""
    metadata = checkpoint / "engine" / ".metadata"
    metadata.write_bytes(pickle.dumps(_RunsShell(f"touch {proof}")))
    reseal(checkpoint, "engine/.metadata")
    return metadata


def test_tampered_dcp_metadata_is_refused_not_executed(checkpoint, tmp_path):
    from trainer.checkpoint import dcp_io

    proof = tmp_path / "pwned"
    metadata = _tamper_metadata(checkpoint, proof)
    with pytest.raises(dcp_io.UnsafeCheckpointError) as e:
        dcp_io.read_tensor_names(checkpoint / "engine")
    assert str(metadata) in str(e.value)
    assert "refusing to load posix.system" in str(e.value)
    assert not proof.exists()


def test_tampered_dcp_metadata_is_refused_on_resume(tiny_assets, checkpoint, tmp_path, capsys):
    proof = tmp_path / "pwned"
    metadata = _tamper_metadata(checkpoint, proof)
    line = _cli_error(
        capsys,
        tiny_config_args(tiny_assets, tmp_path / "run", f"checkpoint.resume={checkpoint}"),
    )
    assert "UnsafeCheckpointError" in line
    assert str(metadata) in line
    assert "refusing to load posix.system" in line
    assert not proof.exists()
