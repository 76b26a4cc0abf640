"""Multi-rank training through the real CLI code path, on spawned gloo ranks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import tiny_config_args


def _train_rank(argv: list[str]) -> dict:
    import launch.train as lt

    return lt.run(argv)


def read_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["train/loss"] for r in rows if "train/loss" in r]


def read_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model" / "model.safetensors")


def assert_close_rel(a: torch.Tensor, b: torch.Tensor, tol: float) -> None:
    err = float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30))
    assert err <= tol, err


@pytest.mark.timeout(300)
def test_two_ranks_equal_one_rank_with_double_accumulation(tiny_assets, tmp_path, ranks):
    """2 ranks x accumulation 2 vs 1 rank x accumulation 4: same global batch and data order."""
    two, one = tmp_path / "two", tmp_path / "one"
    common = ["train.max_steps=8", "train.micro_batch_size=4", "optim.weight_decay=0.1"]
    ranks(_train_rank, 2, tiny_config_args(tiny_assets, two, *common, "train.grad_accum_steps=2"))
    ranks(_train_rank, 1, tiny_config_args(tiny_assets, one, *common, "train.grad_accum_steps=4"))
    losses_two, losses_one = read_losses(two), read_losses(one)
    assert len(losses_two) == len(losses_one) == 8
    for a, b in zip(losses_two, losses_one, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (losses_two, losses_one)
    w_two, w_one = read_weights(two), read_weights(one)
    assert w_two.keys() == w_one.keys()
    for name in w_one:
        assert_close_rel(w_two[name], w_one[name], 1e-5)
    # The runs really trained: the loss fell and the weights moved from the initial model.
    assert losses_one[-1] < losses_one[0]
    initial = load_file(tiny_assets / "model" / "model.safetensors")
    assert any(not torch.equal(initial[n], w_one[n]) for n in w_one)


class _NaNOnRank:
    """Wraps an engine: at optimizer step `at_step` (1-based) rank `on_rank` gets a NaN loss.
    Records, on every rank, whether the weights changed across each step."""

    def __init__(self, inner, at_step: int | None, on_rank: int, ctx):
        """`at_step=None`: every step."""
        self.inner, self.at_step, self.on_rank, self.ctx = inner, at_step, on_rank, ctx
        self.step = 1
        self.changed: list[bool] = []
        self.on_device: list[bool] = []  # the skip was decided on the device (no host read)

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def forward_backward(self, batch, loss_scale, is_last_micro_step):
        if self.at_step in (None, self.step) and self.ctx.rank == self.on_rank:
            loss_scale = loss_scale * float("nan")
            return self.inner.forward_backward(batch, loss_scale, is_last_micro_step) * float("nan")
        return self.inner.forward_backward(batch, loss_scale, is_last_micro_step)

    def optimizer_step(self, skip, found_inf=None):
        before = [p.detach().clone() for p in self.inner.unwrapped_model().parameters()]
        self.on_device.append(found_inf is not None)
        if found_inf is None:
            self.inner.optimizer_step(skip)
        else:
            self.inner.optimizer_step(skip, found_inf=found_inf)
        after = list(self.inner.unwrapped_model().parameters())
        self.changed.append(any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)))
        self.step += 1


def _nonfinite_rank(argv: list[str], at_step: int, consecutive: bool) -> dict:
    import launch.train as lt

    wrappers = []

    def build(cfg, derived, ctx):
        engine = _NaNOnRank(lt_build(cfg, derived, ctx), None if consecutive else at_step, 1, ctx)
        wrappers.append(engine)
        return engine

    lt_build = lt.build_engine
    lt.build_engine = build
    try:
        summary = lt.run(argv)
    except lt.NonFiniteLossError as e:
        return {"error": str(e), "changed": wrappers[0].changed, "on_device": wrappers[0].on_device}
    weights = torch.cat([p.detach().flatten() for p in wrappers[0].unwrapped_model().parameters()])
    return {
        "summary": summary,
        "changed": wrappers[0].changed,
        "weights": weights,
        "on_device": wrappers[0].on_device,
    }


# Fused AdamW takes the skip decision on the device: steps that log nothing read nothing back.
DEVICE_SKIP = ("optim.fused=on", "logging.every_steps=4")


@pytest.mark.timeout(300)
@pytest.mark.parametrize("on_device", [False, True], ids=["host", "device"])
def test_nonfinite_loss_on_one_rank_skips_step_everywhere(tiny_assets, tmp_path, ranks, on_device):
    extra = DEVICE_SKIP if on_device else ()
    argv = tiny_config_args(tiny_assets, tmp_path / "run", "train.max_steps=6", *extra)
    results = ranks(_nonfinite_rank, 2, argv, 3, False)
    for r in results:
        assert r["changed"] == [True, True, False, True, True, True]  # step 3 skipped, run went on
        assert r["summary"]["skipped_steps"] == 1
        assert r["summary"]["steps"] == 6
        # logged steps (4 and the last) read the loss back; the others decide on the device
        expected = [True, True, True, False, True, False] if on_device else [False] * 6
        assert r["on_device"] == expected
    assert torch.equal(results[0]["weights"], results[1]["weights"])  # ranks still in lockstep
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train/skipped_steps"] for r in rows if "train/skipped_steps" in r][-1] == 1
    if on_device:  # the same run, reading every step back, ends with the same weights, bitwise
        every = tiny_config_args(
            tiny_assets, tmp_path / "every", "train.max_steps=6", "optim.fused=on"
        )
        read_back = ranks(_nonfinite_rank, 2, every, 3, False)
        assert read_back[0]["on_device"] == [False] * 6
        assert torch.equal(read_back[0]["weights"], results[0]["weights"])
        losses = [r.get("train/loss") for r in rows if "train/loss" in r]
        assert read_losses(tmp_path / "every")[3] == losses[0]  # step 4, logged by both


@pytest.mark.timeout(300)
@pytest.mark.parametrize("on_device", [False, True], ids=["host", "device"])
def test_consecutive_nonfinite_steps_stop_the_run(tiny_assets, tmp_path, ranks, on_device):
    extra = DEVICE_SKIP if on_device else ()
    argv = tiny_config_args(
        tiny_assets,
        tmp_path / "run",
        "train.max_steps=6",
        "train.max_consecutive_nonfinite=2",
        *extra,
    )
    for r in ranks(_nonfinite_rank, 2, argv, 0, True):
        assert "2 consecutive steps had a non-finite loss" in r["error"]
        assert "(last at step 2)" in r["error"]
        # read back at step 4 on the device path: the run stops there, every step skipped
        assert r["changed"] == [False] * (4 if on_device else 2)
