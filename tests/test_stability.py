import math
import random

from ila.importance.stability import StabilityDetector


def feed(detector, curve, interval=10):
    for step in range(interval, len(curve) + 1, interval):
        if detector.update(step, curve[step - 1]):
            return step
    return None


def test_fires_on_a_plateau():
    # falls for 100 steps, then flat with tiny noise
    curve = [3.0 - 0.02 * min(t, 100) + 1e-5 * math.sin(t) for t in range(300)]
    detector = StabilityDetector(epsilon=1e-3, patience=2, min_steps=20)
    fired = feed(detector, curve)
    assert fired is not None and 110 <= fired <= 140
    assert detector.fired_at == fired


def test_does_not_fire_on_a_falling_curve():
    rng = random.Random(0)
    curve = [3.0 - 0.004 * t + rng.uniform(-0.005, 0.005) for t in range(500)]
    assert feed(StabilityDetector(epsilon=1e-3, patience=2), curve) is None


def test_respects_min_steps_and_patience():
    flat = [1.0] * 200
    assert feed(StabilityDetector(epsilon=1e-3, patience=1, min_steps=0), flat) == 20
    assert feed(StabilityDetector(epsilon=1e-3, patience=3, min_steps=0), flat) == 40
    assert feed(StabilityDetector(epsilon=1e-3, patience=1, min_steps=75), flat) == 80


def test_a_rise_is_not_stable():
    # |ΔL| counts: a loss that climbs is not ε-stable either
    curve = [1.0 + 0.01 * t for t in range(200)]
    assert feed(StabilityDetector(epsilon=1e-3), curve) is None
