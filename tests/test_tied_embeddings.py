"""Models whose input and output embeddings are tied (Llama-3.2-1B/3B, Qwen2.5 <= 3B, Gemma):
lm_head.weight IS model.embed_tokens.weight. A state dict (and so a checkpoint) names it twice,
named_parameters() once; training, resume, ZeRO-3 and export must all keep it one weight."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.tiny_models import tiny_llama
from trainer.checkpoint.files import CheckpointError


def test_export_loads_a_tied_checkpoint_and_refuses_an_untied_one(tmp_path):
    """The name comparison in launch.export: a tied model's checkpoint holds lm_head.weight,
    which named_parameters() drops (this was `CheckpointError ... first: lm_head.weight`)."""
    from launch.export import check_ties, load_checkpoint_weights, tied_names
    from trainer.checkpoint import dcp_io
    from trainer.engine.base import model_fingerprint

    trained = tiny_llama(tie_word_embeddings=True, seed=1)
    optimizer = torch.optim.AdamW(trained.parameters())
    dcp_io.save(dcp_io.model_optim_state(trained, optimizer, False), tmp_path / "engine")
    assert "lm_head.weight" in dcp_io.read_tensor_names(tmp_path / "engine")

    model = tiny_llama(tie_word_embeddings=True, seed=2)
    assert tied_names(model) == {"lm_head.weight": "model.embed_tokens.weight"}
    load_checkpoint_weights(tmp_path, model, "ddp")
    want = trained.state_dict()
    assert all(torch.equal(v, want[k]) for k, v in model.state_dict().items())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still one weight

    # An untied model's checkpoint has the very same tensor names; its fingerprint (lm_head a
    # parameter of its own) is what tells it apart, here and on resume.
    untied = tiny_llama(seed=1)
    assert model_fingerprint(untied) != model_fingerprint(trained)
    check_ties(tmp_path, model_fingerprint(trained), model)
    with pytest.raises(CheckpointError, match="lm_head.weight is a weight of its own"):
        check_ties(tmp_path, model_fingerprint(untied), model)


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory) -> Path:
    from launch.make_demo import build_tiny_model_dir

    out = tmp_path_factory.mktemp("tied") / "model"
    return build_tiny_model_dir(out, seed=0, hidden=32, layers=2, heads=2, tie_word_embeddings=True)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("backend", ["ddp", "zero3"])
def test_tied_model_resumes_bitwise_and_exports_tied(backend, tied_model, tiny_assets, tmp_path):
    """Real torchrun on 2 ranks: a SIGKILL inside step 3 and an automatic resume give the
    straight run's losses and final weights bit for bit; launch.export of the newest checkpoint
    has the final model's logits, and the tie survives (one weight, tie_word_embeddings)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from launch.export import main as export_main
    from tests.test_checkpoint_resume import last_losses, torchrun_train
    from tests.test_deepspeed import ds_args

    overrides = [
        f"model.name_or_path={tied_model}",
        "train.max_steps=6",
        "checkpoint.every_steps=2",
    ]
    if backend == "zero3":
        overrides += ds_args("zero3.json")
    straight = tmp_path / "straight"
    proc = torchrun_train(tiny_assets, straight, *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:]
    crashy = tmp_path / "crashy"
    proc = torchrun_train(tiny_assets, crashy, *overrides, fault="micro_step:3:1")
    assert proc.returncode != 0, "the injected kill did not happen"
    proc = torchrun_train(tiny_assets, crashy, *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "continuing from" in proc.stdout and "step_00000002" in proc.stdout
    assert last_losses(crashy) == last_losses(straight)
    a = load_file(crashy / "model" / "model.safetensors")
    b = load_file(straight / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "lm_head.weight" not in a  # written once, as the base model has it

    out = tmp_path / "exported"
    assert export_main([str(crashy / "checkpoints"), "--output", str(out)]) == 0
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    exported = AutoModelForCausalLM.from_pretrained(out).eval()
    trained = AutoModelForCausalLM.from_pretrained(crashy / "model").eval()
    initial = AutoModelForCausalLM.from_pretrained(tied_model).eval()
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    ids = torch.tensor([[1, 20, 21, 22, 23, 5, 6]])
    with torch.no_grad():
        got, want, before = exported(ids).logits, trained(ids).logits, initial(ids).logits
    assert (got - want).abs().max().item() <= 1e-5
    assert (got - before).abs().max().item() > 1e-3  # it really trained
