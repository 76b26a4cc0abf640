"""LoRA and QLoRA (`method: lora | qlora`) on real peft adapters and real bitsandbytes
Linear4bit / Linear8bitLt layers, on CPU, through the same code a GPU run takes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.conftest import tiny_config_args
from tests.test_distributed_training import _train_rank, read_losses

CPU = torch.device("cpu")


def _cfg(assets: Path, run_dir: Path, *overrides: str):
    from trainer.config import load_config

    args = tiny_config_args(assets, run_dir, *overrides)
    return load_config(args[0], args[1:])


def _quantized_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every frozen weight's bytes, plus the 4-bit layers' quantization state."""
    out = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            out[name] = p.detach().clone()
        qs = getattr(p, "quant_state", None)
        if qs is not None:
            out[f"{name}.absmax"] = qs.absmax.clone()
            if qs.state2 is not None:
                out[f"{name}.absmax2"] = qs.state2.absmax.clone()
    return out


def _train_steps(model, batches, steps: int, lr: float = 1e-2) -> list[float]:
    from trainer.config import OptimConfig
    from trainer.model.loss import count_target_tokens, token_loss_sum
    from trainer.optim import build_optimizer

    opt = build_optimizer(model, OptimConfig(lr=lr, weight_decay=0.0))
    losses = []
    model.train()
    for step in range(steps):
        batch = batches[step % len(batches)]
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        loss = token_loss_sum(out.logits, batch["targets"]) / count_target_tokens(batch["targets"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    return losses


def _batches(cfg, n: int = 4) -> list[dict[str, torch.Tensor]]:
    from data.build import build_train_batches
    from trainer.model.load import build_tokenizer

    tok = build_tokenizer(cfg.model)
    it = iter(
        build_train_batches(
            cfg.data, tok, rank=0, world_size=1, micro_batch_size=8, grad_accum_steps=1, seed=0
        )
    )
    return [next(it)[0] for _ in range(n)]  # each step's first (only) micro-batch


@pytest.mark.parametrize(
    "method_args",
    [
        ["method=qlora", "quantization.bits=4", "quantization.quant_type=nf4"],
        ["method=qlora", "quantization.bits=4", "quantization.quant_type=fp4"],
        ["method=qlora", "quantization.bits=8"],
        ["method=lora"],
    ],
    ids=["qlora-nf4", "qlora-fp4", "lora-int8", "lora"],
)
def test_adapters_learn_and_the_frozen_base_stays_bitwise(tiny_assets, tmp_path, method_args):
    import bitsandbytes as bnb

    from trainer.model.methods import load_model

    cfg = _cfg(tiny_assets, tmp_path, *method_args, "lora.r=8", "lora.dropout=0")
    # The adapters' init draws from the global RNG: seeded, so that what ran before in the
    # session (it failed after tests/test_hot_path.py) cannot change how fast they learn.
    torch.manual_seed(0)
    model = load_model(cfg, CPU)
    kinds = {type(m) for m in model.modules()}
    if "quantization.bits=4" in method_args:
        assert bnb.nn.Linear4bit in kinds
    if "quantization.bits=8" in method_args:
        assert bnb.nn.Linear8bitLt in kinds
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen = _quantized_state(model)

    losses = _train_steps(model, _batches(cfg), steps=20, lr=3e-2)
    # A random tiny base with a frozen output head learns slowly through rank-8 adapters; a
    # steady fall is what shows the adapters get the gradients.
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.05, losses
    after = _quantized_state(model)
    assert frozen.keys() == after.keys()
    for name in frozen:
        assert torch.equal(frozen[name], after[name]), f"frozen {name} changed"
    moved = [n for n, p in model.named_parameters() if p.requires_grad and "lora_B" in n]
    assert moved and all(
        not torch.equal(trainable[n], dict(model.named_parameters())[n]) for n in moved
    )


def test_eval_passes_do_not_repack_4bit_weights_under_training(tiny_assets, tmp_path):
    """bitsandbytes repacks a CPU Linear4bit weight in place on its first no-grad forward
    (on CPUs with AVX512-BF16); the LoRA gradients after that would be wrong. The method
    layer turns that off: gradients after an eval pass equal those of a fresh model."""
    from trainer.model.loss import token_loss_sum
    from trainer.model.methods import load_model

    cfg = _cfg(tiny_assets, tmp_path, "method=qlora", "lora.dropout=0")
    batch = _batches(cfg, 1)[0]

    def grads(model) -> dict[str, torch.Tensor]:
        model.train()
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        token_loss_sum(out.logits, batch["targets"]).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}

    torch.manual_seed(0)
    fresh = grads(load_model(cfg, CPU))
    torch.manual_seed(0)
    model = load_model(cfg, CPU)
    model.eval()
    with torch.no_grad():
        model(input_ids=batch["input_ids"])
    after_eval = grads(model)
    assert fresh.keys() == after_eval.keys()
    for n in fresh:
        assert torch.equal(fresh[n], after_eval[n]), n


@pytest.mark.timeout(300)
def test_qlora_two_ranks_equal_one_rank_with_double_accumulation(tiny_assets, tmp_path, ranks):
    two, one = tmp_path / "two", tmp_path / "one"
    # No LoRA dropout: its random masks depend on how the samples split over ranks.
    common = ["method=qlora", "lora.dropout=0", "train.max_steps=6", "train.micro_batch_size=4"]
    ranks(_train_rank, 2, tiny_config_args(tiny_assets, two, *common, "train.grad_accum_steps=2"))
    ranks(_train_rank, 1, tiny_config_args(tiny_assets, one, *common, "train.grad_accum_steps=4"))
    losses_two, losses_one = read_losses(two), read_losses(one)
    assert len(losses_two) == len(losses_one) == 6
    for a, b in zip(losses_two, losses_one, strict=True):
        assert abs(a - b) <= 1e-5 * abs(b), (losses_two, losses_one)
    assert losses_one[-1] < losses_one[0]
    # The run's model is the adapter: peft loads it onto the base.
    adapter = json.loads((one / "model" / "adapter_config.json").read_text())
    assert adapter["peft_type"] == "LORA"


# ---------------------------------------------------------------------------------------------
# Architectures: target names across model families, all-linear never on the output head.

ARCHS = {
    # family: (config class name, config kwargs, explicit target names)
    "llama": ("LlamaConfig", {}, ["q_proj", "v_proj"]),
    "mistral": ("MistralConfig", {"sliding_window": None}, ["q_proj", "k_proj", "down_proj"]),
    "qwen2": ("Qwen2Config", {}, ["q_proj", "o_proj", "gate_proj"]),
    "gpt_neox": ("GPTNeoXConfig", {}, ["query_key_value", "dense_4h_to_h"]),
    "gpt2": ("GPT2Config", {}, ["c_attn", "c_fc"]),  # Conv1D layers (fan_in_fan_out)
}


@pytest.fixture(scope="module")
def arch_dirs(tiny_assets, tmp_path_factory) -> dict[str, Path]:
    """A random-init tiny model of each family, saved with the tiny assets' tokenizer."""
    import shutil

    import transformers

    from trainer.config import ModelConfig
    from trainer.model.load import build_tokenizer

    tok = build_tokenizer(ModelConfig(name_or_path=str(tiny_assets / "model")))
    root = tmp_path_factory.mktemp("archs")
    out = {}
    for family, (config_name, extra, _) in ARCHS.items():
        size = {"vocab_size": len(tok) + 4}
        if family == "gpt2":
            size.update(n_embd=32, n_layer=2, n_head=2, n_positions=128)
        else:
            size.update(
                hidden_size=32,
                intermediate_size=64,
                num_hidden_layers=2,
                num_attention_heads=2,
                max_position_embeddings=128,
            )
            if family != "gpt_neox":
                size["num_key_value_heads"] = 2
        config = getattr(transformers, config_name)(**size, **extra)
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        path = root / family
        model.save_pretrained(path)
        for f in (tiny_assets / "model").iterdir():
            if "token" in f.name or f.name == "special_tokens_map.json":
                shutil.copy(f, path / f.name)
        out[family] = path
    return out


@pytest.mark.parametrize("targets", ["all-linear", "explicit"])
@pytest.mark.parametrize("family", list(ARCHS))
def test_lora_trains_on_each_architecture(tiny_assets, arch_dirs, tmp_path, family, targets):
    from trainer.model.methods import load_model

    names = ARCHS[family][2]
    target_arg = (
        "lora.target_modules=all-linear"
        if targets == "all-linear"
        else ("lora.target_modules=[" + ",".join(names) + "]")
    )
    cfg = _cfg(
        tiny_assets,
        tmp_path,
        "method=lora",
        "lora.dropout=0",
        f"model.name_or_path={arch_dirs[family]}",
        target_arg,
    )
    model = load_model(cfg, CPU)
    adapted = {n.rsplit(".lora_A", 1)[0] for n, _ in model.named_parameters() if ".lora_A" in n}
    assert adapted
    assert not any("lm_head" in n or n.endswith("embed_out") for n in adapted)  # never the head
    if targets == "explicit":
        assert {n.rsplit(".", 1)[-1] for n in adapted} == set(names)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    losses = _train_steps(model, _batches(cfg, 2), steps=3)
    assert all(torch.isfinite(torch.tensor(losses)))
    after = dict(model.named_parameters())
    assert all(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)


# ---------------------------------------------------------------------------------------------
# Errors: one line, naming the key.


def test_target_names_that_match_nothing_list_the_linear_layers(tiny_assets, tmp_path):
    from trainer.model.methods import MethodError, load_model

    for targets in ("[nonexistent_proj]", "[q_proj,nonexistent_proj]"):
        cfg = _cfg(tiny_assets, tmp_path, "method=lora", f"lora.target_modules={targets}")
        with pytest.raises(MethodError) as e:
            load_model(cfg, CPU)
        msg = str(e.value)
        assert "lora.target_modules" in msg and "nonexistent_proj" in msg
        assert "q_proj" in msg.split("linear layers are:")[1]  # the names that do exist
        assert "lm_head" not in msg.split("linear layers are:")[1]
        assert "\n" not in msg


def test_options_of_another_method_are_config_errors(tiny_assets, tmp_path):
    from trainer.config import ConfigError

    cases = {
        ("lora.r=8",): "lora: LoRA options are set but method is full",
        ("method=lora", "quantization.bits=8"): "quantization: only used with method: qlora",
        ("method=qlora", "freeze.first_layers=1"): "freeze: only used with method: full",
        ("output.merge_adapter=true",): "output.merge_adapter: only used with method: lora",
    }
    for overrides, expected in cases.items():
        with pytest.raises(ConfigError) as e:
            _cfg(tiny_assets, tmp_path, *overrides)
        assert expected in str(e.value)


def test_qlora_without_a_working_bitsandbytes_is_one_clear_line(tiny_assets, tmp_path, monkeypatch):
    import builtins

    from trainer.model.methods import MethodError, load_model

    real_import = builtins.__import__

    def no_bnb(name, *args, **kwargs):
        if name == "bitsandbytes" or name.startswith("bitsandbytes."):
            raise ImportError("libbitsandbytes_cpu.so: cannot open shared object file")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_bnb)
    cfg = _cfg(tiny_assets, tmp_path, "method=qlora")
    with pytest.raises(MethodError) as e:
        load_model(cfg, CPU)
    assert "method=qlora needs a working bitsandbytes" in str(e.value)
    assert "libbitsandbytes_cpu.so" in str(e.value) and "\n" not in str(e.value)


def test_freeze_holds_back_embeddings_and_first_blocks(tiny_assets, tmp_path):
    from trainer.model.methods import load_model

    cfg = _cfg(tiny_assets, tmp_path, "freeze.embeddings=true", "freeze.first_layers=1")
    model = load_model(cfg, CPU)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert "model.embed_tokens.weight" in frozen
    assert any(n.startswith("model.layers.0.") for n in frozen)
    assert not any(n.startswith("model.layers.1.") for n in frozen)
    assert "lm_head.weight" not in frozen


# ---------------------------------------------------------------------------------------------
# Checkpoints: the adapters and their optimizer state only; SIGKILL + auto-resume is exact.


def _engine_bytes(run_dir: Path, step: int) -> int:
    engine = run_dir / "checkpoints" / f"step_{step:08d}" / "engine"
    return sum(f.stat().st_size for f in engine.rglob("*") if f.is_file())


@pytest.mark.timeout(900)
def test_lora_checkpoints_are_small_and_a_killed_qlora_run_resumes_bitwise(tiny_assets, tmp_path):
    from safetensors.torch import load_file

    from launch.make_demo import build_tiny_model_dir
    from tests.test_checkpoint_resume import last_losses, torchrun_train

    # hidden 64: at hidden 32 DCP's ~1.7 KB of framing per tensor outweighs the tensors
    build_tiny_model_dir(tmp_path / "base", seed=0, hidden=64, layers=2, heads=2)
    lora = (
        f"model.name_or_path={tmp_path / 'base'}",
        "lora.r=2",
        "lora.target_modules=[q_proj,v_proj]",
        "checkpoint.every_steps=2",
    )
    full = tmp_path / "full"
    proc = torchrun_train(tiny_assets, full, "train.max_steps=2", lora[0], lora[-1])
    assert proc.returncode == 0, proc.stdout[-3000:]
    plain = tmp_path / "lora"
    proc = torchrun_train(tiny_assets, plain, "method=lora", "train.max_steps=2", *lora)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "method lora:" in proc.stdout and "parameters train" in proc.stdout

    qlora = ("method=qlora", "train.max_steps=6", *lora)
    straight, crashy = tmp_path / "straight", tmp_path / "crashy"
    proc = torchrun_train(tiny_assets, straight, *qlora)
    assert proc.returncode == 0, proc.stdout[-3000:]
    proc = torchrun_train(tiny_assets, crashy, *qlora, fault="micro_step:5:1")
    assert proc.returncode != 0, "the injected kill did not happen"
    proc = torchrun_train(tiny_assets, crashy, *qlora)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "resume: continuing from" in proc.stdout and "step_00000004" in proc.stdout

    # Sizes: the tiny model's full checkpoint (weights + Adam state) vs the adapters'.
    full_bytes = _engine_bytes(full, 2)
    for run in (plain, straight):
        assert _engine_bytes(run, 2) * 10 <= full_bytes, (_engine_bytes(run, 2), full_bytes)

    assert last_losses(crashy) == last_losses(straight)  # bitwise (lora dropout included)
    assert sorted(last_losses(straight)) == list(range(1, 7))
    a = load_file(crashy / "model" / "adapter_model.safetensors")
    b = load_file(straight / "model" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a)

    # A LoRA checkpoint does not resume a full run (nor the reverse): both methods named.
    proc = torchrun_train(tiny_assets, straight, "train.max_steps=8", lora[0], lora[-1])
    assert proc.returncode != 0
    assert "saved by a 'qlora' run, this run is 'full' training" in proc.stdout


def test_a_compute_dtype_the_gpu_lacks_is_refused(tiny_assets, tmp_path, monkeypatch):
    """bf16 compute on a GPU without bf16 (V100, T4): one line naming the key. The check runs
    before anything touches the device, so it is exercised here with the GPU's answer faked."""
    from trainer.model.methods import MethodError, quantization_config

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    cfg = _cfg(tiny_assets, tmp_path, "method=qlora", "quantization.compute_dtype=bfloat16")
    with pytest.raises(MethodError) as e:
        quantization_config(cfg, "cuda", zero3=False)
    assert "quantization.compute_dtype" in str(e.value) and "float16" in str(e.value)
    cfg = _cfg(tiny_assets, tmp_path, "method=qlora", "quantization.compute_dtype=float16")
    assert quantization_config(cfg, "cuda", zero3=False).bnb_4bit_compute_dtype == torch.float16


@pytest.mark.timeout(300)
def test_an_8bit_run_saves_resumes_bitwise_and_exports(tiny_assets, tmp_path, ranks):
    """LLM.int8 bases have state-dict entries that are no attribute (Linear8bitLt's SCB), which
    torch's get_state_dict trips over: checkpoints of the adapters must not depend on them."""
    from tests.test_checkpoint_resume import last_losses

    common = ("method=qlora", "quantization.bits=8", "checkpoint.every_steps=2")
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    ranks(_train_rank, 1, tiny_config_args(tiny_assets, straight, *common, "train.max_steps=4"))
    ranks(_train_rank, 1, tiny_config_args(tiny_assets, resumed, *common, "train.max_steps=2"))
    ranks(_train_rank, 1, tiny_config_args(tiny_assets, resumed, *common, "train.max_steps=4"))
    assert last_losses(resumed) == last_losses(straight)
    assert (resumed / "model" / "adapter_model.safetensors").is_file()

    from launch.export import main as export_main

    out = tmp_path / "exported"
    assert export_main([str(resumed / "checkpoints"), "--output", str(out)]) == 0
    assert (out / "adapter_config.json").is_file()


@pytest.mark.timeout(300)
def test_a_full_run_with_frozen_layers_exports_the_trained_model(tiny_assets, tmp_path, ranks):
    """Its checkpoint leaves the frozen layers out (they are the base's): the export takes them
    from the base and the trained ones from the checkpoint, as RUN_DIR/model has them."""
    from safetensors.torch import load_file

    from launch.export import main as export_main

    run = tmp_path / "run"
    args = ("freeze.embeddings=true", "freeze.first_layers=1", "train.max_steps=2")
    ranks(_train_rank, 1, tiny_config_args(tiny_assets, run, *args))
    out = tmp_path / "exported"
    assert export_main([str(run / "checkpoints"), "--output", str(out)]) == 0
    exported = load_file(out / "model.safetensors")
    trained = load_file(run / "model" / "model.safetensors")
    base = load_file(tiny_assets / "model" / "model.safetensors")
    assert exported.keys() == trained.keys()
    assert all(torch.equal(exported[k], trained[k]) for k in trained)
    assert torch.equal(exported["model.embed_tokens.weight"], base["model.embed_tokens.weight"])
    assert not torch.equal(exported["lm_head.weight"], base["lm_head.weight"])
