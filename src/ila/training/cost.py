"""Per-step wall time and peak memory of a training run, as a Trainer callback."""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback


def reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process: Linux ≥ 4.0, by writing 5 to clear_refs.

    Nothing samples memory while a step runs: the kernel keeps the peak, so measuring costs nothing.
    """
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _proc_status_bytes(field: str) -> int | None:
    """A memory field of /proc/self/status (Linux, in KiB there) in bytes; None where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def peak_rss_bytes() -> int:
    """The peak RSS since the last `reset_peak_rss` (Linux VmHWM), else the process's lifetime peak."""
    peak = _proc_status_bytes("VmHWM")
    if peak is not None:
        return peak
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # bytes on macOS, KiB elsewhere


def current_rss_bytes() -> int:
    """The resident set size now (Linux VmRSS; 0 where /proc is missing)."""
    return _proc_status_bytes("VmRSS") or 0


def memory_now_bytes() -> int:
    """CUDA memory allocated now on GPU, else the resident set size now."""
    return int(torch.cuda.memory_allocated()) if torch.cuda.is_available() else current_rss_bytes()


def peak_memory_bytes() -> int:
    """CUDA max allocated on GPU, else the peak RSS since the last `reset_peak_rss` (see `peak_rss_bytes`)."""
    return int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else peak_rss_bytes()


def parameter_count(model: torch.nn.Module) -> int:
    """All parameters, 4-bit ones (bitsandbytes `Params4bit`) counted at their unpacked shape, not as storage."""
    return sum(math.prod(p.quant_state.shape) if getattr(p, "quant_state", None) is not None else p.numel()
               for p in model.parameters())


class CostCallback(TrainerCallback):
    """Records each optimizer step's wall time (ms), peak memory (bytes) and tokens seen."""

    def __init__(self) -> None:
        self.step_ms: list[float] = []
        self.peak_bytes = 0
        self.start_bytes = 0  # memory held when training starts (model, data, runtime): the peak's floor
        self._t0 = 0.0
        self._tokens_at_start = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self._tokens_at_start = state.num_input_tokens_seen  # a resumed run restores the earlier count
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        else:
            reset_peak_rss()
        self.start_bytes = memory_now_bytes()

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_ms.append((time.perf_counter() - self._t0) * 1000)

    def on_train_end(self, args, state, control, **kwargs):
        self.peak_bytes = peak_memory_bytes()

    def tokens_per_second(self, tokens_seen: int | float) -> float:
        """Tokens processed per second of measured step time; `tokens_seen` is the Trainer's running total."""
        seconds = sum(self.step_ms) / 1000
        return float(tokens_seen - self._tokens_at_start) / seconds if seconds > 0 else 0.0

    def summary(self, model: torch.nn.Module | None = None, tokens: int | float | None = None) -> dict[str, float]:
        """Median step time and peak memory; trainable parameters and tokens/s when given the model and tokens."""
        out = {
            "steps": len(self.step_ms),
            "median_step_ms": statistics.median(self.step_ms) if self.step_ms else 0.0,
            "peak_memory_mb": self.peak_bytes / 2**20,
            "start_memory_mb": self.start_bytes / 2**20,
        }
        if model is not None:
            out["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if tokens is not None:
            out["tokens_per_s"] = self.tokens_per_second(tokens)
        return out
