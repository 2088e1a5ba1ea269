"""`ila train`: fine-tune a selection of linear layers with LoRA, QLoRA, AdaLoRA or full fine-tuning.

data → model → selection (ila.selection) → method → HF Trainer → run folder::

    DIR/run.json           config, selection summary, cost, held-out loss (written last: the run finished)
    DIR/selection.json     trained layers (names, count, fraction); cross-model mapping when transferred
    DIR/adapter/           PEFT adapter (lora, qlora, adalora)      DIR/model/  full weights (safetensors)
    DIR/checkpoints/       Trainer checkpoints (resume with --resume)

"Frozen" means: no adapter on that layer (adapter methods), or `requires_grad=False` on its weight and bias
(full fine-tuning), so neither gradients nor optimizer state are ever allocated for it. Full fine-tuning of a
selection that names what trains (`top`, `names`) also freezes embeddings, norms and the LM head; see
`train_other_params`.
Defaults follow seeds/000 App. B: AdamW β = (0.9, 0.99), weight decay 0.1, cosine, warmup 0.01, LoRA r = 32,
dropout 0.1.
"""

from __future__ import annotations

import importlib.util
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback, set_seed

from ila.config import TrainConfig, to_dict
from ila.data import build_dataset, collate, load_examples, split_train_heldout
from ila.errors import IlaError
from ila.evaluation.heldout import heldout_loss as heldout_metrics
from ila.io import check_output_folder, write_json_atomic
from ila.layers import LayerId, base_model_of, discover_layers
from ila.models import load_model, model_label
from ila.ranking import Ranking
from ila.selection import Selection, parse_select, select_layers
from ila.training.cost import CostCallback, parameter_count
from ila.training.lora import lora_config
from ila.training.trainer import ResponseLossTrainer, last_complete_checkpoint, training_arguments

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


@dataclass
class TrainRun:
    """What `ila train` produced."""

    model: nn.Module
    selection: Selection
    cost: dict
    heldout_loss: float | None
    trainer: ResponseLossTrainer


def quantization_config(dtype: torch.dtype):
    """bitsandbytes 4-bit NF4 (QLoRA); a one-line error naming the extra when bitsandbytes is missing."""
    if importlib.util.find_spec("bitsandbytes") is None:
        raise IlaError("method qlora needs bitsandbytes: pip install 'ila[qlora]' (or: pip install bitsandbytes)")
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=dtype)


def apply_method(model: nn.Module, selection: Selection, config: TrainConfig) -> nn.Module:
    """Make exactly the selected linear layers trainable with `config.method`; returns the model to train."""
    names = [x.name for x in selection.trained]
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
        peft_config = lora_config(config.lora, names)
    return get_peft_model(model, peft_config)


TRAIN_ONLY = ("top", "names")  # strategies that name what trains; the others name what is frozen


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


def trained_layer_names(model: nn.Module, layers: list[LayerId]) -> set[str]:
    """Layers whose parameters (weight/bias or adapter) require gradients: what training actually updates."""
    base = base_model_of(model)
    return {x.name for x in layers if any(p.requires_grad for p in base.get_submodule(x.name).parameters())}


def run_train(config: TrainConfig, out: str | Path, *, resume: bool = False) -> TrainRun:
    """Fine-tune and write the run folder `out`."""
    config.validate()
    out = Path(out)
    if resume and config.method == "adalora":
        raise IlaError("--resume is not supported for method adalora (its rank allocation is not checkpointed); "
                       "start a new run")
    check_output_folder(out, "run.json", resume=resume)
    parse_select(config.select)
    rankings = []
    for path in config.rankings:
        ranking = Ranking.load(path)
        ranking.metadata["source"] = f"ranking {path}"
        rankings.append(ranking)
    dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
    quant = quantization_config(dtype) if config.method == "qlora" else None
    started = time.perf_counter()
    set_seed(config.seed)
    data_seed = config.seed if config.data_seed is None else config.data_seed
    examples = load_examples(config.data, max_examples=config.max_examples, seed=data_seed)
    model, tokenizer = load_model(config.model, quantization_config=quant)
    layers = discover_layers(model)
    seed = config.seed if config.select_seed is None else config.select_seed
    selection = select_layers(config.select, layers, rankings, seed=seed, transfer=config.transfer)
    dataset = build_dataset(examples, tokenizer, max_length=config.max_length)
    train, heldout = split_train_heldout(dataset, heldout_fraction=config.heldout_fraction, seed=data_seed)

    set_seed(config.seed)
    model = apply_method(model, selection, config)
    actually = trained_layer_names(model, layers)
    if actually != {x.name for x in selection.trained}:  # guards the promise that run folders state
        raise AssertionError(f"trained layers differ from the selection: {sorted(actually)[:3]}…")
    out.mkdir(parents=True, exist_ok=True)
    main_process = int(os.environ.get("RANK", "0")) == 0  # under accelerate/torchrun only rank 0 writes files
    if main_process:
        write_json_atomic(out / "selection.json", selection.to_json())

    cost = CostCallback()
    callbacks: list[TrainerCallback] = [cost]
    if config.method == "adalora":
        callbacks.append(AdaLoraAllocationCallback(model))
    args = training_arguments(
        out / "checkpoints", max_steps=config.max_steps, batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate or DEFAULT_LR[config.method], weight_decay=config.weight_decay,
        warmup_ratio=config.warmup_ratio, scheduler=config.scheduler, seed=config.seed,
        save_steps=config.save_steps, report_to=config.report_to,
        bf16=config.dtype == "bfloat16" and config.method != "qlora",
    )
    extra = (lambda: adalora_orthogonality(model)) if config.method == "adalora" else None
    trainer = ResponseLossTrainer(model=model, args=args, train_dataset=train, data_collator=collate(tokenizer),
                                  callbacks=callbacks, extra_loss=extra)
    trainer.train(resume_from_checkpoint=last_complete_checkpoint(out / "checkpoints") if resume else None)
    heldout_loss = heldout_metrics(model, heldout, collate(tokenizer))["loss"] if len(heldout) else None

    if not main_process:
        return TrainRun(model, selection, {}, heldout_loss, trainer)
    if config.method == "full":
        model.save_pretrained(out / "model")
        tokenizer.save_pretrained(out / "model")
    else:
        model.save_pretrained(out / "adapter")
    summary = {
        **cost.summary(model, trainer.state.num_input_tokens_seen),
        "total_params": parameter_count(model),
        "trained_layers": len(selection.trained),
        "trained_layer_fraction": selection.fraction,
        "other_params_trained": train_other_params(config),
        "total_s": time.perf_counter() - started,
    }
    write_json_atomic(out / "run.json", {
        "model": model_label(config.model), "data": config.data or "default", "method": config.method,
        "select": config.select, "seed": config.seed, "steps": trainer.state.global_step,
        "heldout_loss": heldout_loss, "cost": summary, "config": to_dict(config),
    })
    return TrainRun(model, selection, summary, heldout_loss, trainer)
