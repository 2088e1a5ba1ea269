"""snr: Spectrum's weight signal-to-noise ratio, data-free (Spectrum, Hartford et al. 2024; the spectral
"critical layers" of seeds/002's related work).

Per linear layer W (n × m, β = min(n, m) / max(n, m)), from its singular values S:
σ̂ = IQR(S) / 1.349 (a robust noise scale), Marchenko–Pastur threshold τ = σ̂ · (1 + √β),
score = (Σ S > τ / Σ S ≤ τ) / max S. As Spectrum does, layers are ranked within each role (q_proj against
q_proj, ...): a layer's score is its percentile in its role, so any top fraction holds that fraction of every
role; the raw ratio is the tie-break and is kept in the metadata.

Weights are read one tensor at a time from the model's safetensors files (`ila.weights`): peak memory is the
largest weight and its SVD, not the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from ila.importance.base import NEEDS_WEIGHTS, ImportanceMethod, Inputs, Scores, register
from ila.options import option

if TYPE_CHECKING:
    import torch


@dataclass
class SnrOptions:
    within_role: bool = option(True, "snr: rank layers within each role, as Spectrum does (false: by the raw "
                               "ratio across roles)", flag="--snr-within-role")


def weight_snr(weight: torch.Tensor) -> float:
    """Spectrum's SNR of one weight matrix: (Σ signal σ / Σ noise σ) / σ_max under the Marchenko–Pastur
    threshold from the IQR of its singular values."""
    import torch

    s = torch.linalg.svdvals(weight.float()).double()  # float32 SVD (~1.5x faster than float64 on CPU)
    n, m = weight.shape[-2:]
    beta = min(n, m) / max(n, m)
    sigma = (torch.quantile(s, 0.75) - torch.quantile(s, 0.25)) / 1.349
    threshold = sigma * (1 + beta ** 0.5)
    signal, noise = s[s > threshold].sum(), s[s <= threshold].sum()
    largest = s[0].clamp_min(torch.finfo(s.dtype).tiny)
    # no singular value at or below the threshold: the ratio is unbounded; the smallest σ stands in for the noise
    noise = noise if noise > 0 else s[-1].clamp_min(torch.finfo(s.dtype).tiny)
    return float(signal / noise / largest)


def within_role_percentiles(layers: list, values: list[float]) -> list[float]:
    """Each layer's rank among the layers of its role, as a fraction in [0, 1] (1 = highest value; equal values
    share their average rank)."""
    from ila.ranking import average_ranks

    by_role: dict[str, list[int]] = {}
    for i, layer in enumerate(layers):
        by_role.setdefault(layer.role, []).append(i)
    out = [1.0] * len(layers)
    for indices in by_role.values():
        if len(indices) > 1:
            ranks = average_ranks([values[i] for i in indices])
            for i, r in zip(indices, ranks, strict=True):
                out[i] = (r - 1) / (len(indices) - 1)
    return out


def score(inputs: Inputs) -> Scores:
    from tqdm.auto import tqdm

    raw = [weight_snr(inputs.weights.weight(layer.name))
           for layer in tqdm(inputs.layers, desc="snr: layers", leave=False)]
    meta = {"snr_ranked_within_role": inputs.options.within_role, "snr": raw}
    if inputs.options.within_role:
        return Scores(within_role_percentiles(inputs.layers, raw), meta, tiebreak=raw)
    return Scores(raw, meta)


register(ImportanceMethod(
    name="snr",
    summary="Spectrum's weight SNR from singular values over a Marchenko–Pastur threshold, ranked within role "
            "(data-free)",
    needs=frozenset({NEEDS_WEIGHTS}),
    score=score,
    options=SnrOptions,
    title="weight SNR (within-role percentile)",
    sharded=True,
))
