"""MFU of a full bf16 SFT of a ~1B Llama on one GPU, through our trainer (issue 12 item 6).

    .venv/bin/python -m benchmarks.gpu_sft_mfu                # one GPU; target MFU >= 45%
    .venv/bin/python -m benchmarks.gpu_sft_mfu --quick        # tiny model on CPU: a smoke run
    .venv/bin/python -m benchmarks.gpu_sft_mfu --set train.compile=true   # any key=value of ours

The model is Llama-shaped, random init, written once in bf16 to a temp dir (nothing downloaded):
hidden 2048, 16 layers, 32 heads, 8 KV heads, intermediate 5632, vocab 32000, untied head
(0.85B parameters). The tokenizer is bench_throughput's byte-level BPE trained here on the
data, which are bench_throughput's Alpaca rows with lognormal lengths (median ~415, mean ~555,
p99 ~1950 tokens at seq_len 2048; 17k-token vocabulary); the loss is on the responses.

Ours runs as a user runs it, one process, `python -m launch.train CONFIG [key=value ...]`:
method full, train.precision=bf16 (fp32 master weights and optimizer state, bf16 autocast),
model.attn_implementation flash_attention_2 when flash_attn imports (else sdpa; --attn),
data.packing=true (packed to a token budget: train.micro_batch_size counts rows of
data.seq_len), micro batch 4 rows x 2048 tokens x accumulation 4, no gradient checkpointing,
no checkpoints, no eval. It logs every --log-every steps; each record's rates cover the steps
since the previous one (trainer/metrics.py Throughput).

Read from metrics.jsonl, over the records after --warmup-steps: train/mfu (model FLOPs of the
real tokens, per trainer/flops.py, over the GPU's dense bf16 peak), train/tflops_per_device,
train/nonpad_tokens_per_s, train/tokens_per_s (padding too: the packing loss),
train/step_time_s (the logged step) and train/memory_mb (torch.cuda.max_memory_allocated since
the process started), each as median / min / max over the records; beside them the whole run's
figures from summary.json (warmup included).

Without CUDA and without --quick it prints one line saying a GPU is needed and exits 2. --quick
shrinks the model (2 layers, hidden 64), the data and the steps and runs on whatever device
there is; on a CPU MFU is measured against a nominal 1 TFLOP/s (--peak-tflops), only so that
the MFU path runs: its numbers are not performance figures.
"""

from __future__ import annotations

import argparse
import json
import math
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

if __package__ in (None, ""):  # run as a file: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import gpu_common as gc  # noqa: E402

TARGET_MFU = 0.45
QUICK_PEAK_TFLOPS = 1.0  # nominal, CPU smoke runs only


@dataclass(frozen=True)
class Setup:
    shape: gc.Shape
    seq_len: int = 2048
    median_content_tokens: float = 400.0  # lognormal; the template adds ~45 tokens
    sigma: float = 0.85
    micro_batch_size: int = 4  # packed rows of seq_len
    grad_accum_steps: int = 4
    steps: int = 40
    warmup_steps: int = 10
    log_every: int = 5
    lr: float = 2e-5
    seed: int = 1234
    timeout_s: int = 3600


FULL = Setup(
    shape=gc.Shape(hidden=2048, layers=16, heads=32, kv_heads=8, intermediate=5632, vocab=32000)
)
QUICK = Setup(
    shape=gc.Shape(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=176, vocab=1024),
    seq_len=256,
    median_content_tokens=60.0,
    micro_batch_size=2,
    grad_accum_steps=2,
    steps=6,
    warmup_steps=2,
    log_every=1,
    lr=1e-3,
    timeout_s=600,
)


def rows_needed(setup: Setup) -> int:
    """Rows for all steps with room to spare (an epoch's end would shorten a micro-batch)."""
    mean = setup.median_content_tokens * math.exp(setup.sigma**2 / 2) + 45
    tokens = setup.steps * setup.micro_batch_size * setup.grad_accum_steps * setup.seq_len
    return int(1.5 * tokens / mean) + 64


def our_config(setup: Setup, model_dir: Path, train_jsonl: Path, run_dir: Path, args) -> dict:
    logging = {"every_steps": setup.log_every, "tensorboard": False, "progress_bar": "off"}
    if args.peak_tflops is not None:
        logging["peak_tflops"] = args.peak_tflops
    return {
        "run_dir": str(run_dir),
        "seed": setup.seed,
        "model": {
            "name_or_path": str(model_dir),
            "dtype": "bfloat16",  # how the checkpoint is read; trainable weights become fp32
            "attn_implementation": args.attn,
            "gradient_checkpointing": args.gradient_checkpointing,
        },
        "method": "full",
        "data": {
            "train_path": str(train_jsonl),
            "format": "instruction",
            "template": "alpaca",
            "context_field": "input",
            "response_field": "output",
            "seq_len": setup.seq_len,
            "packing": True,
            "num_workers": args.num_workers,
        },
        "train": {
            "micro_batch_size": setup.micro_batch_size,
            "grad_accum_steps": setup.grad_accum_steps,
            "max_steps": setup.steps,
            "precision": args.precision,
            "max_grad_norm": 1.0,
        },
        "optim": {"lr": setup.lr, "weight_decay": 0.0},
        "schedule": {"warmup_steps": 2, "decay": "cosine", "min_lr_ratio": 0.1},
        "logging": logging,
        "checkpoint": {"save_at_end": False, "resume": "never"},
        "output": {"save_hf_model": False},
    }


METRICS = (
    # (label, key, scale, format)
    ("MFU", "train/mfu", 100.0, "{:.1f}%"),
    ("TFLOP/s per device", "train/tflops_per_device", 1.0, "{:.3f}"),
    ("non-pad tokens/s per device", "train/nonpad_tokens_per_s", 1.0, "{:,.0f}"),
    ("all tokens/s per device (padding too)", "train/tokens_per_s", 1.0, "{:,.0f}"),
    ("step time s (the logged step)", "train/step_time_s", 1.0, "{:.3f}"),
    ("peak memory MB", "train/memory_mb", 1.0, "{:,.0f}"),
)
SUMMARY_KEYS = {
    "train/mfu": ("mfu", 100.0),
    "train/tflops_per_device": ("tflops_per_device", 1.0),
    "train/nonpad_tokens_per_s": ("nonpad_tokens_per_s_per_device", 1.0),
    "train/tokens_per_s": ("tokens_per_s_per_device", 1.0),
}


def table(records: list[dict], summary: dict, mfu_note: str) -> str:
    lines = [
        "| metric | median | min | max | records (after warmup) | whole run (summary.json) |",
        "|---|---|---|---|---|---|",
    ]
    for label, key, scale, fmt in METRICS:
        values = [r[key] * scale for r in records if key in r]
        if not values:
            lines.append(f"| {label} | {mfu_note} | | | 0 | |")
            continue
        med, lo, hi = gc.spread(values)
        whole = ""
        if key in SUMMARY_KEYS and SUMMARY_KEYS[key][0] in summary:
            name, s = SUMMARY_KEYS[key]
            whole = fmt.format(summary[name] * s)
        elif key == "train/memory_mb":
            whole = fmt.format(max(values)) + " (max)"
        lines.append(
            f"| {label} | {fmt.format(med)} | {fmt.format(lo)} | {fmt.format(hi)} | "
            f"{len(values)} | {whole} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", "--smoke", action="store_true", help="tiny model: a smoke run")
    p.add_argument("--steps", type=int, help="optimizer steps (40)")
    p.add_argument("--warmup-steps", type=int, help="first steps left out (10)")
    p.add_argument("--log-every", type=int, help="steps per metrics record (5)")
    p.add_argument("--micro-batch-size", type=int, help="packed rows per micro-batch (4)")
    p.add_argument("--grad-accum-steps", type=int, help="micro-batches per step (4)")
    p.add_argument("--seq-len", type=int, help="data.seq_len (2048)")
    p.add_argument("--attn", default="auto", help="auto (flash_attention_2 if importable), sdpa")
    p.add_argument("--precision", default="bf16", help="train.precision (bf16)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--num-workers", type=int, default=0, help="data.num_workers (0)")
    p.add_argument("--peak-tflops", type=float, help="logging.peak_tflops (default: the GPU's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="for ours")
    p.add_argument("--workdir", type=Path, help="where the model, data and run go (a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the work dir")
    p.add_argument("--timeout", type=int, help="seconds before the run is killed")
    args = p.parse_args()
    gc.require_gpu(args.quick, "benchmarks/gpu_sft_mfu.py")

    import torch

    setup = QUICK if args.quick else FULL
    for key, value in {
        "steps": args.steps,
        "warmup_steps": args.warmup_steps,
        "log_every": args.log_every,
        "micro_batch_size": args.micro_batch_size,
        "grad_accum_steps": args.grad_accum_steps,
        "seq_len": args.seq_len,
        "timeout_s": args.timeout,
    }.items():
        if value is not None:
            setup = replace(setup, **{key: value})
    if not 0 < setup.warmup_steps < setup.steps or setup.warmup_steps % setup.log_every:
        p.error("need 0 < --warmup-steps < --steps, --warmup-steps a multiple of --log-every")
    args.attn = gc.pick_attention(args.attn)
    if args.quick and not torch.cuda.is_available() and args.peak_tflops is None:
        args.peak_tflops = QUICK_PEAK_TFLOPS
    if torch.cuda.is_available():
        from trainer.flops import known_peak_tflops

        peak = args.peak_tflops or known_peak_tflops(gc.cuda_info()["name"])
        mfu_note = f"against {peak:g} TFLOP/s" if peak else "not logged: unknown GPU peak"
    else:
        mfu_note = f"against a nominal {args.peak_tflops:g} TFLOP/s (CPU: not a real peak)"

    title = "gpu_sft_mfu: full SFT MFU, ~1B Llama, bf16, one GPU (issue 12 item 6)"
    if args.quick:
        title += " -- QUICK SMOKE RUN, not a performance figure"
    print(gc.header(title), flush=True)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="gpu-sft-mfu-"))
    work.mkdir(parents=True, exist_ok=True)
    started = time.time()
    try:
        model_dir = work / "model"
        rows = rows_needed(setup)
        data = gc.data_setup(
            seq_len=setup.seq_len,
            num_rows=rows,
            median_content_tokens=setup.median_content_tokens,
            sigma=setup.sigma,
            seed=setup.seed,
        )
        train_jsonl = work / "train.jsonl"
        tokenizer, lengths = gc.make_data(data, setup.shape.vocab, train_jsonl, model_dir)
        config = gc.llama_config(setup.shape, max_positions=setup.seq_len, tokenizer=tokenizer)
        t0 = time.time()
        n_params = gc.write_random_llama(config, model_dir, seed=setup.seed)
        print(
            f"model: {setup.shape.describe(n_params, config.vocab_size)}, random init, bf16 on "
            f"disk ({time.time() - t0:.0f} s to write)"
        )
        print(f"data: {gc.length_line(lengths, setup.seq_len)}; tokenizer {len(tokenizer)} tokens")
        tokens_per_step = setup.micro_batch_size * setup.grad_accum_steps * setup.seq_len
        print(
            f"run: ours, method full, train.precision={args.precision}, attention {args.attn}, "
            f"packing to a token budget: micro batch {setup.micro_batch_size} rows x "
            f"{setup.seq_len} tokens x accumulation {setup.grad_accum_steps} = "
            f"{tokens_per_step:,} positions per step; gradient checkpointing "
            f"{'on' if args.gradient_checkpointing else 'off'}; {setup.steps} steps, a record "
            f"every {setup.log_every}, the first {setup.warmup_steps} steps left out",
            flush=True,
        )
        run_dir = work / "run"
        if run_dir.exists():
            shutil.rmtree(run_dir)
        config_path = work / "sft.yaml"
        gc.write_yaml(config_path, our_config(setup, model_dir, train_jsonl, run_dir, args))
        cmd = gc.ours_command(config_path, args.set)
        print(f"ours: {shlex.join(cmd)}", flush=True)
        log_path = work / "sft.log"
        wall = gc.run_process(cmd, log_path, setup.timeout_s)
        for line in gc.chosen_lines(log_path):
            print(f"  ours at start: {line}")
        records = [r for s_, r in gc.train_records(run_dir).items() if s_ > setup.warmup_steps]
        summary_path = run_dir / "summary.json"
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
        print(
            f"  ours: {wall:.0f} s wall, final loss {summary.get('final_loss', float('nan')):.4f}"
        )
        print()
        print(table(records, summary, mfu_note))
        mfu = [r["train/mfu"] for r in records if "train/mfu" in r]
        print()
        if not mfu:
            print(f"target: MFU >= {TARGET_MFU:.0%}: not measured (MFU {mfu_note})")
        else:
            med = gc.spread(mfu)[0]
            verdict = "met" if med >= TARGET_MFU else "NOT met"
            if args.quick:
                verdict = "n/a (smoke run)"
            print(f"target: MFU >= {TARGET_MFU:.0%}: median {med:.1%} ({mfu_note}) -> {verdict}")
    finally:
        kept = f"; work dir {work}" if args.keep or args.workdir else ""
        print(f"\ntotal {time.time() - started:.0f} s{kept}")
        if not (args.keep or args.workdir):
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
