"""How a fine-tune makes layers trainable: LoRA, QLoRA, AdaLoRA adapters (PEFT) or full fine-tuning.

"Frozen" means: no adapter on that layer (adapter methods), or `requires_grad=False` on its weight and bias
(full fine-tuning), so neither gradients nor optimizer state are ever allocated for it. Full fine-tuning of a
selection that names what trains (`top`, `names`) also freezes embeddings, norms and the LM head; see
`train_other_params`.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from ila.config import TrainConfig
from ila.errors import IlaError
from ila.layers import LayerId, base_model_of, discover_layers
from ila.selection import parse_select
from ila.training.lora import lora_config

DEFAULT_LR = {"lora": 2e-4, "qlora": 2e-4, "adalora": 2e-4, "full": 1e-5}


def adalora_orthogonality(model: nn.Module, adapter: str = "default") -> torch.Tensor:
    """AdaLoRA's regulariser orth_reg_weight · mean ‖PPᵀ − I‖_F over its A and B matrices.

    PEFT adds it inside `AdaLoraModel.forward` only when the model computes the loss from `labels`; the
    response-only loss here does not pass labels, so the term is added the same way from outside.
    """
    weight = model.peft_config[adapter].orth_reg_weight
    terms = []
    for name, p in model.named_parameters():
        if ("lora_A" in name or "lora_B" in name) and adapter in name and p.numel():
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov - torch.eye(*cov.shape, device=cov.device, dtype=cov.dtype)))
    return weight * torch.stack(terms).mean() if terms else torch.zeros(())


class AdaLoraAllocationCallback(TrainerCallback):
    """Calls PEFT's `update_and_allocate` after every optimizer step (before gradients are zeroed)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.model.base_model.update_and_allocate(state.global_step)


def quantization_config(dtype: torch.dtype):
    """bitsandbytes 4-bit NF4 (QLoRA); a one-line error naming the extra when bitsandbytes is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise IlaError("method qlora needs bitsandbytes: pip install 'ila[qlora]' (or: pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def apply_method(model: nn.Module, names: Sequence[str], config: TrainConfig, lora=None) -> nn.Module:
    """Make exactly the linear layers `names` trainable with `config.method`; returns the model to train.
    `lora` (an `ila.config.LoraConfig`) replaces `config.lora` for the adapter's rank, alpha and dropout."""
    names = list(names)
    if config.method == "full":
        base = base_model_of(model)
        for p in base.parameters():
            p.requires_grad_(train_other_params(config))
        for name in {x.name for x in discover_layers(model)}:
            for p in base.get_submodule(name).parameters():
                p.requires_grad_(name in names)
        return model
    from peft import AdaLoraConfig, get_peft_model, prepare_model_for_kbit_training

    if config.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    if config.method == "adalora":
        a = config.adalora
        peft_config = AdaLoraConfig(
            init_r=a.init_r, target_r=a.target_r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
            target_modules=names, total_step=config.max_steps, tinit=int(a.tinit * config.max_steps),
            tfinal=int(a.tfinal * config.max_steps), deltaT=a.delta_t, task_type="CAUSAL_LM",
        )
    else:
        peft_config = lora_config(lora or config.lora, names)
    return get_peft_model(model, peft_config)


TRAIN_ONLY = ("top", "names")  # selections that name what trains; the others name what is frozen


def train_other_params(config: TrainConfig) -> bool:
    """Whether full fine-tuning also trains embeddings, norms and the LM head.

    `train_other` decides when set. By default they train when the selection freezes some layers (`all`,
    `freeze-bottom`, `random`, `first`, `last`, `intersect`: the rest of the model trains as usual) and stay
    frozen when it names the layers to train (`top`, `names`: only those train, as in Table 11's top 30 %).
    """
    if config.method != "full":
        return False
    if config.train_other is not None:
        return config.train_other
    return parse_select(config.select)[0] not in TRAIN_ONLY


def trained_layer_names(model: nn.Module, layers: Sequence[LayerId]) -> set[str]:
    """Layers whose parameters (weight/bias or adapter) require gradients: what training actually updates."""
    base = base_model_of(model)
    return {x.name for x in layers if any(p.requires_grad for p in base.get_submodule(x.name).parameters())}
