"""Helpers shared by the tests/test_data_*.py files: shard sets, JSONL files, tokenizer, building
both readers, collecting steps."""

from __future__ import annotations

import functools
import json
import tempfile
from pathlib import Path
from typing import Any

from transformers import AutoTokenizer

from data.config import DataConfig
from data.loader import MapStyleStepBatches, build_map_style
from data.prepare import prepare
from data.shards import ShardSet
from data.streaming import StreamingStepBatches, build_streaming
from data.synthetic import generate, write_jsonl
from data.tokenizer import save_char_tokenizer


@functools.cache
def char_tokenizer() -> Any:
    """The char tokenizer, loaded the way users load theirs (AutoTokenizer from a directory)."""
    directory = save_char_tokenizer(Path(tempfile.mkdtemp(prefix="char-tok-")))
    return AutoTokenizer.from_pretrained(directory)


def make_shards(root: Path, num_rows: int, rows_per_shard: int, seed: int = 0) -> Path:
    """Synthetic instruction rows -> shards of `rows_per_shard` rows under root/shards."""
    src = write_jsonl(generate(num_rows, seed), root / "train.jsonl")
    prepare(str(src), str(root / "shards"), shard_size=f"{rows_per_shard}rows")
    return root / "shards"


def ids_by_row(shard_dir: str | Path) -> list[str]:
    """The `id` field of every row, indexed by global row id (manifest order)."""
    return [json.loads(data)["id"] for _, _, data in ShardSet(str(shard_dir)).iter_rows()]


def config(path: str | Path, **overrides: Any) -> DataConfig:
    base = {"train_path": str(path), "template": "compact", "seq_len": 64, "shuffle_window": 50}
    return DataConfig(**{**base, **overrides})


def _reader(
    build: Any,
    cfg: DataConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    micro_batch_size: int = 4,
    grad_accum_steps: int = 2,
    seed: int = 7,
    state: dict[str, Any] | None = None,
) -> Any:
    s = build(
        cfg,
        cfg.train_path,
        char_tokenizer(),
        rank=rank,
        world_size=world_size,
        micro_batch_size=micro_batch_size,
        grad_accum_steps=grad_accum_steps,
        seed=seed,
    )
    if state is not None:
        s.load_state_dict(state)
    return s


def stream(cfg: DataConfig, **kwargs: Any) -> StreamingStepBatches:
    """The shard stream of `cfg.train_path` (keyword arguments as in `_reader`)."""
    return _reader(build_streaming, cfg, **kwargs)


def map_style(cfg: DataConfig, **kwargs: Any) -> MapStyleStepBatches:
    """The map-style reader of `cfg.train_path` (a JSONL file), as `stream` builds the other."""
    return _reader(build_map_style, cfg, **kwargs)


def step_rows(step: list[dict[str, Any]]) -> list[int]:
    """Global row ids of the samples in one step, in order (padding slots, -1, left out)."""
    out: list[int] = []
    for micro in step:
        out += [int(i) for i in micro["sample_index"].flatten() if i >= 0]
    return out


def take(
    batches: StreamingStepBatches | MapStyleStepBatches, num_steps: int
) -> list[tuple[int, list[int]]]:
    """Run `num_steps` steps; return (epoch the step belonged to, its row ids) per step."""
    out = []
    it = iter(batches)
    for _ in range(num_steps):
        epoch = batches.epoch
        out.append((epoch, step_rows(next(it))))
    return out
