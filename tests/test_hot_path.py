"""The hot path (issue 12, item 3): fused AdamW (`optim.fused`), DDP gradients as bucket views,
bf16 gradient all-reduce (`train.grad_reduce_dtype`), compiled blocks (`train.compile`), and
DeepSpeed's CPU Adam for optimizer offload. Each is checked for doing what it says (the kernel,
the views, the hook, the compiled graphs, the optimizer class are really there) and for training
like the path it replaces."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from torch import nn

from tests.conftest import tiny_config_args
from tests.test_chunked_loss import _build, _fixed_batch, rel_err
from tests.test_deepspeed import ds_args
from tests.test_distributed_training import read_losses, read_weights
from tests.tiny_models import CPU1, tiny_llama
from trainer.config import ConfigError, OptimConfig, ScheduleConfig, load_config
from trainer.optim import (
    apply_optim_settings,
    build_optimizer,
    build_scheduler,
    is_fused,
    use_fused,
)

OFFLOAD = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}


def _train(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int) -> list[float]:
    """`steps` updates of `model` on fixed random batches (the same for every call)."""
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(steps):
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=g)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def _max_abs_diff(a: nn.Module, b: nn.Module) -> float:
    pairs = zip(a.parameters(), b.parameters(), strict=True)
    return max((p - q).abs().max().item() for p, q in pairs)


def _update_err(got: nn.Module, want: nn.Module, start: nn.Module) -> float:
    """How far `got`'s total update (from `start`) is from `want`'s, relative to its size."""
    deltas = [
        torch.cat(
            [
                (p - s).detach().flatten()
                for p, s in zip(m.parameters(), start.parameters(), strict=True)
            ]
        )
        for m in (got, want)
    ]
    return rel_err(deltas[0], deltas[1])


# ---------------------------------------------------------------------------------------------
# 1. optim.fused


def test_fused_adamw_on_cpu_trains_like_foreach():
    """optim.fused=on gives torch's fused kernel on the CPU; 3 steps (weight decay on, so both
    groups differ) end on the weights foreach reaches, to 1e-6."""
    models, optimizers = {}, {}
    for fused in ("on", "off"):
        models[fused] = tiny_llama(seed=0)
        cfg = OptimConfig(lr=1e-2, weight_decay=0.1, fused=fused)
        optimizers[fused] = build_optimizer(models[fused], cfg)
        _train(models[fused], optimizers[fused], 3)
    assert is_fused(optimizers["on"]) and not is_fused(optimizers["off"])
    assert optimizers["off"].defaults["foreach"] and not optimizers["on"].defaults["foreach"]
    assert _max_abs_diff(models["on"], models["off"]) <= 1e-6
    assert _max_abs_diff(models["on"], tiny_llama(seed=0)) > 1e-3  # and it did train


def test_fused_auto_is_fused_on_cuda_and_cpu_and_yaml_on_off_are_words(tmp_path):
    assert use_fused("auto", "cuda") and use_fused("auto", "cpu") and not use_fused("auto", "mps")
    assert use_fused("on", "mps") and not use_fused("off", "cuda") and not use_fused("off", "cpu")
    assert is_fused(build_optimizer(tiny_llama(), OptimConfig()))  # auto, on the CPU
    assert not is_fused(build_optimizer(tiny_llama(), OptimConfig(fused="off")))
    # An unquoted on/off is a YAML boolean; it is read back as the word.
    for value in ("on", "off"):
        cfg = load_config(
            None,
            [
                "model.name_or_path=x",
                "data.train_path=x",
                f"optim.fused={value}",
                "train.max_steps=1",
                "train.grad_accum_steps=1",
                f"run_dir={tmp_path}",
            ],
        )
        assert cfg.optim.fused == value


def test_resume_keeps_this_runs_kernel():
    """A checkpoint of a foreach run loaded into this run's fused optimizer: load_state_dict
    brings the saved groups' `foreach`/`fused` flags; apply_optim_settings (run on every
    resume) puts this run's back."""
    old_model, new_model = tiny_llama(seed=0), tiny_llama(seed=0)
    old = build_optimizer(old_model, OptimConfig(fused="off"))
    _train(old_model, old, 1)
    new = build_optimizer(new_model, OptimConfig(fused="on"))
    new.load_state_dict(old.state_dict())
    assert not new.param_groups[0]["fused"]  # what apply_optim_settings is there to undo
    scheduler = build_scheduler(new, ScheduleConfig(), total_steps=10, warmup_steps=0)
    apply_optim_settings(new, scheduler, OptimConfig(fused="on"))
    assert all(g["fused"] and not g["foreach"] for g in new.param_groups)


# ---------------------------------------------------------------------------------------------
# 2. DDP: gradients are views into the all-reduce buckets; 2 ranks still equal 1 rank.


class _GradProbe:
    """Wraps an engine; at each clip (after the step's all-reduce) records whether DDP was
    built with gradient_as_bucket_view and how many storages the gradients live in."""

    def __init__(self, inner):
        self.inner = inner
        self.seen: list[dict] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def clip_grad_norm(self, max_norm):
        grads = [p.grad for p in self.inner.trainable if p.grad is not None]
        self.seen.append(
            {
                "as_bucket_view": getattr(self.inner.model, "gradient_as_bucket_view", None),
                "num_grads": len(grads),
                "num_storages": len({g.untyped_storage().data_ptr() for g in grads}),
            }
        )
        return self.inner.clip_grad_norm(max_norm)


def _probed_run(argv: list[str]) -> list[dict]:
    import launch.train as lt

    probes = []
    build = lt.build_engine

    def probed(cfg, derived, ctx):
        probes.append(_GradProbe(build(cfg, derived, ctx)))
        return probes[-1]

    lt.build_engine = probed
    try:
        lt.run(argv)
    finally:
        lt.build_engine = build
    return probes[0].seen


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_ddp_grads_are_bucket_views_and_two_ranks_equal_one(tiny_assets, tmp_path, ranks):
    """2 ranks x accumulation 2 vs 1 rank x accumulation 4 (same global batch and data): the
    gradients of the 2-rank run live in DDP's buckets (a handful of storages for all of them),
    and its losses and final weights still equal the 1-rank run's."""
    two, one = tmp_path / "two", tmp_path / "one"
    common = ["train.max_steps=3", "train.micro_batch_size=4", "optim.weight_decay=0.1"]
    seen_two = ranks(
        _probed_run, 2, tiny_config_args(tiny_assets, two, *common, "train.grad_accum_steps=2")
    )
    ranks(_probed_run, 1, tiny_config_args(tiny_assets, one, *common, "train.grad_accum_steps=4"))
    for seen in seen_two:
        assert len(seen) == 3
        for step in seen:
            assert step["as_bucket_view"] is True
            assert step["num_storages"] < step["num_grads"] / 4, step  # views, not own tensors
    losses_two, losses_one = read_losses(two), read_losses(one)
    assert len(losses_two) == len(losses_one) == 3
    for a, b in zip(losses_two, losses_one, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (losses_two, losses_one)
    w_two, w_one = read_weights(two), read_weights(one)
    assert w_two.keys() == w_one.keys()
    for name in w_one:
        assert rel_err(w_two[name], w_one[name]) <= 1e-5, name


# ---------------------------------------------------------------------------------------------
# 3. train.grad_reduce_dtype=bf16


def _reduce_steps(argvs: dict[str, list[str]]) -> dict[str, dict]:
    """On each rank, per argv: an engine, then 2 steps on this rank's own fixed batch; the comm
    hooks, the all-reduced gradients of the first step (before clipping) and the weights."""
    from trainer.dist import init_distributed, shutdown

    ctx = init_distributed()
    try:
        out = {}
        for key, argv in argvs.items():
            cfg, engine = _build(argv, ctx, ctx.world_size)
            model = engine.unwrapped_model()
            grads = None
            for _ in range(2):
                engine.forward_backward(_fixed_batch(ctx.rank), torch.tensor(0.05), True)
                if grads is None:
                    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
                engine.clip_grad_norm(cfg.train.max_grad_norm)
                engine.optimizer_step(skip=False)
            out[key] = {
                "hooks": [hook.__name__ for hook, _ in engine.model._comm_hooks],
                "grads": grads,
                "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            }
        return out
    finally:
        shutdown(ctx)


@pytest.mark.timeout(300)
def test_bf16_grad_reduce_registers_the_hook_and_trains_close_to_fp32(tiny_assets, tmp_path, ranks):
    """Gloo all-reduces bf16 on the CPU, so torch's hook runs as on GPUs (through a wrapper
    DDP does not refuse for want of NCCL: trainer/engine/precision.py). Every averaged gradient is then
    a bf16 value (the proof that the reduce ran in bf16), the ranks still agree exactly, and the
    weights after 2 steps are within 1e-2 of the fp32-reduced run's but not equal to them."""
    argvs = {
        dtype: tiny_config_args(tiny_assets, tmp_path / dtype, f"train.grad_reduce_dtype={dtype}")
        for dtype in ("fp32", "bf16")
    }
    results = ranks(_reduce_steps, 2, argvs)
    for r in results:
        assert r["fp32"]["hooks"] == [] and r["bf16"]["hooks"] == ["bf16_all_reduce_hook"]
        bf16_grads = torch.cat([g.flatten() for g in r["bf16"]["grads"].values()])
        fp32_grads = torch.cat([g.flatten() for g in r["fp32"]["grads"].values()])
        assert torch.equal(bf16_grads, bf16_grads.bfloat16().float())
        assert not torch.equal(fp32_grads, fp32_grads.bfloat16().float())
        assert rel_err(bf16_grads, fp32_grads) <= 1e-2
    for name in results[0]["bf16"]["weights"]:
        assert torch.equal(results[0]["bf16"]["weights"][name], results[1]["bf16"]["weights"][name])
    bf16, fp32 = results[0]["bf16"]["weights"], results[0]["fp32"]["weights"]
    assert any(not torch.equal(bf16[n], fp32[n]) for n in fp32)
    worst = max(rel_err(bf16[name], fp32[name]) for name in fp32)
    print(f"worst relative weight difference, bf16 vs fp32 reduce: {worst:.3g}")  # -s / -rP
    assert worst <= 1e-2


def test_deepspeed_refuses_bf16_reduce_and_compile_naming_the_keys(tiny_assets, tmp_path):
    for extra, key in (
        ("train.grad_reduce_dtype=bf16", "train.grad_reduce_dtype"),
        ("train.compile=true", "train.compile"),
    ):
        argv = tiny_config_args(tiny_assets, tmp_path, extra, *ds_args("zero2.json"))
        with pytest.raises(ConfigError) as err:
            load_config(argv[0], argv[1:])
        assert str(err.value).count("\n") == 0 and key in str(err.value), str(err.value)


# ---------------------------------------------------------------------------------------------
# 4. train.compile


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_compiled_blocks_train_like_eager(tiny_assets, tmp_path, caplog):
    """Inductor on the CPU (it compiles C++ with the system compiler): 2 steps of the engine
    with train.compile=true give the eager losses to 1e-5; the blocks were really compiled and
    the state-dict names (checkpoints, export) are the eager model's."""
    from torch._dynamo.utils import counters

    runs = {}
    try:
        for compiled in (False, True):
            argv = tiny_config_args(
                tiny_assets, tmp_path / str(compiled), f"train.compile={compiled}"
            )
            with caplog.at_level(logging.INFO, logger="fttrain"):
                cfg, engine = _build(argv, CPU1)
            frames_before = counters["stats"]["unique_graphs"]
            losses = []
            for step in range(2):
                batch = _fixed_batch(step)  # the same shapes: one compile, no recompile
                losses.append(float(engine.forward_backward(batch, torch.tensor(0.05), True)))
                engine.clip_grad_norm(cfg.train.max_grad_norm)
                engine.optimizer_step(skip=False)
            model = engine.unwrapped_model()
            blocks = model.model.layers
            runs[compiled] = {
                "losses": losses,
                "graphs": counters["stats"]["unique_graphs"] - frames_before,
                "compiled_blocks": sum(b._compiled_call_impl is not None for b in blocks),
                "names": list(model.state_dict()),
            }
    finally:
        torch._dynamo.reset()
    assert runs[False]["graphs"] == 0 and runs[False]["compiled_blocks"] == 0
    assert runs[True]["graphs"] > 0 and runs[True]["compiled_blocks"] == 2
    assert "torch.compile: 2 blocks" in caplog.text
    assert runs[True]["names"] == runs[False]["names"]
    for a, b in zip(runs[True]["losses"], runs[False]["losses"], strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), runs


def test_compile_of_a_model_without_blocks_is_one_line_naming_the_key():
    from trainer.model.compile import compile_blocks
    from trainer.model.methods import MethodError

    with pytest.raises(MethodError, match=r"^train.compile: no stack of transformer blocks"):
        compile_blocks(nn.Sequential(nn.Linear(2, 2)))


# ---------------------------------------------------------------------------------------------
# 5. DeepSpeed's CPU Adam under optimizer offload


def test_offload_builds_cpu_adam_that_steps_like_torch_adamw():
    """Same groups and settings as build_optimizer; 3 steps make torch AdamW's update, to 1e-4
    of its size (its vectorized C++ step rounds differently: ~2e-6 apart at lr 1e-2). Builds
    the op on first use (about a minute, once)."""
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    from trainer.engine.deepspeed_engine import build_client_optimizer

    cfg = OptimConfig(lr=1e-2, weight_decay=0.1, betas=(0.8, 0.9), eps=1e-6)
    ds_model, torch_model = tiny_llama(seed=0), tiny_llama(seed=0)
    cpu_adam = build_client_optimizer(ds_model, cfg, OFFLOAD, CPU1)
    adamw = build_optimizer(torch_model, cfg)
    assert type(cpu_adam) is DeepSpeedCPUAdam and cpu_adam.adam_w_mode
    for got, want in zip(cpu_adam.param_groups, adamw.param_groups, strict=True):
        for key in ("lr", "betas", "eps", "weight_decay"):
            assert got[key] == want[key], key
        assert [id(p) for p in got["params"]] != []
        assert len(got["params"]) == len(want["params"])
    _train(ds_model, cpu_adam, 3)
    _train(torch_model, adamw, 3)
    assert _update_err(ds_model, torch_model, start=tiny_llama(seed=0)) <= 1e-4


def test_cpu_adam_resumes_from_a_torch_adamw_checkpoint():
    """Offload checkpoints written before CPU Adam (torch AdamW: step counts as float tensors)
    load into it and continue as AdamW would have."""
    from trainer.engine.deepspeed_engine import build_client_optimizer

    cfg = OptimConfig(lr=1e-2, weight_decay=0.1)
    old_model = tiny_llama(seed=0)
    old = build_optimizer(old_model, cfg)
    _train(old_model, old, 1)
    new_model = tiny_llama(seed=0)
    new_model.load_state_dict(old_model.state_dict())
    cpu_adam = build_client_optimizer(new_model, cfg, OFFLOAD, CPU1)
    # A copy, as read from a checkpoint: load_state_dict keeps the given tensors, which `old`
    # goes on updating. Its groups lack bias_correction; its steps are float tensors.
    cpu_adam.load_state_dict(copy.deepcopy(old.state_dict()))
    start = tiny_llama(seed=0)
    start.load_state_dict(old_model.state_dict())
    _train(new_model, cpu_adam, 2)
    _train(old_model, old, 2)
    assert _update_err(new_model, old_model, start) <= 1e-4
    assert all(s["step"] == 3 and type(s["step"]) is int for s in cpu_adam.state.values())


def test_offload_falls_back_to_torch_adamw_when_the_op_cannot_build(monkeypatch, caplog):
    from trainer.engine import deepspeed_engine

    def no_compiler():
        raise RuntimeError("Error building extension 'cpu_adam':\nc++: not found")

    monkeypatch.setattr(deepspeed_engine, "load_cpu_adam_op", no_compiler)
    with caplog.at_level(logging.INFO, logger="fttrain"):
        optimizer = deepspeed_engine.build_client_optimizer(
            tiny_llama(), OptimConfig(fused="auto"), OFFLOAD, CPU1
        )
    # torch's fused CPU kernel (optim.fused=auto): it steps the CPU partitions, about as fast
    assert type(optimizer) is torch.optim.AdamW and is_fused(optimizer)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        "optimizer offload: torch's AdamW instead of DeepSpeed's CPU Adam (Error building "
        "extension 'cpu_adam': c++: not found)"
    ]

    # Without offload the op is not even looked at.
    monkeypatch.setattr(deepspeed_engine, "load_cpu_adam_op", pytest.fail)
    no_offload = {"zero_optimization": {"stage": 2}}
    optimizer = deepspeed_engine.build_client_optimizer(
        tiny_llama(), OptimConfig(), no_offload, CPU1
    )
    assert type(optimizer) is torch.optim.AdamW


def _offload_steps(argv: list[str]) -> dict[str, dict]:
    """On each rank: a ZeRO-2 offload engine with CPU Adam, then one whose op 'failed to build'
    (torch AdamW); 3 steps each on this rank's fixed batches."""
    from trainer.dist import init_distributed, shutdown
    from trainer.engine import deepspeed_engine

    ctx = init_distributed()
    load = deepspeed_engine.load_cpu_adam_op
    try:
        out = {}
        for kind in ("cpu_adam", "fallback"):
            if kind == "fallback":

                def failing():
                    raise RuntimeError("no compiler")

                deepspeed_engine.load_cpu_adam_op = failing
            cfg, engine = _build(argv, ctx, ctx.world_size)
            losses = []
            for _ in range(3):
                batch = _fixed_batch(ctx.rank)  # one batch again and again: the loss must fall
                losses.append(float(engine.forward_backward(batch, torch.tensor(0.05), True)))
                engine.clip_grad_norm(cfg.train.max_grad_norm)
                engine.optimizer_step(skip=False)
            out[kind] = {"optimizer": type(engine.client_optimizer).__name__, "losses": losses}
        return out
    finally:
        deepspeed_engine.load_cpu_adam_op = load
        shutdown(ctx)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_zero2_offload_trains_with_cpu_adam_like_torch_adamw(tiny_assets, tmp_path, ranks):
    """configs/deepspeed/zero2_offload.json on 2 ranks: the client optimizer is CPU Adam and the
    losses of 3 steps match the same run on torch's AdamW (the fallback) to 1e-5, and fall."""
    argv = tiny_config_args(tiny_assets, tmp_path, "optim.lr=1e-2", *ds_args("zero2_offload.json"))
    for r in ranks(_offload_steps, 2, argv, timeout=350):
        assert r["cpu_adam"]["optimizer"] == "DeepSpeedCPUAdam"
        assert r["fallback"]["optimizer"] == "AdamW"
        got, want = r["cpu_adam"]["losses"], r["fallback"]["losses"]
        for a, b in zip(got, want, strict=True):
            assert abs(a - b) <= 1e-5 * abs(b), (got, want)
        assert got[2] < got[1] < got[0], got
