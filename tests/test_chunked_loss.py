"""The chunked causal-LM loss (trainer/model/loss.py, train.loss_impl): the same loss and the
same gradients as the naive path (logits -> fp32 -> cross_entropy), alone, through the real
engines (world size 1, DDP on 2 ranks, ZeRO-3 on 2 ranks), with tied and untied heads and with
LoRA; and the choice of path: fallbacks for heads it cannot reproduce, clear errors for liger /
cce where they cannot run."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from data.templates import IGNORE_INDEX
from tests.conftest import tiny_config_args
from trainer.config import ConfigError
from trainer.model.loss import build_train_loss, chunked_token_loss_sum, token_loss_sum

CPU = torch.device("cpu")


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    want = want.double()
    return float((got.double() - want).norm() / want.norm().clamp(min=1e-30))


# ---------------------------------------------------------------------------------------------
# (a) The autograd Function against the naive path.


def _inputs(batch: int, seq: int, hidden: int, vocab: int, seed: int = 0, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(batch, seq, hidden, generator=g, requires_grad=True)
    w = (torch.randn(vocab, hidden, generator=g) * 0.3).requires_grad_()
    b = (torch.randn(vocab, generator=g) * 0.3).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, (batch, seq), generator=g)
    return h, w, b, labels


def _loss_and_grads(loss_fn, h, w, b):
    for t in (h, w, b):
        if t is not None:
            t.grad = None
    loss = loss_fn()
    (loss * 0.37).backward()  # a non-unit incoming gradient, as the loop's loss scale gives
    return loss.detach(), [
        None if t is None or t.grad is None else t.grad.clone() for t in (h, w, b)
    ]


def _assert_matches_naive(h, w, b, labels, chunk_tokens: int) -> None:
    want = _loss_and_grads(lambda: token_loss_sum(F.linear(h, w, b), labels), h, w, b)
    got = _loss_and_grads(
        lambda: chunked_token_loss_sum(h, w, labels, b, chunk_tokens=chunk_tokens), h, w, b
    )
    assert got[0].dtype == torch.float32
    assert rel_err(got[0], want[0]) <= 1e-5, (got[0], want[0])
    for name, g, r in zip(("hidden", "weight", "bias"), got[1], want[1], strict=True):
        assert (g is None) == (r is None), name
        if r is not None:
            assert rel_err(g, r) <= 1e-5, (name, rel_err(g, r))


@pytest.mark.parametrize("chunk_tokens", [2, 7, 64, 100_000])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_function_matches_naive_loss_and_grads(chunk_tokens, bias):
    """Ignored prompt spans, a fully ignored row, padding at the end; chunk sizes that do not
    divide the 3 x 41 - ignored target count (and one larger than it)."""
    h, w, b, labels = _inputs(3, 41, 32, 500, bias=bias)
    labels[0, :9] = IGNORE_INDEX  # a prompt
    labels[1, :] = IGNORE_INDEX  # a row with nothing to learn
    labels[2, 30:] = IGNORE_INDEX  # padding
    _assert_matches_naive(h, w, b, labels, chunk_tokens)


def test_a_micro_batch_with_only_ignored_labels_gives_zero_loss_and_zero_grads():
    h, w, b, labels = _inputs(2, 9, 32, 300)
    labels[:] = IGNORE_INDEX
    loss, (gh, gw, gb) = _loss_and_grads(
        lambda: chunked_token_loss_sum(h, w, labels, b, chunk_tokens=4), h, w, b
    )
    assert loss.item() == 0.0
    # Zeros, not None: DDP's reducer and ZeRO still get a gradient for the head this step.
    assert gw is not None and not gw.any() and not gh.any() and not gb.any()
    _assert_matches_naive(h, w, b, labels, 4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_weights_match_naive_and_take_an_empty_micro_batch(dtype):
    """bf16-pure (weights and hidden states in bf16, no autocast: gradients taken in the
    forward, scaled in fp32 in backward) and fp16 (gradients from recomputed logits in backward,
    the incoming gradient applied before the fp16 cast). Also a micro-batch whose every label
    is ignored: zero gradients, no error."""
    h, w, b, labels = _inputs(2, 37, 32, 300)
    h, w, b = (t.detach().to(dtype).requires_grad_() for t in (h, w, b))
    labels[0, :7] = IGNORE_INDEX
    want = _loss_and_grads(lambda: token_loss_sum(F.linear(h, w, b), labels), h, w, b)
    got = _loss_and_grads(lambda: chunked_token_loss_sum(h, w, labels, b, chunk_tokens=16), h, w, b)
    assert rel_err(got[0], want[0]) <= 1e-3
    for name, g, r in zip(("hidden", "weight", "bias"), got[1], want[1], strict=True):
        assert g.dtype == dtype, name
        assert rel_err(g.float(), r.float()) <= 2e-2, (name, rel_err(g.float(), r.float()))
    labels[:] = IGNORE_INDEX
    loss, grads = _loss_and_grads(
        lambda: chunked_token_loss_sum(h, w, labels, b, chunk_tokens=16), h, w, b
    )
    assert loss.item() == 0.0 and not any(g.any() for g in grads)


def test_low_precision_gradients_are_scaled_in_fp32_a_block_of_rows_at_a_time():
    """A bf16 [V, H] gradient times an fp32 scale, as backward gives it: each element is the
    fp32 product rounded once, across several blocks of rows (the scale not rounded to bf16)."""
    from trainer.model.loss import _scale_

    g = torch.Generator().manual_seed(5)
    grad = torch.randn(10_000, 8, generator=g).to(torch.bfloat16)
    scale = torch.tensor(1 / 1751)  # not a bf16 number
    want = (grad.float() * scale).to(torch.bfloat16)
    assert not torch.equal(want, grad * scale.to(torch.bfloat16))  # what it must not do
    _scale_(grad, scale, rows=4096)
    assert torch.equal(grad, want)


def test_frozen_head_gets_no_gradient_and_hidden_grads_still_match():
    """LoRA/QLoRA: the head is frozen; its gradient is never computed."""
    h, w, b, labels = _inputs(2, 23, 32, 400)
    w.requires_grad_(False)
    b.requires_grad_(False)
    labels[0, :5] = IGNORE_INDEX
    _assert_matches_naive(h, w, b, labels, 5)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(3)
    h = torch.randn(2, 5, 4, dtype=torch.float64, generator=g, requires_grad=True)
    w = torch.randn(7, 4, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, 1:3] = IGNORE_INDEX

    def fn(h, w, b):
        return chunked_token_loss_sum(h, w, labels, b, chunk_tokens=3)

    assert fn(h, w, b).dtype == torch.float64
    # gradcheck's own check backpropagates one graph twice, which this loss refuses (below):
    # the same test by hand, the gradient along random directions against central differences.
    loss = fn(h, w, b)
    grads = torch.autograd.grad(loss, (h, w, b))
    for _ in range(4):
        dirs = [torch.randn(x.shape, dtype=x.dtype, generator=g) for x in (h, w, b)]
        eps = 1e-6
        with torch.no_grad():
            plus = fn(*(x + eps * d for x, d in zip((h, w, b), dirs, strict=True)))
            minus = fn(*(x - eps * d for x, d in zip((h, w, b), dirs, strict=True)))
        numerical = (plus - minus) / (2 * eps)
        analytical = sum((gr * d).sum() for gr, d in zip(grads, dirs, strict=True))
        assert torch.isclose(analytical, numerical, rtol=1e-7, atol=1e-9), (analytical, numerical)


def test_a_second_backward_of_one_forward_is_refused_in_one_line():
    """The gradients are taken in the forward and handed to the first backward in place; a
    second backward (retain_graph) would get them scaled twice, so it is an error instead."""
    h, w, b, labels = _inputs(1, 9, 8, 11)
    loss = chunked_token_loss_sum(h, w, labels, b, chunk_tokens=4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice.*train.loss_impl=naive"):
        loss.backward()


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ),
    ],
)
def test_bf16_autocast_matches_naive_under_autocast(device):
    """DDP's bf16 path: fp32 master weights, matmuls in bf16 under autocast. The chunked logits
    are computed in bf16 as autocast's Linear would, upcast for the cross-entropy; the weight's
    gradient comes back in fp32. On CUDA as well (benchmarks/gpu_checks.sh runs it)."""
    h, w, b, labels = (t.detach().to(device) for t in _inputs(2, 33, 32, 500))
    h, w, b = (t.requires_grad_() for t in (h, w, b))
    labels[0, :6] = IGNORE_INDEX

    def under_autocast(fn):
        def run():
            with torch.autocast(device, dtype=torch.bfloat16):
                return fn()

        return run

    want = _loss_and_grads(
        under_autocast(lambda: token_loss_sum(F.linear(h, w, b), labels)), h, w, b
    )
    got = _loss_and_grads(
        under_autocast(lambda: chunked_token_loss_sum(h, w, labels, b, chunk_tokens=8)), h, w, b
    )
    assert got[1][1].dtype == torch.float32
    assert rel_err(got[0], want[0]) <= 1e-3
    for g, r in zip(got[1], want[1], strict=True):
        assert rel_err(g, r) <= 2e-2  # bf16 matmuls, summed in another order


# ---------------------------------------------------------------------------------------------
# (b) Through the real engine at world size 1: naive vs chunked, untied and tied heads.


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory) -> Path:
    from launch.make_demo import build_tiny_model_dir

    out = tmp_path_factory.mktemp("tied") / "model"
    return build_tiny_model_dir(out, seed=0, hidden=32, layers=2, heads=2, tie_word_embeddings=True)


def _fixed_batch(rank: int = 0) -> dict[str, torch.Tensor]:
    """Two rows of different lengths with an ignored prompt each (rank-specific content)."""
    from data.loader import collate_right_pad
    from data.templates import TokenizedSample

    g = torch.Generator().manual_seed(100 + rank)
    rows = []
    for length, prompt in ((23, 6), (15, 4)):
        ids = torch.randint(3, 50, (length,), generator=g).tolist()
        rows.append(TokenizedSample(ids, [IGNORE_INDEX] * prompt + ids[prompt:]))
    return collate_right_pad(list(enumerate(rows)), pad_id=0)


def _trainable(model, of=lambda p: p.detach()) -> dict[str, torch.Tensor]:
    return {n: of(p).clone() for n, p in model.named_parameters() if p.requires_grad}


def _one_step(engine, cfg, batch, zero3: bool = False) -> dict:
    """One forward/backward and optimizer step; the loss, the gradients and the new weights
    (under ZeRO-3 gathered, the weights on rank 0 only)."""
    model = engine.unwrapped_model()
    loss = engine.forward_backward(batch, torch.tensor(0.05), is_last_micro_step=True)
    if zero3:
        from deepspeed.utils import safe_get_full_grad

        grads = _trainable(model, safe_get_full_grad)  # collective, same order on every rank
    else:
        grads = _trainable(model, lambda p: p.grad)
    engine.clip_grad_norm(cfg.train.max_grad_norm)
    engine.optimizer_step(skip=False)
    weights = (engine._trainable_fp32() or {}) if zero3 else _trainable(model)
    return {"impl": engine.loss.impl, "loss": loss, "grads": grads, "weights": weights}


def _build(argv: list[str], ctx, world_size: int = 1):
    from trainer.build import build_engine, seed_everything
    from trainer.config import load_config, resolve_batch, with_total_steps

    cfg = load_config(argv[0], argv[1:])
    derived = with_total_steps(cfg, resolve_batch(cfg, world_size), None)
    seed_everything(cfg.seed)
    return cfg, build_engine(cfg, derived, ctx)


# A large AdamW epsilon makes the first update ~ lr * gradient (not lr * its sign), so the
# updated weights compare the gradients too; no weight decay, no clipping to blur them.
STEP = ["optim.eps=1.0", "optim.lr=0.1", "optim.weight_decay=0", "train.max_grad_norm=null"]


def _assert_same_step(got: dict, want: dict, tol: float = 1e-5) -> None:
    assert got["impl"] == "chunked" and want["impl"] == "naive"
    assert rel_err(got["loss"], want["loss"]) <= tol, (got["loss"], want["loss"])
    assert got["grads"].keys() == want["grads"].keys()
    assert got["weights"].keys() == want["weights"].keys()
    for name in want["grads"]:
        assert rel_err(got["grads"][name], want["grads"][name]) <= tol, name
    for name in want["weights"]:
        assert rel_err(got["weights"][name], want["weights"][name]) <= tol, name


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_engine_step_chunked_equals_naive(tied, tiny_assets, tied_model, tmp_path, caplog):
    from tests.tiny_models import CPU1

    model_dir = tied_model if tied else tiny_assets / "model"
    steps = {}
    for impl in ("naive", "auto"):
        argv = tiny_config_args(
            tiny_assets,
            tmp_path / impl,
            f"model.name_or_path={model_dir}",
            f"train.loss_impl={impl}",
            "train.loss_chunk_tokens=5",
            *STEP,
        )
        with caplog.at_level(logging.INFO, logger="fttrain"):
            cfg, engine = _build(argv, CPU1)
        model = engine.unwrapped_model()
        assert (model.lm_head.weight is model.model.embed_tokens.weight) == tied
        steps[impl] = _one_step(engine, cfg, _fixed_batch())
    assert "loss: chunked cross-entropy, 5 tokens per chunk" in caplog.text
    assert "loss: naive" in caplog.text
    _assert_same_step(steps["auto"], steps["naive"])
    if tied:
        # One weight, one gradient: the embedding's and the head's contributions summed (the
        # naive path's autograd sums both; the chunked one matched it above).
        assert "lm_head.weight" not in steps["auto"]["grads"]


def test_engine_forward_still_returns_logits(tiny_assets, tmp_path):
    """Evaluation and generation use engine.forward: full logits, whatever train.loss_impl."""
    from tests.tiny_models import CPU1

    argv = tiny_config_args(tiny_assets, tmp_path, "train.loss_impl=chunked")
    _, engine = _build(argv, CPU1)
    batch = _fixed_batch()
    with torch.no_grad():
        logits = engine.forward(batch)
    vocab = engine.unwrapped_model().config.vocab_size
    assert logits.shape == (*batch["input_ids"].shape, vocab)
    assert "forward" not in engine.unwrapped_model().lm_head.__dict__  # the swap was undone


# ---------------------------------------------------------------------------------------------
# (c) DDP on 2 ranks and ZeRO-3 on 2 ranks.


def _rank_steps(argvs: dict[str, list[str]], zero3: bool) -> dict[str, dict]:
    """On each rank: one step of each engine (built one after the other, same seed)."""
    from trainer.dist import init_distributed, shutdown

    ctx = init_distributed()
    try:
        out = {}
        for key, argv in argvs.items():
            cfg, engine = _build(argv, ctx, ctx.world_size)
            out[key] = _one_step(engine, cfg, _fixed_batch(ctx.rank), zero3)
            if zero3:  # what the test is about: outside a forward the head is partitioned
                assert engine.unwrapped_model().get_output_embeddings().weight.numel() == 0
        return out
    finally:
        shutdown(ctx)


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_two_ranks_chunked_equals_naive(backend, tiny_assets, tied_model, tmp_path, ranks):
    """DDP: the head's gradient reaches the reducer in the same backward. ZeRO-3 (every
    parameter partitioned, configs/deepspeed/zero3.json): the head's hooks gather its weight for
    the chunked forward and again for its backward, and its gradient is reduce-scattered."""
    from tests.test_deepspeed import ds_args

    extra = ds_args("zero3.json") if backend == "zero3" else []
    argvs = {
        f"{head}-{impl}": tiny_config_args(
            tiny_assets,
            tmp_path / f"{head}-{impl}",
            f"model.name_or_path={tied_model if head == 'tied' else tiny_assets / 'model'}",
            f"train.loss_impl={impl}",
            "train.loss_chunk_tokens=5",
            *STEP,
            *extra,
        )
        for head in ("untied", "tied")
        for impl in ("naive", "chunked")
    }
    results = ranks(_rank_steps, 2, argvs, backend == "zero3", timeout=500)
    for head in ("untied", "tied"):
        for rank_result in results:
            _assert_same_step(rank_result[f"{head}-chunked"], rank_result[f"{head}-naive"])
        one, two = (r[f"{head}-chunked"] for r in results)
        # The ranks saw different batches, and their gradients were averaged all the same.
        assert rel_err(one["loss"], two["loss"]) > 1e-3
        for name, g in one["grads"].items():
            assert torch.equal(g, two["grads"][name]), name
        assert ("lm_head.weight" in one["grads"]) == (head == "untied")


# ---------------------------------------------------------------------------------------------
# (d) LoRA: the frozen head is still a plain Linear, so the chunked loss applies.


def test_lora_trains_with_chunked_loss(tiny_assets, tmp_path):
    from tests.tiny_models import CPU1

    steps = {}
    for impl in ("naive", "chunked"):
        argv = tiny_config_args(
            tiny_assets,
            tmp_path / impl,
            "method=lora",
            "lora.dropout=0",
            f"train.loss_impl={impl}",
            "train.loss_chunk_tokens=7",
            *STEP,
        )
        cfg, engine = _build(argv, CPU1)
        assert engine.loss.impl == impl
        steps[impl] = _one_step(engine, cfg, _fixed_batch())
    losses = [steps["chunked"]["loss"]]
    for _ in range(4):
        losses.append(_one_step(engine, cfg, _fixed_batch())["loss"])
    assert losses[-1] < losses[0] - 0.1, losses  # the adapters learn
    assert all("lora_" in n for n in steps["chunked"]["grads"])
    _assert_same_step(steps["chunked"], steps["naive"])


def test_lora_on_the_head_falls_back_to_naive(tiny_assets, tmp_path):
    """An adapter on lm_head (or the head in modules_to_save) wraps it: not a plain Linear."""
    from tests.tiny_models import CPU1

    for extra in ("lora.target_modules=[q_proj,lm_head]", "lora.modules_to_save=[lm_head]"):
        argv = tiny_config_args(tiny_assets, tmp_path, "method=lora", extra)
        _, engine = _build(argv, CPU1)
        assert engine.loss.impl == "naive"
        assert "not a plain torch Linear" in engine.loss.reason


# ---------------------------------------------------------------------------------------------
# (e) The choice of path: what falls back, what is refused.


def test_heads_that_change_the_logits_fall_back_or_are_refused():
    from transformers import CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM

    from tests.tiny_models import tiny_llama

    small = dict(
        vocab_size=300,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        head_dim=8,
    )
    llama = tiny_llama(vocab=300)
    assert build_train_loss(llama, "auto", 64, CPU).impl == "chunked"
    assert build_train_loss(llama, "naive", 64, CPU).impl == "naive"

    gemma2 = Gemma2ForCausalLM(Gemma2Config(**small, final_logit_softcapping=30.0))
    loss = build_train_loss(gemma2, "auto", 64, CPU)
    assert loss.impl == "naive" and "final_logit_softcapping=30.0" in loss.reason
    with pytest.raises(ConfigError, match=r"train.loss_impl=chunked: the model softcaps"):
        build_train_loss(gemma2, "chunked", 64, CPU)

    # Cohere multiplies the logits by config.logit_scale: nothing in a list of known config
    # keys says so; the probe forward sees the logits differ from the head's output.
    cohere = CohereForCausalLM(CohereConfig(**small, logit_scale=0.0625))
    loss = build_train_loss(cohere, "auto", 64, CPU)
    assert loss.impl == "naive" and "changes the logits after its output head" in loss.reason
    assert "forward" not in cohere.lm_head.__dict__


def test_probe_keeps_the_training_mode_and_draws_no_random_numbers():
    from tests.tiny_models import tiny_llama

    model = tiny_llama(vocab=300, attention_dropout=0.5).train()
    state = torch.get_rng_state()
    build_train_loss(model, "auto", 64, CPU)
    assert model.training and torch.equal(state, torch.get_rng_state())


@pytest.mark.parametrize("impl, package", [("liger", "liger-kernel"), ("cce", "cut-cross-entropy")])
def test_fused_kernels_give_one_clear_error_where_they_cannot_run(
    impl, package, tiny_assets, tmp_path
):
    import importlib.util

    from tests.tiny_models import CPU1

    argv = tiny_config_args(tiny_assets, tmp_path, f"train.loss_impl={impl}")
    with pytest.raises(ConfigError) as err:
        _build(argv, CPU1)
    message = str(err.value)
    assert message.count("\n") == 0 and f"train.loss_impl={impl}" in message
    if importlib.util.find_spec(package.replace("-", "_")):
        assert "CUDA" in message  # installed, but this machine has no GPU
    else:
        assert f"pip install {package}" in message


@pytest.mark.parametrize("loss_impl", ["auto", "naive"])
def test_an_moe_models_router_loss_is_added_as_hf_adds_it(loss_impl):
    """Mixtral with output_router_logits: one micro-batch through the engine gives HF's own
    `loss + router_aux_loss_coef * aux_loss` and its gradients (padded rows: the router loss
    leaves the pads out through the 2D mask, as in HF)."""
    from data.packing import pad_right
    from tests.test_attention_inputs import samples
    from tests.tiny_models import CPU1, tiny_mixtral
    from trainer.config import OptimConfig, ScheduleConfig
    from trainer.engine.ddp import DDPEngine
    from trainer.model.loss import count_target_tokens
    from trainer.optim import build_optimizer, build_scheduler

    def mixtral():
        return tiny_mixtral(
            num_hidden_layers=2,
            num_local_experts=4,
            num_experts_per_tok=2,
            output_router_logits=True,
            router_aux_loss_coef=0.5,  # large, so that a missing term shows
        )

    batch = pad_right(samples([9, 4, 7]), pad_id=0)
    hf = mixtral()
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    out = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=labels)
    out.loss.backward()
    assert float(out.aux_loss.detach()) > 0

    ours = mixtral()
    opt = build_optimizer(ours, OptimConfig())
    engine = DDPEngine(
        ours, opt, build_scheduler(opt, ScheduleConfig(), 4, 0), CPU1, "fp32", loss_impl=loss_impl
    )
    assert "router_aux_loss_coef=0.5" in engine.loss.describe()
    n = float(count_target_tokens(batch["targets"]))
    loss_sum = engine.forward_backward(batch, torch.tensor(1.0 / n), is_last_micro_step=True)
    torch.testing.assert_close(loss_sum / n, out.loss.detach(), rtol=1e-5, atol=0)
    for (name, a), b in zip(ours.named_parameters(), hf.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)
