"""One streaming pass over the data feeding every representation and probe metric of `ila analyze`.

Per batch, each model runs one forward pass with `output_hidden_states=True`; layer ℓ is `hidden_states[ℓ]`
(ℓ = 0 the embeddings, ℓ = k the output of block k − 1; the last one is after the model's final norm, as
transformers returns it). From those states, per layer and model (seeds/004 Sec. 3, 3.5):

- sample level (mean over examples of a per-example value): `prompt_entropy` (matrix entropy of the example's
  token states), `curvature`, and for the pair `cosine` (mean per-token cosine between the models);
- dataset level: each example's mean-pooled state is kept (examples × width per layer and model), for
  `dataset_entropy`, `effective_rank`, `rank_deficiency`, `cka` and `mean_shift` at the end; `sparsity` is a
  running count of |h| below the threshold over all tokens;
- probe (logit lens): the state through the final norm and LM head (the last layer: the model's own logits),
  next-token accuracy and loss on the response tokens.

The forward passes compute the LM head at the last position only (`logits_to_keep=1`); the probe applies it to
the response positions it scores. Memory: one batch's hidden states of both models (2 · (L+1) · batch · tokens ·
width values) plus the pooled vectors (2 · (L+1) · examples · width) and per-layer scalars, plus the probe's logits
of one layer at a time (response tokens · vocabulary); nothing grows with the number of tokens seen.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ila.analysis import metrics
from ila.errors import IlaError
from ila.training.loss import accepts_logits_to_keep

MODELS = ("base", "tuned")


def final_norm(model: nn.Module) -> nn.Module:
    """The decoder's final norm (`model.norm`, `ln_f`, `final_layernorm`), applied before the LM head."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    for name in ("norm", "ln_f", "final_layernorm", "final_layer_norm"):
        module = getattr(decoder, name, None)
        if isinstance(module, nn.Module):
            return module
    raise IlaError(f"model {type(model).__name__}: found no final norm for the logit lens (use --no-probe)")


def lens_logits(model: nn.Module, states: torch.Tensor, last: bool) -> torch.Tensor:
    """Logits of hidden states through the final norm (not for the last layer: transformers returns it normed, so
    there this is the model's own logits) and the LM head, with the model's final logit soft-capping if any."""
    if not last:
        states = final_norm(model)(states)
    logits = model.get_output_embeddings()(states).float()
    cap = getattr(model.config, "final_logit_softcapping", None)
    return torch.tanh(logits / cap) * cap if cap else logits


@dataclass
class LayerStats:
    """Running sums of one model at one layer."""

    prompt_entropy: float = 0.0
    curvature: float = 0.0
    below: int = 0  # entries with |h| < threshold
    entries: int = 0
    pooled: list[torch.Tensor] = field(default_factory=list)
    correct: int = 0  # logit lens
    loss: float = 0.0
    tokens: int = 0


class Stream:
    """Accumulates every representation metric over batches; `rows()` gives the metric rows at the end."""

    def __init__(self, n_layers: int, *, alpha: float, threshold: float, probe: bool) -> None:
        self.n_layers, self.alpha, self.threshold, self.probe = n_layers, alpha, threshold, probe
        self.stats = {m: [LayerStats() for _ in range(n_layers)] for m in MODELS}
        self.cosine = [0.0] * n_layers
        self.examples = 0

    @torch.no_grad()
    def add(self, models: dict[str, nn.Module], batch: dict[str, torch.Tensor]) -> None:
        """One batch through both models."""
        mask = batch["attention_mask"].bool()
        labels = batch["labels"]
        targets = labels[:, 1:]
        scored = targets != -100
        states = {}
        for name, model in models.items():
            # the LM head runs on the last position only: the probe applies it where it needs it
            kwargs = {"logits_to_keep": 1} if accepts_logits_to_keep(model) else {}
            hidden = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           output_hidden_states=True, use_cache=False, **kwargs).hidden_states
            if len(hidden) != self.n_layers:
                raise AssertionError(f"{name}: {len(hidden)} hidden states, expected {self.n_layers}")
            states[name] = hidden
            if self.probe:
                self._probe(name, model, hidden, scored, targets)
        for layer in range(self.n_layers):
            h = {name: states[name][layer].float() for name in MODELS}
            for name in MODELS:
                s = self.stats[name][layer]
                s.below += int((h[name].abs() < self.threshold)[mask].sum())
                s.entries += int(mask.sum()) * h[name].shape[-1]
                for i in range(len(mask)):
                    tokens = h[name][i][mask[i]]
                    s.prompt_entropy += metrics.gram_entropy(tokens, self.alpha)
                    s.curvature += metrics.curvature(tokens)
                    s.pooled.append(tokens.mean(0).double().cpu())
            self.cosine[layer] += sum(metrics.mean_cosine(h["base"][i][mask[i]], h["tuned"][i][mask[i]])
                                      for i in range(len(mask)))
        self.examples += int(mask.shape[0])

    def _probe(self, name: str, model: nn.Module, hidden: tuple, scored: torch.Tensor, targets: torch.Tensor) -> None:
        wanted = targets[scored]
        for layer, h in enumerate(hidden):
            logits = lens_logits(model, h[:, :-1][scored], last=layer == self.n_layers - 1)
            s = self.stats[name][layer]
            s.correct += int((logits.argmax(-1) == wanted).sum())
            s.loss += float(F.cross_entropy(logits, wanted, reduction="sum"))
            s.tokens += int(wanted.numel())

    def rows(self) -> list[dict]:
        """`metric, layer, mode, base, tuned, value` rows (value: tuned − base, or the alignment score)."""
        rows: list[dict] = []
        n = max(self.examples, 1)

        def pair(metric: str, mode: str, layer: int, base: float, tuned: float) -> None:
            rows.append({"metric": metric, "layer": layer, "mode": mode, "base": base, "tuned": tuned,
                         "value": tuned - base})

        for layer in range(self.n_layers):
            b, t = self.stats["base"][layer], self.stats["tuned"][layer]
            zb, zt = torch.stack(b.pooled), torch.stack(t.pooled)
            pair("prompt_entropy", "sample", layer, b.prompt_entropy / n, t.prompt_entropy / n)
            pair("curvature", "sample", layer, b.curvature / n, t.curvature / n)
            pair("dataset_entropy", "dataset", layer, metrics.gram_entropy(zb, self.alpha),
                 metrics.gram_entropy(zt, self.alpha))
            pair("effective_rank", "dataset", layer, metrics.effective_rank(zb), metrics.effective_rank(zt))
            pair("rank_deficiency", "dataset", layer, metrics.rank_deficiency(zb), metrics.rank_deficiency(zt))
            pair("sparsity", "dataset", layer, b.below / max(b.entries, 1), t.below / max(t.entries, 1))
            rows.append({"metric": "cka", "layer": layer, "mode": "alignment", "base": None, "tuned": None,
                         "value": metrics.linear_cka(zb, zt)})
            rows.append({"metric": "cosine", "layer": layer, "mode": "sample", "base": None, "tuned": None,
                         "value": self.cosine[layer] / n})
            rows.append({"metric": "mean_shift", "layer": layer, "mode": "dataset", "base": None, "tuned": None,
                         "value": metrics.mean_shift(zb, zt)})
            if self.probe:
                acc = [s.correct / max(s.tokens, 1) for s in (b, t)]
                ppl = [math.exp(min(s.loss / max(s.tokens, 1), 700)) for s in (b, t)]
                pair("logit_lens_acc", "probe", layer, *acc)
                pair("logit_lens_ppl", "probe", layer, *ppl)
        return rows
