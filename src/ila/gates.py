"""The per-layer gate σ(sᵢ) over a layer's update ΔWᵢ (ILA, seeds/000 Sec. 3, Eq. 5–6).

    θᵢ = θ₀ᵢ + σ(sᵢ) · ΔWᵢ

One mechanism serves every update kind:
- a PEFT LoRA layer (ΔW = β·B·A, Eq. 4): the gate multiplies the input of `lora_B` (σ·B(Ax) = B(σ·Ax), so
  the product is taken on the rank-r activation instead of the layer's output width), or its output when
  `lora_B` has a bias;
- a fully fine-tuned layer (ΔW = θ_t − θ₀, Obs. 2): the layer is affine in its parameters, so
  f(x; θ₀ + g·ΔW) = f(x; θ₀) + g·(f(x; θ_t) − f(x; θ₀)), computed from a kept copy of θ₀.

PEFT has no public differentiable per-module scale, so the gate is a hook on `lora_B` (a forward pre-hook, or
a forward hook when it has a bias; PEFT's own `scaling` is applied after `lora_B`, so it composes exactly).
A merged LoRA layer would skip the hook and a LoRA variant (DoRA) changes what ΔW is: `attach_lora` refuses both.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from torch.func import functional_call

from ila.errors import IlaError
from ila.layers import LayerId, base_model_of

__all__ = ["LayerGates"]


class LayerGates(nn.Module):
    """One learnable score sᵢ per layer; `gates()` = σ(s). Attach to a model to scale each layer's update."""

    def __init__(self, layers: Sequence[LayerId], init_score: float = 4.0) -> None:
        super().__init__()
        if not layers:
            raise IlaError("no layers to gate")
        self.layers: list[LayerId] = list(layers)
        self.scores = nn.Parameter(torch.full((len(self.layers),), float(init_score)))
        self._override: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._initial: dict[str, dict[str, torch.Tensor]] = {}
        self._computing_base = False

    def gates(self) -> torch.Tensor:
        """σ(s), or the fixed values set by `fixed(...)`."""
        return self._override if self._override is not None else torch.sigmoid(self.scores)

    def gate(self, index: int) -> torch.Tensor:
        """σ(s_index) alone (what each hook needs), or its fixed value."""
        return self._override[index] if self._override is not None else torch.sigmoid(self.scores[index])

    @contextmanager
    def fixed(self, values: float | torch.Tensor) -> Iterator[None]:
        """Temporarily replace σ(s) by fixed gate values (a scalar or one value per layer)."""
        value = torch.as_tensor(values, dtype=self.scores.dtype, device=self.scores.device)
        self._override = value.expand(len(self.layers)).clone()
        try:
            yield
        finally:
            self._override = None

    # -- attaching -------------------------------------------------------------------------------------------

    def attach(self, model: nn.Module, initial: Mapping[str, Mapping[str, torch.Tensor]] | None = None) -> LayerGates:
        """Gate a stage-1 update: the LoRA branches of a PEFT model, or with `initial` (θ₀ per layer) the full
        update θ_t − θ₀."""
        return self.attach_lora(model) if initial is None else self.attach_full(model, initial)

    def attach_lora(self, model: nn.Module, adapter_name: str = "default") -> LayerGates:
        """Gate the LoRA branch of every layer in `self.layers` of a PEFT model."""
        self.detach()
        base = base_model_of(model)
        for index, layer in enumerate(self.layers):
            module = _get(base, layer.name)
            lora_b = getattr(module, "lora_B", None)
            if lora_b is None or adapter_name not in lora_b:
                raise IlaError(f"layer {layer.name}: has no LoRA adapter {adapter_name!r} to gate")
            if getattr(module, "merged", False):
                raise IlaError(f"layer {layer.name}: LoRA weights are merged; unmerge before gating")
            variant = getattr(module, "lora_variant", {}).get(adapter_name)
            if variant is not None:  # e.g. DoRA rescales W + ΔW as a whole: the update is no longer β·B·A
                raise IlaError(f"layer {layer.name}: LoRA variant {type(variant).__name__} cannot be gated (the gate "
                               "assumes ΔW = β·B·A)")
            b = lora_b[adapter_name]
            if getattr(b, "bias", None) is None:
                self._handles.append(b.register_forward_pre_hook(self._scale_input_hook(index)))
            else:
                self._handles.append(b.register_forward_hook(self._scale_hook(index)))
        return self

    def attach_full(self, model: nn.Module, initial: Mapping[str, Mapping[str, torch.Tensor]]) -> LayerGates:
        """Gate the full update θ_t − θ₀ of every layer; `initial[name]` holds that layer's θ₀ tensors."""
        self.detach()
        base = base_model_of(model)
        for index, layer in enumerate(self.layers):
            if layer.name not in initial:
                raise IlaError(f"layer {layer.name}: no initial weights θ₀ given for its full update")
            module = _get(base, layer.name)
            self._initial[layer.name] = {k: v.detach() for k, v in initial[layer.name].items()}
            self._handles.append(module.register_forward_hook(self._delta_hook(index, layer.name)))
        return self

    def detach(self) -> None:
        """Remove every hook this object registered."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._initial.clear()

    # -- hooks -----------------------------------------------------------------------------------------------

    def _scale_input_hook(self, index: int):
        def hook(_module: nn.Module, inputs: tuple) -> tuple:
            return (inputs[0] * self.gate(index).to(inputs[0].dtype), *inputs[1:])

        return hook

    def _scale_hook(self, index: int):
        def hook(_module: nn.Module, _inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            return output * self.gate(index).to(output.dtype)

        return hook

    def _delta_hook(self, index: int, name: str):
        def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> torch.Tensor:
            if self._computing_base:  # the f(x; θ₀) call below runs this hook again
                return output
            initial = self._initial[name]
            if any(v.device != output.device for v in initial.values()):  # once: θ₀ follows the model's device
                initial = self._initial[name] = {k: v.to(output.device) for k, v in initial.items()}
            self._computing_base = True
            try:
                base_output = functional_call(module, initial, inputs)
            finally:
                self._computing_base = False
            gate = self.gate(index).to(output.dtype)
            return base_output + gate * (output - base_output)

        return hook


def _get(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError as exc:
        raise IlaError(f"layer {name}: not found in model {type(model).__name__}") from exc
