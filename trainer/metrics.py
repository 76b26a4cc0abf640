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

from trainer.flops import FlopsPerToken

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
    """TensorBoard scalars + one JSON line per record in `metrics.jsonl` (rank 0 only).

    A resumed run redoes the steps after its checkpoint (`start_step`): the records of those
    steps from the interrupted attempt are removed from metrics.jsonl and purged from
    TensorBoard, so every logged step has exactly one point. A run starting at step 0 in a
    directory that has metrics moves the old file aside instead of appending to it."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, start_step: int = 0):
        self.enabled = enabled
        self.tb = None
        self.jsonl = None
        self.previous_evals: list[dict[str, float]] = []  # kept eval records, oldest first
        self.previous_train: dict[str, float] | None = None  # the last kept train record
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / "metrics.jsonl"
        if path.exists():
            self._trim(path, start_step)
        self.jsonl = open(path, "a", encoding="utf-8")  # noqa: SIM115
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            # purge_step: events at or after it, written before this point, are hidden.
            self.tb = SummaryWriter(
                log_dir=str(run_dir / "tensorboard"),
                purge_step=start_step + 1 if start_step else 0,
            )

    def _trim(self, path: Path, start_step: int) -> None:
        if start_step == 0:
            aside = path.with_name(f"metrics-superseded-{time.strftime('%Y%m%d-%H%M%S')}.jsonl")
            path.rename(aside)
            log.warning("starting at step 0: the earlier metrics.jsonl was moved to %s", aside)
            return
        kept, dropped = [], 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (ValueError, KeyError, TypeError):
                dropped += 1  # a line cut short by the crash
                continue
            if step > start_step:
                dropped += 1
                continue
            kept.append(line)
            if any(k.startswith("eval/") for k in row):
                self.previous_evals.append(
                    {"step": step, **{k: v for k, v in row.items() if k.startswith("eval/")}}
                )
            if "train/loss" in row:
                self.previous_train = row
        if dropped:
            tmp = path.with_suffix(".jsonl.tmp")
            tmp.write_text("".join(f"{x}\n" for x in kept), encoding="utf-8")
            tmp.replace(path)

    def write(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.tb is not None:
            for key, value in scalars.items():
                self.tb.add_scalar(key, value, step)
        assert self.jsonl is not None
        self.jsonl.write(json.dumps({"step": step, "time": time.time(), **scalars}) + "\n")
        self.jsonl.flush()

    def write_confusion(self, step: int, counts: list[list[int]], labels: list[str]) -> None:
        """A classifier's confusion matrix (rows: true label, columns: predicted) in
        TensorBoard: as an image (`eval/confusion_matrix`, each row shaded by its share) and
        as a table of counts (text), so that it reads without any plotting library."""
        if not self.enabled or self.tb is None:
            return
        m = torch.tensor(counts, dtype=torch.float64)
        share = m / m.sum(1, keepdim=True).clamp(min=1)
        cell = max(4, 256 // max(1, len(counts)))  # pixels per cell
        # White (nothing) to dark blue (the whole row): the diagonal of a good classifier.
        blue = torch.tensor([0.05, 0.2, 0.6], dtype=torch.float64)
        img = 1 - share[..., None] * (1 - blue)
        img = img.repeat_interleave(cell, 0).repeat_interleave(cell, 1)
        self.tb.add_image("eval/confusion_matrix", img.float(), step, dataformats="HWC")
        names = labels or [str(i) for i in range(len(counts))]
        head = "| true \\ predicted | " + " | ".join(names) + " |"
        rule = "|---" * (len(names) + 1) + "|"
        rows = [
            f"| {n} | " + " | ".join(str(c) for c in r) + " |"
            for n, r in zip(names, counts, strict=True)
        ]
        self.tb.add_text("eval/confusion_matrix", "\n".join([head, rule, *rows]), step)

    def close(self) -> None:
        if self.tb is not None:
            self.tb.flush()
            self.tb.close()
        if self.jsonl is not None:
            self.jsonl.close()


class Throughput:
    """Token and FLOP rates over a window (the steps since the last log) and over all of this
    invocation's windows (for summary.json). Counts arrive summed over ranks; "per device" is
    that over the world size: the mean device. Evaluation time is left out of the windows.

    - tokens_per_s: every token the devices ran, padding included, per device;
    - nonpad_tokens_per_s: real tokens per device; tokens_per_s_total: all tokens, all ranks;
    - tflops_per_device: model FLOPs (trainer/flops.py) on the real tokens per second;
    - mfu: that over the device's peak, only when the peak is known."""

    def __init__(self, flops: FlopsPerToken, peak_tflops: float | None, world_size: int):
        self.flops = flops
        self.peak_tflops = peak_tflops
        self.world_size = world_size
        self.window_start = time.perf_counter()
        self._window = self._zero()
        self._run = self._zero()

    @staticmethod
    def _zero() -> dict[str, float]:
        return {"seconds": 0.0, "tokens": 0.0, "nonpad_tokens": 0.0, "flops": 0.0}

    def add_step(self, num_tokens: int, num_total_tokens: int, num_attention_pairs: int) -> None:
        """A step's global counts: real tokens, all tokens (padding too), query-key pairs."""
        self._window["tokens"] += num_total_tokens
        self._window["nonpad_tokens"] += num_tokens
        self._window["flops"] += self.flops.flops(num_tokens, num_attention_pairs)

    def exclude(self, seconds: float) -> None:
        """Leave `seconds` (an evaluation) out of the current window."""
        self.window_start += seconds

    def _rates(self, counts: dict[str, float]) -> dict[str, float]:
        per_device = 1.0 / (max(counts["seconds"], 1e-9) * self.world_size)
        tflops = counts["flops"] * per_device / 1e12
        rates = {
            "tokens_per_s": counts["tokens"] * per_device,
            "nonpad_tokens_per_s": counts["nonpad_tokens"] * per_device,
            "tokens_per_s_total": counts["tokens"] * per_device * self.world_size,
            "tflops_per_device": tflops,
        }
        if self.peak_tflops is not None:
            rates["mfu"] = tflops / self.peak_tflops
        return rates

    def scalars(self) -> dict[str, float]:
        """The window's rates as `train/*` scalars; the next window starts now."""
        now = time.perf_counter()
        self._window["seconds"] = now - self.window_start
        for key, value in self._window.items():
            self._run[key] += value
        rates = self._rates(self._window)
        self._window, self.window_start = self._zero(), now
        return {f"train/{k}": v for k, v in rates.items()}

    def summary(self) -> dict[str, float]:
        """The run's rates over all its logged windows (time-weighted); empty if none."""
        if not self._run["seconds"]:
            return {}
        rates = self._rates(self._run)
        out = {
            "tokens_per_s_per_device": rates["tokens_per_s"],
            "nonpad_tokens_per_s_per_device": rates["nonpad_tokens_per_s"],
            "tflops_per_device": rates["tflops_per_device"],
        }
        if "mfu" in rates:
            out["mfu"] = rates["mfu"]
        return out


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
