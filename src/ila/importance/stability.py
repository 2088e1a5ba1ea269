"""The ε-stability detector (seeds/000 Def. 1) as a Trainer callback.

Def. 1: training is ε-stable at T when |E_z[L(z; θ_{t+1})] − E_z[L(z; θ_t)]| < ε for every t > T.

Estimate of E_z[L]: every `interval` steps, the mean loss on a fixed probe set of held-out examples
(deterministic: no dropout, same examples every time, so no minibatch noise). Without a held-out split the
estimate is an exponential moving average of the training loss, L̃_t = α·L̃_{t−1} + (1 − α)·L_t, α = `smoothing`.

Per-step change between two consecutive checks at steps t' < t:

    Δ_t = |L̂_t − L̂_{t'}| / (t − t')

The detector fires at the first check with t ≥ `min_steps` after `patience` consecutive checks with Δ < ε.
Stage 1 stops there and records t as the stability step; `max_steps` always caps stage 1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainerCallback


@dataclass
class StabilityDetector:
    """Feed (step, loss estimate) pairs with `update`; `fired_at` is the step where the loss became ε-stable."""

    epsilon: float = 1e-3
    patience: int = 2
    min_steps: int = 0
    history: list[tuple[int, float]] = field(default_factory=list)
    changes: list[float] = field(default_factory=list)
    fired_at: int | None = None
    _calm: int = 0

    def update(self, step: int, loss: float) -> bool:
        """Record the loss estimate at `step`; True once (and after) the detector has fired."""
        if self.fired_at is not None:
            return True
        if self.history:
            last_step, last_loss = self.history[-1]
            if step <= last_step:
                return False
            change = abs(float(loss) - last_loss) / (step - last_step)
            self.changes.append(change)
            self._calm = self._calm + 1 if change < self.epsilon else 0
        self.history.append((step, float(loss)))
        if self._calm >= self.patience and step >= self.min_steps:
            self.fired_at = step
            return True
        return False


class StabilityCallback(TrainerCallback):
    """Stops the Trainer once the loss is ε-stable.

    With `use_probe`, the estimate is the Trainer's evaluation loss on the probe set (`eval_steps` = interval);
    otherwise the EMA of the logged training loss (`logging_steps=1`), checked every `interval` steps.
    """

    def __init__(self, detector: StabilityDetector, *, use_probe: bool, interval: int, smoothing: float = 0.9):
        self.detector = detector
        self.use_probe = use_probe
        self.interval = interval
        self.smoothing = smoothing
        self._ema: float | None = None

    def on_train_begin(self, args, state, control, **kwargs):
        # On resume, replay the history so the detector sees the whole curve.
        if not self.detector.history:
            for entry in state.log_history:
                self._observe(entry, entry.get("step", 0), control)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._observe(logs or {}, state.global_step, control)

    def _observe(self, logs: dict, step: int, control) -> None:
        if self.detector.fired_at is not None:
            return
        if self.use_probe:
            if "eval_loss" not in logs:
                return
            fired = self.detector.update(step, logs["eval_loss"])
        else:
            if "loss" not in logs:
                return
            a = self.smoothing
            self._ema = logs["loss"] if self._ema is None else a * self._ema + (1 - a) * logs["loss"]
            if step % self.interval:
                return
            fired = self.detector.update(step, self._ema)
        if fired:
            control.should_training_stop = True
