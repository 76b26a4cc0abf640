"""The direct tensor reader of our DCP loads (trainer/checkpoint/dcp_io.py): bitwise the same state as
DCP's own reader, taken only for records that are exactly the destination's bytes."""

from __future__ import annotations

import io
from types import SimpleNamespace

import pytest
import torch

from trainer.checkpoint import dcp_io
from trainer.dist import DistContext
from trainer.engine.ddp import DDPEngine

CTX = DistContext(0, 0, 1, torch.device("cpu"), None)


def _engine(seed: int) -> DDPEngine:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 4))
    model.register_buffer("counts", torch.arange(5))  # an int64 buffer beside fp32 tensors
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    engine = DDPEngine(model, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0), CTX)
    model(torch.randn(3, 8)).square().sum().backward()
    opt.step()  # Adam state (fp32 moments, step counts) to save and load
    opt.zero_grad()
    return engine


def _flat(engine: DDPEngine) -> dict[str, torch.Tensor]:
    out = {f"model.{k}": v for k, v in engine.module.state_dict().items()}
    for i, state in engine.optimizer.state_dict()["state"].items():
        out.update({f"optim.{i}.{k}": v for k, v in state.items()})
    return out


def test_direct_reads_give_the_saved_state_bitwise_like_dcps_reader(tmp_path, monkeypatch):
    saved = _engine(0)
    saved.save_state(tmp_path)
    expected = _flat(saved)

    direct = []
    real = dcp_io._read_direct

    def spy(*args):
        ok = real(*args)
        direct.append(ok)
        return ok

    monkeypatch.setattr(dcp_io, "_read_direct", spy)
    ours = _engine(1)
    ours.load_state(tmp_path)
    assert direct and all(direct)  # every tensor took the direct path

    monkeypatch.setattr(dcp_io, "_read_direct", lambda *args: False)  # DCP's reader for all
    stock = _engine(2)
    stock.load_state(tmp_path)

    for name, want in expected.items():
        for engine in (ours, stock):
            got = _flat(engine)[name]
            assert got.dtype == want.dtype and torch.equal(got, want), name


def _record(tensor: torch.Tensor) -> tuple[io.BytesIO, SimpleNamespace]:
    buf = io.BytesIO()
    buf.write(b"x" * 100)  # records sit at an offset inside a rank's .distcp file
    torch.save(tensor, buf)
    return buf, SimpleNamespace(offset=100, length=buf.tell() - 100)


def _item(shape: tuple[int, ...], offsets: tuple[int, ...] | None = None) -> SimpleNamespace:
    return SimpleNamespace(storage_offsets=offsets or (0,) * len(shape), lengths=shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.int64, torch.bool])
def test_a_plain_record_is_read_into_the_destination(dtype):
    src = (torch.arange(12) % 3).reshape(3, 4).to(dtype)
    f, info = _record(src)
    dest = torch.zeros(3, 4, dtype=dtype)
    assert dcp_io._read_direct(f, info, _item((3, 4)), dest)
    assert torch.equal(dest, src)


@pytest.mark.parametrize(
    "case",
    ["non_contiguous_record", "view_of_larger_storage", "other_dtype", "narrowed", "other_shape"],
)
def test_records_that_are_not_exactly_the_destination_fall_back(case):
    src = torch.arange(12.0).reshape(3, 4)
    dest = torch.zeros(3, 4)
    item = _item((3, 4))
    if case == "non_contiguous_record":
        src = torch.arange(12.0).reshape(4, 3).t()
    elif case == "view_of_larger_storage":
        src = torch.arange(24.0).reshape(6, 4)[3:]
    elif case == "other_dtype":
        dest = torch.zeros(3, 4, dtype=torch.float64)
    elif case == "narrowed":
        item = _item((3, 4), offsets=(1, 0))
    elif case == "other_shape":
        dest = torch.zeros(4, 3)
        item = _item((4, 3))
    f, info = _record(src)
    before = dest.clone()
    assert not dcp_io._read_direct(f, info, item, dest)
    assert torch.equal(dest, before)  # untouched: DCP's reader does this item


def test_a_record_that_is_not_a_plain_tensor_falls_back():
    f, info = _record({"not": "a tensor"})
    assert not dcp_io._read_direct(f, info, _item((3, 4)), torch.zeros(3, 4))


def test_a_model_only_load_where_every_item_is_read_directly(tmp_path):
    """Export loads the model alone: every item takes the direct path, none is left to DCP."""
    saved = _engine(0)
    saved.save_state(tmp_path)
    fresh = _engine(1).module
    dcp_io.load_into(fresh, None, tmp_path, trainable_only=False)
    for k, v in saved.module.state_dict().items():
        assert torch.equal(fresh.state_dict()[k], v), k
