"""Peak memory and step time per rank: DDP vs DeepSpeed ZeRO-1/2/3, 2 CPU ranks.

    .venv/bin/python -m benchmarks.bench_zero [--hidden 768 --layers 12 --steps 3]

A ~130M-parameter Llama is written once to a temp dir; every backend then builds it through the
real `trainer.build.build_engine` (ZeRO-3: partitioned at load) and runs the loop's own
`train_step` on synthetic batches. Per rank it reports peak RSS (the whole process, imports
included) and the bytes of parameter + optimizer state the rank holds (unique tensor storages:
model parameters -- ZeRO-3's own partitions --, fp32 master partitions, Adam moments).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

BACKENDS = ["ddp", "zero1", "zero2", "zero3"]


def _state_bytes(engine) -> tuple[int, int]:
    """(parameter bytes, optimizer-state bytes) held by this rank, each storage counted once."""
    seen: set[int] = set()

    def total(tensors) -> int:
        n = 0
        for t in tensors:
            storage = t.untyped_storage()
            if storage.data_ptr() in seen or storage.nbytes() == 0:
                continue
            seen.add(storage.data_ptr())
            n += storage.nbytes()
        return n

    model = engine.unwrapped_model()
    # ZeRO-3 leaves an empty placeholder in p.data and keeps this rank's shard in p.ds_tensor.
    params = total(getattr(p, "ds_tensor", p) for p in model.parameters())
    inner = getattr(engine, "client_optimizer", None) or engine.optimizer
    masters = [p for g in inner.param_groups for p in g["params"]]  # ZeRO: fp32 partitions
    moments = [v for s in inner.state.values() for v in s.values() if torch.is_tensor(v)]
    return params, total(masters) + total(moments)


def _peak_rss_mb(reset: bool = False) -> float:
    """This process's peak RSS (VmHWM); `reset` restarts the peak from the current RSS, so the
    training phase is measured apart from model loading."""
    status = Path("/proc/self/status").read_text()
    peak = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    if reset:
        Path("/proc/self/clear_refs").write_text("5")
    return peak / 1024


def _rank(backend: str, model_dir: str, steps: int, seq_len: int, micro_batch: int) -> dict:
    from trainer.build import build_engine, seed_everything
    from trainer.config import RunConfig, resolve_batch, with_total_steps
    from trainer.dist import init_distributed, shutdown
    from trainer.loop import train_step

    train = {"micro_batch_size": micro_batch, "grad_accum_steps": 1, "max_steps": steps + 1}
    if backend != "ddp":
        train |= {
            "backend": "deepspeed",
            "deepspeed_config": str(REPO / "configs" / "deepspeed" / f"{backend}.json"),
        }
    cfg = RunConfig.model_validate(
        {
            "model": {"name_or_path": model_dir},
            "data": {"train_path": "unused.jsonl"},
            "train": train,
        }
    )
    ctx = init_distributed()
    try:
        derived = with_total_steps(cfg, resolve_batch(cfg, ctx.world_size), None)
        seed_everything(0)
        engine = build_engine(cfg, derived, ctx)
        build_peak = _peak_rss_mb(reset=True)
        engine.train()
        g = torch.Generator().manual_seed(ctx.rank)
        vocab = engine.unwrapped_model().config.vocab_size
        from trainer.model.loss import next_token_targets

        times = []
        for step in range(steps + 1):  # the first step (allocations, lazy state) is not timed
            ids = torch.randint(0, vocab, (micro_batch, seq_len), generator=g)
            mask = torch.ones_like(ids)
            batch = {"input_ids": ids, "attention_mask": mask, "targets": next_token_targets(ids)}
            start = time.perf_counter()
            train_step(engine, [batch], cfg.train.max_grad_norm)
            if step:
                times.append(time.perf_counter() - start)
        params, optim = _state_bytes(engine)
        return {
            "build_rss_mb": build_peak,
            "rss_mb": _peak_rss_mb(),
            "param_mb": params / 2**20,
            "optim_mb": optim / 2**20,
            "step_s": statistics.median(times),
        }
    finally:
        shutdown(ctx)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--backends", default=",".join(BACKENDS))
    args = p.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.launcher import run_ranks

    world = 2
    # Let glibc hand freed pages back at once (every backend alike), so peak RSS follows live
    # memory rather than the allocator's retained free lists. The ranks inherit it at spawn.
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", "0")
    with tempfile.TemporaryDirectory() as tmp:
        config = LlamaConfig(
            vocab_size=args.vocab,
            hidden_size=args.hidden,
            intermediate_size=args.hidden * 8 // 3 // 64 * 64,
            num_hidden_layers=args.layers,
            num_attention_heads=args.hidden // 64,
            num_key_value_heads=args.hidden // 64,
            tie_word_embeddings=False,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config)
        n_params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(tmp)
        del model
        print(
            f"Llama {n_params / 1e6:.0f}M params, {world} CPU ranks, micro batch "
            f"{args.micro_batch} x {args.seq_len} tokens, median of {args.steps} steps",
            flush=True,
        )
        rows = {}
        for backend in args.backends.split(","):
            started = time.time()
            per_rank = run_ranks(
                _rank, world, backend, tmp, args.steps, args.seq_len, args.micro_batch, timeout=600
            )
            rows[backend] = {k: max(r[k] for r in per_rank) for k in per_rank[0]}
            print(f"  {backend}: done in {time.time() - started:.0f}s", flush=True)

    print_table(rows)


def print_table(rows: dict[str, dict[str, float]]) -> None:
    """One markdown table; every column also as a ratio to DDP's (the first backend run)."""
    for r in rows.values():
        r["state_mb"] = r["param_mb"] + r["optim_mb"]
    base = next(iter(rows.values()))
    columns = [
        ("peak RSS/rank while training, MB", "rss_mb"),
        ("peak RSS/rank while building, MB", "build_rss_mb"),
        ("params+optim state/rank, MB", "state_mb"),
        ("step s", "step_s"),
    ]
    head = ["backend"] + [h for name, _ in columns for h in (name, "x first")]
    print("| " + " | ".join(head + ["params / optim state MB"]) + " |")
    print("|" + "---|" * (len(head) + 1))
    for name, r in rows.items():
        cells = [name]
        for _, key in columns:
            cells += [f"{r[key]:.2f}" if key == "step_s" else f"{r[key]:.0f}"]
            cells += [f"{r[key] / base[key]:.2f}"]
        cells.append(f"{r['param_mb']:.0f} / {r['optim_mb']:.0f}")
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
