"""Peak memory and time of the causal-LM loss's forward + backward: naive vs chunked (vs fused).

    .venv/bin/python -m benchmarks.bench_loss_memory [--vocab 32000 128256] [--seq 2048 4096]
        [--batch 1 4]

The loss alone, from the final hidden states [batch, seq, hidden] and the head's weight [vocab,
hidden] (issue 12, benchmark d):

- naive: `logits = hidden @ W.T`, then `trainer.model.loss.token_loss_sum` (upcast to fp32,
  cross_entropy), the logits held by the caller until backward, as the engines held them;
- chunked: `trainer.model.loss.chunked_token_loss_sum` (train.loss_impl=chunked);
- liger / cce: the fused kernels, where the package is installed and a CUDA device present.

Every target token carries loss (no ignored prompt: the worst case for the chunked loss, which
drops ignored positions before any matmul). "head trainable" also computes the head's weight
gradient (full fine-tuning); "head frozen" does not (LoRA/QLoRA, where the head is frozen).

Memory: each (variant, shape) runs in a fresh process. After the inputs exist it resets the
process's peak resident set (`/proc/self/clear_refs` = 5) and records its resident set; the
figure is the peak (VmHWM) after forward + backward minus that. It therefore counts everything
forward + backward allocates and touches, the gradients they return included (the head's weight
gradient is vocab x hidden, in both variants), but not the inputs. The last ratio leaves that
gradient out of both peaks: it is the same in every variant, and a training run holds it as the
head's `.grad` whatever its loss, so what is left is the memory the loss itself costs. glibc is told to hand freed
memory back at once (MALLOC_TRIM_THRESHOLD_=0, MALLOC_MMAP_THRESHOLD_ small) so the peak follows
live tensors. On a CUDA device it is torch.cuda.max_memory_allocated above the inputs instead.
Time is the wall time of that one forward + backward (2 threads on CPU).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def _rss_kb(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return next(int(line.split()[1]) for line in status.splitlines() if line.startswith(field))


def _worker(
    impl: str,
    vocab: int,
    seq: int,
    hidden: int,
    dtype: str,
    trainable: bool,
    chunk: int,
    batch: int,
):
    from trainer.model.loss import _fused_loss_sum, chunked_token_loss_sum, token_loss_sum

    torch.set_num_threads(2)
    device = torch.device("cuda" if impl in ("liger", "cce") else "cpu")

    def inputs(vocab: int, seq: int, hidden: int, batch: int = 1):
        g = torch.Generator().manual_seed(0)
        hidden_states = torch.randn(batch, seq, hidden, generator=g).to(device, DTYPES[dtype])
        weight = (torch.randn(vocab, hidden, generator=g) * 0.02).to(device, DTYPES[dtype])
        labels = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
        return hidden_states.requires_grad_(), weight.requires_grad_(trainable), labels

    def loss_of(hidden_states, weight, labels):
        if impl == "naive":
            logits = hidden_states @ weight.T  # held until backward, as the engines held it
            return token_loss_sum(logits, labels), logits
        if impl == "chunked":
            return chunked_token_loss_sum(hidden_states, weight, labels, chunk_tokens=chunk), None
        return _fused_loss_sum(impl, hidden_states, weight, None, labels), None

    # A tiny warm-up first: thread pools, the autograd engine and kernels' first-use buffers
    # are set up outside the measurement.
    loss_of(*inputs(64, 16, 8))[0].backward()
    hidden_states, weight, labels = inputs(vocab, seq, hidden, batch)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS
        base = _rss_kb("VmRSS") * 1024
    start = time.perf_counter()
    loss, _held = loss_of(hidden_states, weight, labels)
    loss.backward()
    if device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_kb("VmHWM") * 1024 - base
    seconds = time.perf_counter() - start
    print(json.dumps({"peak_mb": peak / 2**20, "s": seconds, "loss": loss.item()}))


def _fused_status(impl: str) -> str | None:
    """Why a fused variant cannot run here, or None."""
    module = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}[impl]
    missing = importlib.util.find_spec(module) is None
    no_cuda = not torch.cuda.is_available()
    if missing or no_cuda:
        return " / ".join(
            why for why, yes in (("not installed", missing), ("no CUDA", no_cuda)) if yes
        )
    return None


def _run(impl: str, *case: Any) -> dict[str, float]:
    """`_worker(impl, *case)` in a fresh process (its peak memory is its own); its result."""
    vocab, seq, hidden, dtype, trainable, chunk, batch = case
    env = dict(
        os.environ,
        MALLOC_TRIM_THRESHOLD_="0",
        MALLOC_MMAP_THRESHOLD_="1048576",
        OMP_NUM_THREADS="2",
        PYTHONPATH=str(REPO),
    )
    argv = [impl, vocab, seq, hidden, dtype, int(trainable), chunk, batch]
    out = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_loss_memory", "--worker", *map(str, argv)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    from trainer.model.loss import DEFAULT_CHUNK_TOKENS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256])
    p.add_argument("--seq", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    p.add_argument("--heads", nargs="+", default=["trainable", "frozen"])
    p.add_argument("--chunk-tokens", type=int, default=DEFAULT_CHUNK_TOKENS)
    p.add_argument("--worker", nargs=8, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        impl, vocab, seq, hidden, dtype, trainable, chunk, batch = args.worker
        _worker(
            impl, int(vocab), int(seq), int(hidden), dtype, trainable == "1", int(chunk), int(batch)
        )
        return

    fused = {impl: _fused_status(impl) for impl in ("liger", "cce")}
    print(
        f"hidden {args.hidden}, chunk {args.chunk_tokens} tokens; "
        f"{'CUDA' if torch.cuda.is_available() else 'CPU, 2 threads'}",
        flush=True,
    )
    head = (
        "| dtype | head | vocab | batch x seq | naive MB | naive s | chunked MB | chunked s "
        "| naive / chunked MB | same, less the head's gradient | loss rel. diff | liger | cce |"
    )
    lines = [head, "|" + "---|" * 13]
    cases = [
        (dtype, head_kind, vocab, batch, seq)
        for dtype in args.dtypes
        for head_kind in args.heads
        for vocab in args.vocab
        for batch in args.batch
        for seq in args.seq
    ]
    for dtype, head_kind, vocab, batch, seq in cases:
        trainable = head_kind == "trainable"
        shape = (vocab, seq, args.hidden, dtype, trainable, args.chunk_tokens, batch)
        naive = _run("naive", *shape)
        chunked = _run("chunked", *shape)
        # The head's weight gradient, which both variants return and a run keeps as .grad.
        grad_mb = vocab * args.hidden * DTYPES[dtype].itemsize / 2**20 if trainable else 0.0
        cells = [
            dtype,
            head_kind,
            str(vocab),
            f"{batch} x {seq}",
            f"{naive['peak_mb']:.0f}",
            f"{naive['s']:.1f}",
            f"{chunked['peak_mb']:.0f}",
            f"{chunked['s']:.1f}",
            f"{naive['peak_mb'] / chunked['peak_mb']:.1f}",
            f"{(naive['peak_mb'] - grad_mb) / (chunked['peak_mb'] - grad_mb):.1f}",
            f"{abs(chunked['loss'] - naive['loss']) / abs(naive['loss']):.1e}",
        ]
        for impl in ("liger", "cce"):
            if fused[impl]:
                cells.append(fused[impl])
            else:
                r = _run(impl, *shape)
                cells.append(f"{r['peak_mb']:.0f} MB, {r['s']:.2f} s")
        lines.append("| " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    print()
    print("\n".join(lines))


if __name__ == "__main__":
    main()
