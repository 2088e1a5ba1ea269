"""ila inside a user's own training script (HF `Trainer`, TRL `SFTTrainer`, accelerate).

    plan = ila.prepare_strategy("lisa", model, lisa_layers=2, lisa_interval=20)
    trainer = SFTTrainer(model=plan.model, args=SFTConfig(..., ddp_find_unused_parameters=plan.sparse_steps),
                         train_dataset=data, callbacks=plan.callbacks)

    train, _ = ila.load_data("train.jsonl", tokenizer)
    ranking = ila.rank_update(peft_model, train, collator=collate(tokenizer))  # ILA stage 2 on your adapter
    lora = ila.peft_config(ranking, select="top:0.3")                          # then train only the top 30 %

Both reuse what `ila train` and `ila identify` run: a strategy's `prepare` (its Trainer callbacks) and an
importance method's `score`, chosen by name from their registries. See docs/integration.md and examples/.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from ila.errors import IlaError

SELECTION_OPTIONS = {"select", "transfer", "train_other", "select_seed"}  # TrainConfig keys a strategy reads


def prepare_strategy(name: str, model: Any, *, method: str | None = None, rankings: list | tuple = (),
                     train: Any = None, collator: Any = None, seed: int = 0, **options: Any) -> Any:
    """Make `model` trainable the way training strategy `name` does and return its `Plan`: `plan.model` (PEFT-
    wrapped for LoRA methods), `plan.callbacks` for your Trainer, `plan.sparse_steps` (pass it as
    `ddp_find_unused_parameters`), `plan.extra_loss` (None, or a term your loss must add once per step).

    `method`: the strategy's training method (default: its first, e.g. full for lisa, lora for midblock);
    `options`: the strategy's options by their `ila train` keyword names (`lisa_layers`, `segments`, ...;
    `ila.train_options()`), and for selection `select`, `transfer`, `train_other`, `select_seed`; `rankings`:
    Ranking objects for strategies that read one; `train`/`collator`: tokenised examples (input_ids, labels) and
    their collator, for strategies that evaluate on data (ist).
    """
    from ila.api import check_options, train_options
    from ila.config import TrainConfig, load_config
    from ila.layers import discover_layers
    from ila.training.strategies.base import Context, get_strategy

    strategy = get_strategy(name)
    allowed = train_options()
    check_options(f"strategy {name}", options,
                  sorted({k for k, v in allowed.items() if v.startswith(f"{name}.")} | SELECTION_OPTIONS))
    overrides = {"strategy": name, "method": method or strategy.methods[0], "seed": seed,
                 **{allowed[k]: v for k, v in options.items()}}
    if rankings:  # files are what the config checks; the objects reach the strategy through the context
        overrides["rankings"] = [str(r.metadata.get("source", "ranking")) for r in rankings]
    config = load_config(None, overrides, TrainConfig)
    if strategy.needs_ranking(config, config.options()) and not rankings:
        raise IlaError(f"strategy {name}: with these options it reads a ranking; pass rankings=[ranking]")
    if strategy.needs_data and (train is None or collator is None):
        raise IlaError(f"strategy {name}: evaluates on data; pass train= (tokenised examples with input_ids and "
                       "labels, e.g. ila.load_data(...)[0]) and collator=")
    return strategy.prepare(Context(config, config.options(), model, discover_layers(model), list(rankings),
                                    train, collator))


def rank_update(model: Any, train: Any, *, collator: Any, method: str = "ila", heldout: Any = None, seed: int = 0,
                work_dir: str | Path | None = None, **options: Any) -> Any:
    """Rank the layers a trained PEFT LoRA `model` adapts with an update-based importance method (ILA's stage 2 by
    default: gates learned on the frozen adapter, seeds/000 Sec. 3) on tokenised examples `train` (a Dataset with
    input_ids and labels, e.g. `ila.load_data(...)`'s train split) batched by `collator` (e.g.
    `ila.data.collate(tokenizer)`). `options` are the method's options by their
    `ila identify` keyword names (`stage2_steps`, `budget`, ...). Returns a `Ranking`; the model is left as it was.
    """
    from ila.api import check_options, identify_options
    from ila.config import IdentifyConfig, load_config
    from ila.importance.base import NEEDS_UPDATE, Inputs, get_method
    from ila.importance.job import make_ranking, package_versions
    from ila.importance.stage1 import Update
    from ila.layers import base_model_of, discover_layers

    chosen = get_method(method)
    if NEEDS_UPDATE not in chosen.needs or chosen.needs_training():
        raise IlaError(f"rank_update: method {method!r} does not score a finished update (try ila, ila-fast, "
                       "update-norm)")
    allowed = identify_options()
    check_options("rank_update", options, allowed)
    config = load_config(None, {"method": method, "seed": seed, **{allowed[k]: v for k, v in options.items()}},
                         IdentifyConfig)
    base = base_model_of(model)
    layers = [x for x in discover_layers(base) if hasattr(base.get_submodule(x.name), "lora_B")]
    if not layers:
        raise IlaError("rank_update: the model carries no LoRA adapter (wrap it with peft and train it first)")
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    with tempfile.TemporaryDirectory(dir=work_dir) as scratch:  # Trainer output and logs, removed afterwards
        inputs = Inputs(config=config, options=config.options(method), layers=layers, model=model,
                        train=train, heldout=heldout, collator=collator, update=Update(model, layers),
                        work_dir=Path(scratch) / "work")
        try:
            scored = chosen.score(inputs)
        finally:  # stage 2 freezes every parameter; the user's model trains again as before
            for name, p in model.named_parameters():
                p.requires_grad_(trainable[name])
            model.train(was_training)
    meta = {"model": getattr(getattr(base, "config", None), "_name_or_path", "") or "in memory", "seed": seed,
            "ranked_layers": len(layers), "source": "ila.rank_update", "versions": package_versions()}
    return make_ranking(chosen, inputs, scored, meta)
