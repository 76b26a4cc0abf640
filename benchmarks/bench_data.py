"""Data pipeline throughput and resume latency: `python benchmarks/bench_data.py [--rows N]`.

Compares, in one run and on the same synthetic rows, the work a training step needs from the
data side (read + validate/tokenize + pack into seq_len rows):

- `shards`: data.streaming over `data.prepare` shards (this repo's pipeline),
- `datasets`: `load_dataset("json", data_files=<the same shard files>, streaming=True)` in a
  DataLoader doing the same tokenize + pack in its collate function.

Throughput is reported per DataLoader worker (tokens/s divided by workers). Resume latency is the
time from building the stream with a saved position to its first batch, early and late in the
epoch; for `datasets` the equivalent is `.skip(position)`, which reads and discards the prefix.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.config import DataConfig  # noqa: E402
from data.packing import pack  # noqa: E402
from data.prepare import prepare  # noqa: E402
from data.streaming import build_streaming  # noqa: E402
from data.synthetic import generate, write_jsonl  # noqa: E402
from data.templates import RowError, encode_row  # noqa: E402
from data.tokenizer import save_char_tokenizer  # noqa: E402

MICRO = 32
SEQ_LEN = 256


class PackCollate:
    """The baseline's per-batch work, equal to the pipeline's: validate/tokenize, pack."""

    def __init__(self, tokenizer: Any, cfg: DataConfig):
        self.tokenizer, self.cfg = tokenizer, cfg

    def __call__(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        items = []
        for i, row in enumerate(rows):
            try:
                sample = encode_row(row, self.tokenizer, self.cfg)
            except RowError:
                continue
            items.append((i, sample))
        batch = pack(items, self.cfg.seq_len, self.tokenizer.pad_token_id)
        batch["real_tokens"] = torch.tensor(sum(len(s) for _, s in items))
        return batch


def bench_shards(cfg: DataConfig, tokenizer: Any, workers: int) -> tuple[float, float]:
    cfg = cfg.model_copy(update={"num_workers": workers})
    s = build_streaming(
        cfg,
        cfg.train_path,
        tokenizer,
        rank=0,
        world_size=1,
        micro_batch_size=MICRO,
        grad_accum_steps=1,
        seed=0,
    )
    start = time.perf_counter()
    it = iter(s)
    for _ in range(s.steps_per_epoch):
        next(it)
    elapsed = time.perf_counter() - start
    m = s.metrics()
    return m["tokens_real"] / elapsed / max(workers, 1), m["packing_efficiency"]


def hf_stream(files: list[str]) -> Any:
    import datasets

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    return datasets.load_dataset("json", data_files=files, split="train", streaming=True)


def bench_datasets(files: list[str], cfg: DataConfig, tokenizer: Any, workers: int) -> float:
    loader = DataLoader(
        hf_stream(files),
        batch_size=MICRO,
        num_workers=workers,
        collate_fn=PackCollate(tokenizer, cfg),
    )
    start = time.perf_counter()
    tokens = sum(int(b["real_tokens"]) for b in loader)
    return tokens / (time.perf_counter() - start) / max(workers, 1)


def resume_latency_shards(cfg: DataConfig, tokenizer: Any, position: int) -> float:
    cfg = cfg.model_copy(update={"num_workers": 2})
    start = time.perf_counter()
    s = build_streaming(
        cfg,
        cfg.train_path,
        tokenizer,
        rank=0,
        world_size=1,
        micro_batch_size=MICRO,
        grad_accum_steps=1,
        seed=0,
    )
    s.load_state_dict({**s.state_dict(), "position": position})
    next(iter(s))
    return time.perf_counter() - start


def resume_latency_datasets(
    files: list[str], cfg: DataConfig, tokenizer: Any, position: int
) -> float:
    start = time.perf_counter()
    loader = DataLoader(
        hf_stream(files).skip(position),
        batch_size=MICRO,
        num_workers=0,
        collate_fn=PackCollate(tokenizer, cfg),
    )
    next(iter(loader))
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=40_000, help="rows for the throughput runs")
    p.add_argument("--resume-rows", type=int, default=200_000, help="rows for the resume runs")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    from transformers import AutoTokenizer

    tmp = Path(tempfile.mkdtemp(prefix="bench-data-"))
    tokenizer = AutoTokenizer.from_pretrained(save_char_tokenizer(tmp / "tok"))
    src = write_jsonl(generate(args.rows, 0), tmp / "train.jsonl")
    logging.getLogger("data.prepare").setLevel(logging.WARNING)
    prepare(str(src), str(tmp / "shards"), shard_size="256KB")
    files = sorted(str(f) for f in (tmp / "shards").glob("*.jsonl"))
    cfg = DataConfig(
        train_path=str(tmp / "shards"),
        template="compact",
        seq_len=SEQ_LEN,
        packing=True,
        shuffle_window=4096,
    )
    print(
        f"{args.rows} synthetic rows in {len(files)} shards; micro batch {MICRO} samples, "
        f"packed into rows of {SEQ_LEN}; torch threads {torch.get_num_threads()}"
    )
    print()
    print(f"{'pipeline':<10} {'workers':>7} {'tokens/s/worker':>16} {'packing eff.':>13}")
    for workers in (1, 2):
        tps, eff = bench_shards(cfg, tokenizer, workers)
        print(f"{'shards':<10} {workers:>7} {tps:>16,.0f} {eff:>13.3f}")
        tps = bench_datasets(files, cfg, tokenizer, workers)
        print(f"{'datasets':<10} {workers:>7} {tps:>16,.0f} {'':>13}")
    # Resume latency on a larger set, where reading a prefix would show.
    big = write_jsonl(generate(args.resume_rows, 1), tmp / "big.jsonl")
    prepare(str(big), str(tmp / "big_shards"), shard_size="1MB")
    files = sorted(str(f) for f in (tmp / "big_shards").glob("*.jsonl"))
    cfg = cfg.model_copy(update={"train_path": str(tmp / "big_shards")})
    print()
    print(f"resume on {args.resume_rows} rows in {len(files)} shards (2 workers for shards)")
    print(
        f"{'resume to first batch':<24} {'position':>9} {'shards (s)':>11} {'datasets skip (s)':>18}"
    )
    for label, position in (("early", MICRO), ("late", args.resume_rows - 2 * MICRO)):
        a = resume_latency_shards(cfg, tokenizer, position)
        b = resume_latency_datasets(files, cfg, tokenizer, position)
        print(f"{label:<24} {position:>9} {a:>11.3f} {b:>18.3f}")


if __name__ == "__main__":
    main()
