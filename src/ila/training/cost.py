"""Per-step wall time and peak memory of a training run, as a Trainer callback."""

from __future__ import annotations

import math
import statistics
import threading
import time

import psutil
import torch
from transformers import TrainerCallback


def peak_memory_bytes() -> int:
    """CUDA max allocated on GPU, else the process's current resident set size."""
    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    return int(psutil.Process().memory_info().rss)


class _RssSampler:
    """Samples the process RSS every `interval` s: the OS keeps only a lifetime peak, not a resettable one."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.is_set():
            self.peak = max(self.peak, proc.memory_info().rss)
            self._stop.wait(self.interval)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.peak


def parameter_count(model: torch.nn.Module) -> int:
    """All parameters, 4-bit ones (bitsandbytes `Params4bit`) counted at their unpacked shape, not as storage."""
    return sum(math.prod(p.quant_state.shape) if getattr(p, "quant_state", None) is not None else p.numel()
               for p in model.parameters())


class CostCallback(TrainerCallback):
    """Records each optimizer step's wall time (ms), peak memory (bytes) and tokens seen."""

    def __init__(self) -> None:
        self.step_ms: list[float] = []
        self.peak_bytes = 0
        self._t0 = 0.0
        self._tokens_at_start = 0
        self._sampler: _RssSampler | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        self._tokens_at_start = state.num_input_tokens_seen  # a resumed run restores the earlier count
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        else:
            self._sampler = _RssSampler()
            self._sampler.start()

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.step_ms.append((time.perf_counter() - self._t0) * 1000)

    def on_train_end(self, args, state, control, **kwargs):
        if self._sampler is not None:
            self.peak_bytes = self._sampler.stop()
            self._sampler = None
        else:
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
        }
        if model is not None:
            out["trainable_params"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if tokens is not None:
            out["tokens_per_s"] = self.tokens_per_second(tokens)
        return out
