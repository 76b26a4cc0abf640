"""Shared fixtures: tiny assets built once per session, and the multi-rank launcher."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests import launcher
from tests.slurm_cluster import slurm_cluster  # noqa: F401
from trainer.engine.deepspeed_ops import use_project_extensions_dir

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# DeepSpeed's JIT op is built into (and loaded from) this venv, never the user-wide cache that
# other venvs rebuild; every rank and CLI run the tests start inherits it.
use_project_extensions_dir()


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
