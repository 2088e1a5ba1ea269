"""ILA stage 1 (seeds/000 Alg. 1, loop body): fine-tune until the loss is ε-stable (Def. 1).

The result is the *update* that update-based importance methods score (ILA's stage 2 among them):
LoRA (default): a PEFT adapter on the chosen linear layers, ΔWᵢ = β·Bᵢ·Aᵢ (Eq. 4).
Full fine-tuning: the chosen linear layers train, everything else stays at θ₀, so ΔW = θ_t − θ₀ (Obs. 2) is
exactly the set of updates stage 2 gates. θ₀ of those layers is kept.
An update can also be loaded from a trained PEFT LoRA adapter (`load_adapter`), and is saved to the run
folder as `adapter/` (LoRA) or `delta.safetensors` (full) by `save_update`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from peft import get_peft_model
from safetensors.torch import save_file
from torch import nn
from transformers import TrainerCallback

from ila.adapters import load_lora_adapter
from ila.config import IdentifyConfig
from ila.distributed import full_weights, is_main_process, whole
from ila.errors import IlaError
from ila.importance.stability import StabilityCallback, StabilityDetector
from ila.layers import LayerId, base_model_of
from ila.training import CostCallback, ResponseLossTrainer, training_arguments
from ila.training.lora import lora_config
from ila.training.trainer import resume_checkpoint


@dataclass
class Update:
    """A fine-tuned model and the per-layer updates it carries."""

    model: nn.Module  # a PeftModel (LoRA) or the fine-tuned transformers model (full)
    layers: list[LayerId]  # the layers that carry an update
    initial: dict[str, dict[str, torch.Tensor]] | None = None  # θ₀ per layer name (full fine-tuning only)

    def delta(self, layer: LayerId) -> torch.Tensor:
        """ΔW of `layer`'s weight, in the weight's layout: β·B·A (LoRA, Eq. 4) or θ_t − θ₀ (full)."""
        module = base_model_of(self.model).get_submodule(layer.name)
        with full_weights(module):
            if self.initial is not None:
                weight = whole(module.weight.detach())
                return weight - self.initial[layer.name]["weight"].to(weight.device)
            return whole(module.get_delta_weight("default").detach())

    def base_weight(self, layer: LayerId) -> torch.Tensor:
        """W₀ of `layer`'s weight."""
        module = base_model_of(self.model).get_submodule(layer.name)
        if self.initial is not None:
            return self.initial[layer.name]["weight"]
        with full_weights(module):
            return whole(module.get_base_layer().weight.detach()).clone()


@dataclass
class Stage1Result:
    """The fine-tuned model and what stage 1 measured."""

    model: nn.Module  # a PeftModel (LoRA) or the fine-tuned transformers model (full)
    initial: dict[str, dict[str, torch.Tensor]] | None  # θ₀ per layer name (full fine-tuning only)
    stability_step: int | None  # step where the loss became ε-stable; None if max_steps came first
    steps: int
    losses: list[float]
    probe_losses: list[tuple[int, float]]  # (step, estimate of E_z[L]) at each stability check
    cost: dict[str, float]
    cost_steps_ms: list[float]  # wall time of every optimizer step
    milestones: list[tuple[float, int, dict[str, torch.Tensor]]] = field(default_factory=list)
    tracked: dict[str, TrainerCallback] = field(default_factory=dict)  # the `trackers`' callbacks, by name


class _MilestoneCallback(TrainerCallback):
    """Snapshots the trainable weights at given steps (rankings at training milestones, Table 4)."""

    def __init__(self, model: nn.Module, steps: dict[int, float]) -> None:
        self.model = model
        self.steps = steps
        self.snapshots: list[tuple[float, int, dict[str, torch.Tensor]]] = []

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step in self.steps:
            weights = {n: p.detach().cpu().clone() for n, p in self.model.named_parameters() if p.requires_grad}
            self.snapshots.append((self.steps[state.global_step], state.global_step, weights))


def prepare_lora(model: nn.Module, layers: list[LayerId], config: IdentifyConfig) -> nn.Module:
    """Wrap `model` in a PEFT LoRA adapter on exactly `layers`."""
    return get_peft_model(model, lora_config(config.lora, [layer.name for layer in layers]))


def prepare_full(model: nn.Module, layers: list[LayerId]) -> dict[str, dict[str, torch.Tensor]]:
    """Train only `layers` (weights and biases); return their θ₀."""
    base = base_model_of(model)
    for p in base.parameters():
        p.requires_grad_(False)
    initial = {}
    for layer in layers:
        module = base.get_submodule(layer.name)
        with full_weights(module):  # θ₀ whole, also where an engine shards the parameters
            initial[layer.name] = {n: whole(p.detach()).clone() for n, p in module.named_parameters(recurse=False)}
        for p in module.parameters(recurse=False):
            p.requires_grad_(True)
    return initial


def run_stage1(
    model: nn.Module,
    layers: list[LayerId],
    train_dataset,
    collator,
    config: IdentifyConfig,
    work_dir: Path,
    *,
    probe_dataset=None,
    resume: bool = False,
    trackers: dict[str, Callable] | None = None,
) -> Stage1Result:
    """Train LoRA or the full layers until ε-stable (or `stage1.max_steps`); checkpoints go to `work_dir`.

    `probe_dataset` (held-out examples) estimates the expected loss for the stability test; without it the
    test uses the smoothed training loss (see `ila.importance.stability`). `trackers[name](model, layers)` makes
    a callback that watches the training (an importance method's `track`); they come back in `tracked`.
    """
    s1 = config.stage1
    initial = None
    if s1.update == "lora":
        model = prepare_lora(model, layers, config)
    else:
        initial = prepare_full(model, layers)
    detector = StabilityDetector(s1.epsilon, s1.patience, s1.min_steps)
    probe = None
    if probe_dataset is not None and len(probe_dataset) and s1.probe_examples:  # a seeded sample of E_z
        from ila.data import seeded_subset
        probe = seeded_subset(probe_dataset, s1.probe_examples, config.sample_seed)
    stability = StabilityCallback(detector, use_probe=probe is not None, interval=s1.interval,
                                  smoothing=s1.smoothing)
    cost = CostCallback()
    milestone_steps = milestone_schedule(s1.milestones, s1.max_steps)
    milestones = _MilestoneCallback(model, milestone_steps)
    tracked = {name: make(model, layers) for name, make in (trackers or {}).items()}
    args = training_arguments(
        work_dir,
        max_steps=s1.max_steps,
        batch_size=s1.batch_size,
        gradient_accumulation_steps=s1.gradient_accumulation_steps,
        learning_rate=s1.learning_rate,
        weight_decay=s1.weight_decay,
        warmup_ratio=s1.warmup_ratio,
        seed=config.seed,
        save_steps=s1.save_steps,
        report_to=config.report_to,
        bf16=config.dtype == "bfloat16",
        eval_steps=s1.interval if probe is not None else None,
    )
    trainer = ResponseLossTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=probe,
        data_collator=collator,
        callbacks=[stability, cost, milestones, *tracked.values()],
        logging_dir=work_dir.parent / "logs" / "stage1",
    )
    trainer.train(resume_from_checkpoint=resume_checkpoint(work_dir, resume))
    model.eval()
    return Stage1Result(
        model=model,
        initial=initial,
        stability_step=detector.fired_at,
        steps=trainer.state.global_step,
        losses=[e["loss"] for e in trainer.state.log_history if "loss" in e],
        probe_losses=list(detector.history),
        cost=cost.summary(model, trainer.state.num_input_tokens_seen),
        cost_steps_ms=list(cost.step_ms),
        milestones=milestones.snapshots,
        tracked=tracked,
    )


def milestone_schedule(fractions: list[float], max_steps: int) -> dict[int, float]:
    """Step of each milestone fraction of `max_steps`; two fractions on one step are an error."""
    steps: dict[int, float] = {}
    for f in sorted(set(fractions)):
        step = max(1, round(f * max_steps))
        if step in steps:
            raise IlaError(f"stage1.milestones: {steps[step]:g} and {f:g} both fall on step {step} of {max_steps}")
        steps[step] = f
    return steps


def save_update(update: Update, out: Path) -> None:
    """Stage-1 adapter (`out/adapter/`, LoRA) or ΔW = θ_t − θ₀ of the updated layers (`out/delta.safetensors`);
    call it on every process, the main one writes."""
    if update.initial is None:
        lora = [p for n, p in update.model.named_parameters() if "lora_" in n]
        with full_weights(lora):  # every process gathers; the main one writes
            state = {k: whole(v).detach().cpu().clone() for k, v in update.model.state_dict().items() if "lora_" in k}
        update.model.save_pretrained(out / "adapter", state_dict=state, is_main_process=is_main_process())
        return
    base = base_model_of(update.model)
    delta = {}
    for layer in update.layers:
        module = base.get_submodule(layer.name)
        with full_weights(module):
            for pname, p in module.named_parameters(recurse=False):
                value = whole(p.detach())
                delta[f"{layer.name}.{pname}"] = (value - update.initial[layer.name][pname].to(value.device)).cpu()
    if is_main_process():  # every process gathers (a collective under ZeRO-3); the main one writes
        save_file(delta, str(out / "delta.safetensors"))


def load_adapter(model: nn.Module, layers: list[LayerId], adapter: str | Path) -> Update:
    """A trained PEFT LoRA adapter for `model` as an `Update` on the layers it adapts (see
    `ila.adapters.load_lora_adapter` for what is refused); an untrained adapter is refused too."""
    peft_model = load_lora_adapter(model, adapter)
    base = base_model_of(peft_model)
    adapted = [layer for layer in layers if hasattr(base.get_submodule(layer.name), "lora_B")]
    if not adapted:
        raise IlaError(f"adapter {adapter}: adapts none of the model's linear layers")
    if all(not torch.any(p) for n, p in peft_model.named_parameters() if "lora_B" in n):
        raise IlaError(f"adapter {adapter}: is untrained (every lora_B is zero), so no layer's update can be scored")
    return Update(peft_model, adapted)
