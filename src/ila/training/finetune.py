"""`ila train`: fine-tune with LoRA, QLoRA, AdaLoRA or full fine-tuning under a training strategy.

data → model → strategy (`ila.training.strategies`: which layers train, and when) → HF Trainer → run folder::

    DIR/run.json           config, selection summary, cost, held-out loss (written last: the run finished)
    DIR/selection.json     trained layers (names, count, fraction); cross-model mapping when transferred
    DIR/adapter/           PEFT adapter (lora, qlora, adalora)      DIR/model/  full weights (safetensors)
    DIR/checkpoints/       Trainer checkpoints (resume with --resume)
    DIR/ranking.json       block importance learned during training (strategy ist)
    DIR/logs/              TensorBoard event files (report_to: tensorboard)

How layers are frozen or adapted: `ila.training.methods`.
Defaults follow seeds/000 App. B: AdamW β = (0.9, 0.99), weight decay 0.1, cosine, warmup 0.01, LoRA r = 32,
dropout 0.1.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import TrainerCallback, set_seed

from ila.config import TrainConfig, to_dict
from ila.data import build_dataset, collate, load_examples, split_train_heldout
from ila.distributed import is_main_process, shards_parameters, world_size
from ila.errors import IlaError
from ila.evaluation.heldout import heldout_loss as heldout_metrics
from ila.io import check_output_folder, write_json_atomic
from ila.layers import base_model_of, discover_layers
from ila.models import load_model, model_label
from ila.ranking import Ranking
from ila.selection import Selection, parse_select
from ila.training.cost import CostCallback, parameter_count
from ila.training.methods import DEFAULT_LR, quantization_config, trained_layer_names
from ila.training.strategies.base import Context, get_strategy
from ila.training.trainer import ResponseLossTrainer, resume_checkpoint, training_arguments


@dataclass
class TrainRun:
    """What `ila train` produced."""

    model: nn.Module
    selection: Selection
    cost: dict
    heldout_loss: float | None
    trainer: ResponseLossTrainer


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
    dataset = build_dataset(examples, tokenizer, max_length=config.max_length)
    train, heldout = split_train_heldout(dataset, heldout_fraction=config.heldout_fraction, seed=data_seed)

    set_seed(config.seed)
    strategy = get_strategy(config.strategy)
    plan = strategy.prepare(Context(config, config.options(), model, layers, rankings, train, collate(tokenizer)))
    model, selection = plan.model, plan.selection
    actually = trained_layer_names(model, layers)
    if actually != {x.name for x in selection.trained}:  # guards the promise that run folders state
        raise AssertionError(f"trained layers differ from the selection: {sorted(actually)[:3]}…")
    # measured before training: strategies that train different layers at different steps change requires_grad
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    in_layers = {id(p) for x in layers for p in base_model_of(model).get_submodule(x.name).parameters()}
    other_trained = any(p.requires_grad for p in base_model_of(model).parameters() if id(p) not in in_layers)
    out.mkdir(parents=True, exist_ok=True)
    main_process = is_main_process()  # under accelerate/torchrun only the main process writes files
    if main_process:
        write_json_atomic(out / "selection.json", selection.to_json())

    cost = CostCallback()
    callbacks: list[TrainerCallback] = [cost, *plan.callbacks]
    args = training_arguments(
        out / "checkpoints", max_steps=config.max_steps, batch_size=config.batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate or DEFAULT_LR[config.method], weight_decay=config.weight_decay,
        warmup_ratio=config.warmup_ratio, scheduler=config.scheduler, seed=config.seed,
        save_steps=config.save_steps, report_to=config.report_to,
        bf16=config.dtype == "bfloat16" and config.method != "qlora",
        gradient_checkpointing=config.gradient_checkpointing, find_unused_parameters=plan.sparse_steps,
    )
    trainer = ResponseLossTrainer(model=model, args=args, train_dataset=train, data_collator=collate(tokenizer),
                                  callbacks=callbacks, extra_loss=plan.extra_loss, logging_dir=out / "logs")
    trainer.train(resume_from_checkpoint=resume_checkpoint(out / "checkpoints", resume))
    heldout_loss = heldout_metrics(model, heldout, collate(tokenizer))["loss"] if len(heldout) else None

    weights = out / ("model" if config.method == "full" else "adapter")
    sharded = shards_parameters()
    if sharded:  # FSDP / ZeRO-3: the Trainer gathers the shards on every process; the main one writes
        trainer.save_model(str(weights))
    if not main_process:
        return TrainRun(model, selection, {}, heldout_loss, trainer)
    if sharded:
        (weights / "training_args.bin").unlink(missing_ok=True)  # a pickle the Trainer adds; run.json holds the config
    else:
        model.save_pretrained(weights)
    if config.method == "full":
        tokenizer.save_pretrained(weights)
    summary = {
        **cost.summary(None, trainer.state.num_input_tokens_seen),
        "trainable_params": trainable,
        "total_params": parameter_count(model),
        "trained_layers": len(selection.trained),
        "trained_layer_fraction": selection.fraction,
        "other_params_trained": other_trained,
        "total_s": time.perf_counter() - started,
    }
    meta = {"model": model_label(config.model), "data": config.data or "default", "method": config.method,
            "strategy": config.strategy, "select": config.select, "seed": config.seed, "processes": world_size()}
    if plan.finish is not None:
        plan.finish(out, meta)
    write_json_atomic(out / "run.json", {
        **meta, "steps": trainer.state.global_step, "heldout_loss": heldout_loss, "cost": summary,
        **({"strategy_record": plan.record()} if plan.record is not None else {}), "config": to_dict(config),
    })
    return TrainRun(model, selection, summary, heldout_loss, trainer)
