"""How multi-rank runs end, through the real CLI under real torchrun (and `launch.run`):
async saves on 2 ranks, Ctrl-C, an error on one rank only, and what a resumed run logs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config_args
from tests.launcher import RanksFailed, run_torchrun, torchrun_env

STEPS = 200  # long enough (~2 s of training) for a Ctrl-C to land mid-run
COMMON = (f"train.max_steps={STEPS}", "logging.every_steps=1")


def train_args(assets: Path, run_dir: Path, *extra: str) -> list[str]:
    """launch.run's arguments (the config and overrides; no `-m launch.train`)."""
    return tiny_config_args(assets, run_dir, *COMMON, *extra)


def launch(assets: Path, run_dir: Path, *extra: str, fault: str | None = None, **kw):
    env = torchrun_env(**({"FTTRAIN_FAULT": fault} if fault else {}))
    return run_torchrun(
        train_args(assets, run_dir, *extra), 2, timeout=240, env=env, launcher="launch.run", **kw
    )


def logged(run_dir: Path, key: str = "train/loss") -> list[tuple[int, float]]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def tensorboard_steps(run_dir: Path, key: str = "train/loss") -> list[int]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [e.step for e in acc.Scalars(key)]


def same_weights(a: Path, b: Path) -> bool:
    x, y = (
        load_file(a / "model" / "model.safetensors"),
        load_file(b / "model" / "model.safetensors"),
    )
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def worker_frames(out: str) -> list[str]:
    """Traceback frames from our code or the libraries our workers run (not torchrun's own)."""
    return [
        line
        for line in out.splitlines()
        if line.strip().startswith("File ")
        and any(p in line for p in ("/launch/train", "/trainer/", "/data/", "transformers"))
    ]


@pytest.fixture(scope="module")
def straight(tiny_assets, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("endings") / "straight"
    proc = launch(tiny_assets, run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:]
    return run_dir


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_async_saves_on_two_ranks_finish_and_resume_bitwise(tiny_assets, tmp_path, straight):
    """Async saves at every step on 2 ranks used to deadlock at the first save. Killed at step
    8 and resumed: losses and weights equal the straight run's, and TensorBoard and
    metrics.jsonl hold exactly one point per step although steps were redone."""
    run_dir = tmp_path / "async"
    every_step = ("checkpoint.async_save=true", "checkpoint.every_steps=1")
    proc = launch(tiny_assets, run_dir, *every_step, fault="micro_step:8:1")
    assert proc.returncode != 0, "the injected SIGKILL did not happen"
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(saved) >= 5, saved  # steps 1..7 were saved in the background without a hang
    assert max(s for s, _ in logged(run_dir)) >= 7  # steps past the checkpoint were logged
    proc = launch(tiny_assets, run_dir, "checkpoint.async_save=true", "checkpoint.every_steps=50")
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "resume: continuing from" in proc.stdout

    assert logged(run_dir) == logged(straight)  # each step once, bitwise equal losses
    assert tensorboard_steps(run_dir) == list(range(1, STEPS + 1))
    assert same_weights(run_dir, straight)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_ctrl_c_saves_exits_cleanly_and_resumes_bitwise(tiny_assets, tmp_path, straight):
    run_dir = tmp_path / "interrupted"
    metrics = run_dir / "metrics.jsonl"

    def past_step_3() -> bool:
        return metrics.exists() and metrics.read_text().count("train/loss") >= 3

    proc = launch(tiny_assets, run_dir, signal_when=past_step_3)
    assert proc.returncode == 130, proc.stdout[-3000:]  # 128 + SIGINT, documented
    assert "Traceback" not in proc.stdout, proc.stdout[-3000:]
    assert proc.stdout.count("SIGINT received: saving a checkpoint") == 1  # rank 0 only
    assert "[rank1]" not in proc.stdout
    [ckpt] = (run_dir / "checkpoints").glob("step_*")
    stopped_at = int(ckpt.name.split("_")[1])
    assert 3 <= stopped_at < STEPS
    assert not (run_dir / "summary.json").exists()

    proc = launch(tiny_assets, run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"at step {stopped_at}" in proc.stdout
    assert logged(run_dir) == logged(straight)
    assert same_weights(run_dir, straight)


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_usr1_to_the_launcher_reaches_the_workers_which_save_and_resume_bitwise(
    tiny_assets, tmp_path, straight
):
    """A Slurm warning signal (SIGUSR1) sent to launch.run alone: it does not die of it (its
    default action) nor stop the workers after torchrun's shutdown window; it passes it on, the
    workers save at the end of their step and exit 0, and so does the launcher. Outside Slurm
    nothing is requeued; rerunning resumes bitwise."""
    import signal

    run_dir = tmp_path / "usr1"
    metrics = run_dir / "metrics.jsonl"

    def past_step_3() -> bool:
        return metrics.exists() and metrics.read_text().count("train/loss") >= 3

    proc = launch(tiny_assets, run_dir, signal_when=past_step_3, signum=signal.SIGUSR1)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.count("SIGUSR1 received: saving a checkpoint") == 1, proc.stdout[-3000:]
    assert "rerun the same command to resume" in proc.stdout
    [ckpt] = (run_dir / "checkpoints").glob("step_*")
    assert 3 <= int(ckpt.name.split("_")[1]) < STEPS
    proc = launch(tiny_assets, run_dir)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert logged(run_dir) == logged(straight)
    assert same_weights(run_dir, straight)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_usr1_before_the_workers_exist_is_passed_on_when_they_do(tiny_assets, tmp_path):
    """A Slurm warning that reaches launch.run while it is still starting (no workers yet)
    is not lost: once the workers run, they get it and stop after their first step, saved."""
    import signal
    import time

    run_dir = tmp_path / "early"
    # 0.5 s: past the interpreter's own start (before any handler can exist), long before the
    # launcher has imported torch and started workers (seconds).
    start = time.monotonic()
    proc = launch(
        tiny_assets,
        run_dir,
        signal_when=lambda: time.monotonic() - start > 0.5,
        signum=signal.SIGUSR1,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "SIGUSR1 received" in proc.stdout, proc.stdout[-3000:]
    assert [p.name for p in (run_dir / "checkpoints").glob("step_*")] == ["step_00000001"]


# ---------------------------------------------------------------------------------------------
# An error on one rank only. Shards of 8 rows and a shuffle window of 8: each step, rank 1
# reads all 8 rows of one shard and rank 0 those of another.


def rank1_shard(shards: Path, step: int) -> int:
    """The shard whose rows rank 1 reads at `step` (1-based) of the tiny config on 2 ranks."""
    from tests.data_fixtures import config, stream

    cfg = config(shards, shuffle_window=8, template="compact", seq_len=48)
    it = iter(stream(cfg, rank=1, world_size=2, micro_batch_size=4, grad_accum_steps=2, seed=7))
    for _ in range(step):
        micro = next(it)
    rows = {int(i) for m in micro for i in m["sample_index"].flatten() if i >= 0}
    [shard] = {r // 8 for r in rows}
    return shard


def rename_field(path: Path, rows: list[int] | None) -> None:
    """Make rows (all when None) lack `instruction`; same length, so the index stays right."""
    lines = path.read_bytes().split(b"\n")
    for i in range(len(lines)):
        if lines[i] and (rows is None or i in rows):
            lines[i] = lines[i].replace(b'"instruction"', b'"instructiom"')
    path.write_bytes(b"\n".join(lines))


def break_index(path: Path) -> None:
    """Point every row past the end of the file (the index keeps its size)."""
    idx = np.frombuffer(path.read_bytes(), dtype="<u8").copy()
    idx[1:] += 10**6
    path.write_bytes(idx.tobytes())


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("case", ["strict_row", "bad_fraction", "unreadable_shard"])
def test_error_on_one_rank_reaches_the_user_naming_it(tiny_assets, tmp_path, case):
    from data.prepare import prepare

    shards = tmp_path / "shards"
    prepare(str(tiny_assets / "train.jsonl"), str(shards), shard_size="8rows")
    name = lambda shard: f"shard-{shard:05d}.jsonl"  # noqa: E731
    extra = ["data.shuffle_window=8", f"data.train_path={shards}"]
    if case == "strict_row":
        shard = rank1_shard(shards, 2)
        rename_field(shards / name(shard), rows=[3])
        extra.append("data.bad_rows=strict")
        culprit = f"{name(shard)}:4"
    elif case == "bad_fraction":
        for shard in [rank1_shard(shards, step) for step in (1, 2, 3)]:
            rename_field(shards / name(shard), rows=None)
        culprit = "data.max_bad_fraction"
    else:
        shard = rank1_shard(shards, 2)
        break_index(shards / f"{name(shard)}.idx")
        extra.append("data.bad_rows=strict")
        culprit = name(shard)
    argv = ["-m", "launch.train", *tiny_config_args(tiny_assets, tmp_path / "run", *COMMON)]
    proc = run_torchrun([*argv, *extra], nproc=2, timeout=200)  # stock torchrun
    assert proc.returncode != 0
    errors = [x for x in proc.stdout.splitlines() if x.startswith("error:")]
    assert errors, proc.stdout[-3000:]
    assert "(rank 1)" in errors[0] and culprit in errors[0], errors
    assert len(errors) == 1, errors  # once, not once per rank
    assert not worker_frames(proc.stdout), proc.stdout[-3000:]
    # torchrun's own failure summary points at the same line instead of a link.
    assert f"traceback : {errors[0]}" in proc.stdout, proc.stdout[-2000:]


SLOW_FSYNC = '''\
"""Loaded by the workers of a test run (first on PYTHONPATH): the checkpoint storage is slow, so
what a background thread writes there with fsync (an async checkpoint save) takes minutes.

And the agreed data error waits (up to a minute) until a rank's writer is inside that slow
write: on a loaded machine the error used to come first about one run in four, and the test
then tested nothing."""
import glob
import importlib.abc
import importlib.util
import os
import sys
import threading
import time

HERE = os.path.dirname(__file__)
_fsync = os.fsync


def fsync(fd):
    if threading.current_thread() is not threading.main_thread():
        open(os.path.join(HERE, f"slow-{os.getpid()}"), "w").close()
        time.sleep(600)
    return _fsync(fd)


os.fsync = fsync


def _after_a_slow_write(raise_error):
    def wait_then_raise(*args, **kwargs):
        deadline = time.monotonic() + 60
        while not glob.glob(os.path.join(HERE, "slow-*")) and time.monotonic() < deadline:
            time.sleep(0.05)
        return raise_error(*args, **kwargs)

    return wait_then_raise


class _WrapLoop(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "trainer.loop":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            module.raise_agreed_data_error = _after_a_slow_write(module.raise_agreed_data_error)

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _WrapLoop())
'''


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_error_on_one_rank_ends_the_job_while_a_checkpoint_is_being_written(tiny_assets, tmp_path):
    """Rank 1 hits an unreadable row at step 2 while step 1's async checkpoint save is still
    being written (slow storage): the job ends at once with the one error line. Every rank used
    to wait at its exit for the background writer (DCP's executor thread), so no worker exited
    and torchrun never stopped the job. With fast storage the same run hung about once in ten:
    a rank deadlocked at exit freeing its gloo group (see launch.failures.exit_now), the other
    waited for it inside the writer's collective."""
    from data.prepare import prepare

    shards = tmp_path / "shards"
    prepare(str(tiny_assets / "train.jsonl"), str(shards), shard_size="8rows")
    shard = rank1_shard(shards, 2)
    break_index(shards / f"shard-{shard:05d}.jsonl.idx")
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SLOW_FSYNC)
    env = torchrun_env()
    env["PYTHONPATH"] = f"{hooks}{os.pathsep}{env['PYTHONPATH']}"
    extra = [
        "data.shuffle_window=8",
        f"data.train_path={shards}",
        "data.bad_rows=strict",
        "checkpoint.async_save=true",
        "checkpoint.every_steps=1",  # step 1's save is in flight when step 2 fails
    ]
    argv = ["-m", "launch.train", *tiny_config_args(tiny_assets, tmp_path / "run", *COMMON)]
    proc = run_torchrun([*argv, *extra], nproc=2, timeout=120, env=env)  # not 600 s
    assert proc.returncode != 0
    errors = [x for x in proc.stdout.splitlines() if x.startswith("error:")]
    assert len(errors) == 1 and "(rank 1)" in errors[0], proc.stdout[-3000:]
    assert f"shard-{shard:05d}.jsonl" in errors[0]
    assert not worker_frames(proc.stdout), proc.stdout[-3000:]
    # A rank's writer was inside the slow write of step 1's checkpoint (else this tested
    # nothing): that rank used to wait for it at exit. Whether the other rank's writer got there
    # before the error ended the job is a race, so one suffices.
    assert list(hooks.glob("slow-*")), "no rank's background writer reached the slow write"


@pytest.mark.timeout(120)
def test_a_hung_rank_fails_the_run_with_every_rank_stack_in_the_message(tiny_assets, tmp_path):
    """A hang never stalls the suite, and its failure says where each rank was stuck: the
    launcher asks the ranks for their stacks (SIGQUIT, launch.train's faulthandler) first."""
    env = torchrun_env(FTTRAIN_FAULT="micro_step:2:1:hang")
    with pytest.raises(RanksFailed) as e:
        run_torchrun(
            train_args(tiny_assets, tmp_path / "run"), 2, timeout=30, env=env, launcher="launch.run"
        )
    message = str(e.value)
    assert "still running after 30" in message
    assert "in maybe_fail" in message  # rank 1, asleep in the injected hang
    assert message.count("most recent call first") >= 2  # rank 0's threads too
