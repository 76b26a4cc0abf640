"""Shared fixtures: tiny assets built once per session, and the multi-rank launcher."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import launcher

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama + char tokenizer in HF format, and small train/eval JSONL files."""
    from data.synthetic import generate, write_jsonl
    from launch.make_demo import build_tiny_model_dir

    root = tmp_path_factory.mktemp("assets")
    build_tiny_model_dir(root / "model", seed=0, hidden=32, layers=2, heads=2)
    write_jsonl(generate(512, 0, "train"), root / "train.jsonl")
    write_jsonl(generate(64, 0, "eval"), root / "eval.jsonl")
    return root


@pytest.fixture
def ranks():
    """`ranks(fn, world_size, *args, timeout=...)`: run fn on real spawned gloo ranks."""
    return launcher.run_ranks


def tiny_config_args(assets: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides for configs/tiny.yaml pointing at the session's tiny assets."""
    return [
        str(Path(__file__).resolve().parent.parent / "configs" / "tiny.yaml"),
        f"run_dir={run_dir}",
        f"model.name_or_path={assets / 'model'}",
        f"data.train_path={assets / 'train.jsonl'}",
        f"data.eval_path={assets / 'eval.jsonl'}",
        *extra,
    ]
