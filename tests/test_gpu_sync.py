"""The training step between logging steps makes no host-device sync (issue 12, acceptance 5).

Runs the real CLI path on one GPU with `torch.cuda.set_sync_debug_mode("error")` around every
step that logs nothing: any `.item()`, `.tolist()`, blocking copy or data-dependent shape on the
device inside the forward, backward, clipping or optimizer step raises. Skipped without CUDA.
"""

from __future__ import annotations

import pytest
import torch

from tests.conftest import tiny_config_args

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.timeout(300)
@pytest.mark.parametrize(
    ("packing", "packed_attention"),
    [(False, "auto"), (True, "auto"), (True, "mask")],
    ids=["padded", "packed", "packed-mask"],  # packed: varlen where the kernel passes its check
)
def test_steps_between_logging_steps_do_not_sync(
    tiny_assets, tmp_path, monkeypatch, packing, packed_attention
):
    import launch.train as lt
    import trainer.loop as loop

    real_step = loop.train_step
    guarded: list[int] = []

    def guarded_step(engine, micro_batches, max_grad_norm, step=0, data_error=None, *, read=True):
        if read:
            return real_step(engine, micro_batches, max_grad_norm, step, data_error, read=True)
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            res = real_step(engine, micro_batches, max_grad_norm, step, data_error, read=False)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert res.pending is not None, "the step read its result back"
        guarded.append(step)
        return res

    monkeypatch.setattr(loop, "train_step", guarded_step)
    argv = tiny_config_args(
        tiny_assets,
        tmp_path / "run",
        "train.max_steps=8",
        "train.precision=bf16",
        "logging.every_steps=4",
        "checkpoint.every_steps=100",
        f"data.packing={str(packing).lower()}",
        f"train.packed_attention={packed_attention}",
    )
    summary = lt.run(argv)
    assert summary["steps"] == 8
    assert guarded == [1, 2, 3, 5, 6, 7]
