"""What a person sees of a run: a progress bar (or log lines), TensorBoard, metrics.jsonl.

Only rank 0 writes or prints. Values arrive here already reduced over ranks and as Python
numbers, so nothing in this module forces a device sync.
"""

from __future__ import annotations

import json
import logging
import math
import resource
import sys
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("fttrain")


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory of this process: CUDA allocator peak on GPU, max RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    # ru_maxrss is in KiB on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    seconds = int(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class MetricsWriter:
    """TensorBoard scalars + one JSON line per record in `metrics.jsonl` (rank 0 only)."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        self.jsonl = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(run_dir / "tensorboard"))

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        assert self.jsonl is not None
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


class Progress:
    """A tqdm bar on a terminal; periodic log lines otherwise (logs from batch jobs stay readable)."""

    def __init__(self, total: int, initial: int, enabled: bool, mode: str, every: int):
        self.total = total
        self.every = every
        self.enabled = enabled
        self.start_time = time.monotonic()
        self.start_step = initial
        use_bar = mode == "on" or (mode == "auto" and sys.stderr.isatty())
        self.bar = None
        if enabled and use_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(
                total=total, initial=initial, desc="train", unit="step", dynamic_ncols=True
            )

    def update(self, step: int, fields: dict[str, Any]) -> None:
        """`step` is the number of optimizer steps completed."""
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(fields, refresh=False)
            return
        if step % self.every == 0 or step == self.total:
            elapsed = time.monotonic() - self.start_time
            done = step - self.start_step
            eta = elapsed / done * (self.total - step) if done else float("nan")
            shown = " ".join(f"{k}={v}" for k, v in fields.items())
            log.info("step %d/%d %s eta=%s", step, self.total, shown, format_duration(eta))

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message)
        else:
            log.info("%s", message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
