"""The final HF model comes back in the base model's dtype (`output.dtype: auto`), with its
generation config, whatever dtype training held the weights in; `output.dtype` overrides."""

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


def saved_dtypes(model_dir: Path) -> set[torch.dtype]:
    return {t.dtype for t in load_file(model_dir / "model.safetensors").values()}


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize(("output_dtype", "want"), [("auto", "bfloat16"), ("float32", "float32")])
def test_bf16_base_is_saved_and_exported_in_its_dtype(
    output_dtype, want, tiny_assets, tmp_path, ranks
):
    """A bf16 base trained in fp32 (model.dtype): RUN_DIR/model and launch.export's output are
    bf16 (or output.dtype), say so in config.json, load in it, and carry the generation config."""
    from transformers import AutoModelForCausalLM

    from launch.export import main as export_main
    from launch.make_demo import build_tiny_model_dir

    base = build_tiny_model_dir(
        tmp_path / "base", seed=0, hidden=32, layers=2, heads=2, dtype=torch.bfloat16
    )
    run = tmp_path / "run"
    argv = tiny_config_args(
        tiny_assets,
        run,
        f"model.name_or_path={base}",
        "model.dtype=float32",
        f"output.dtype={output_dtype}",
        "train.max_steps=3",
    )
    ranks(_train_rank, 1, argv)
    out = tmp_path / "exported"
    assert export_main([str(run / "checkpoints"), "--output", str(out)]) == 0
    dtype = getattr(torch, want)
    base_generation = json.loads((base / "generation_config.json").read_text())
    for model_dir in (run / "model", out):
        assert saved_dtypes(model_dir) == {dtype}, model_dir
        assert json.loads((model_dir / "config.json").read_text())["dtype"] == want
        assert AutoModelForCausalLM.from_pretrained(model_dir).dtype == dtype  # dtype="auto"
        generation = json.loads((model_dir / "generation_config.json").read_text())
        assert generation["pad_token_id"] == base_generation["pad_token_id"] is not None
    # The export is the same weights as the run's own final save.
    a, b = load_file(out / "model.safetensors"), load_file(run / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
