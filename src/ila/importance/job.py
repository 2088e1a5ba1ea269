"""The identify job: data → model → (stage-1 update) → importance method → ranking → run folder.

Any registered importance method (`ila.importance.base`) runs through here; the method declares what it
needs and this job prepares exactly that.

Run folder::

    DIR/ranking.json       scores and metadata (written last: its presence means the run finished)
    DIR/heatmap.png        scores per (role, block), top 75 % marked
    DIR/adapter/           the stage-1 PEFT LoRA adapter (methods that use an update; LoRA stage 1)
    DIR/delta.safetensors  the stage-1 update θ_t − θ₀ of the ranked layers (full stage 1)
    DIR/milestones/        ranking_<fraction>.json per stage-1 milestone, when asked for
    DIR/checkpoints/       Trainer checkpoints of stage 1 (for --resume)
"""

from __future__ import annotations

import logging
import math
import platform
import shutil
import time
from dataclasses import dataclass
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from ila.config import IdentifyConfig, to_dict
from ila.errors import IlaError
from ila.importance.base import NEEDS_DATA, ImportanceMethod, Inputs, Scores, get_method
from ila.io import check_output_folder
from ila.layers import LayerId
from ila.ranking import Ranking

log = logging.getLogger(__name__)

PACKAGES = ("ila", "torch", "transformers", "peft", "accelerate", "datasets")
NEAR_TIE_CUT = 0.75  # the top fraction whose boundary the near-tie count looks at (seeds/000 Sec. 4.2)


def package_versions() -> dict[str, str]:
    """Versions of the packages a ranking depends on, for run metadata."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = importlib_metadata.version(name)
        except importlib_metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


@dataclass
class Loaded:
    """Model, data and layers as every method sees them (the adapter applied when one is given)."""

    model: Any
    tokenizer: Any
    layers: list[LayerId]
    linear_layers: int  # every linear layer of the model, ranked or not
    train: Any
    heldout: Any
    collator: Any
    update: Any  # stage1.Update from --adapter, or None


def load_inputs(config: IdentifyConfig, *, with_data: bool = True) -> Loaded:
    """Load the model (+ `config.adapter`) and discover the layers; with `with_data`, load the examples and split
    them by the seed (else `train`/`heldout` are empty lists)."""
    from transformers import set_seed

    from ila.data import build_dataset, collate, load_examples, split_train_heldout
    from ila.importance import stage1
    from ila.layers import discover_layers
    from ila.models import load_model

    set_seed(config.seed)
    examples = load_examples(config.data, max_examples=config.max_examples, seed=config.seed) if with_data else []
    model, tokenizer = load_model(config.model, trust_remote_code=False)  # after the data: bad data fails fast
    layers = discover_layers(model, config.lora.target_roles)
    linear_layers = len(discover_layers(model))
    update = stage1.load_adapter(model, layers, config.adapter) if config.adapter else None
    if update is not None:
        model, layers = update.model, update.layers
    train, heldout = [], []
    if with_data:
        dataset = build_dataset(examples, tokenizer, max_length=config.max_length)
        train, heldout = split_train_heldout(dataset, heldout_fraction=config.heldout_fraction, seed=config.seed)
    return Loaded(model, tokenizer, layers, linear_layers, train, heldout, collate(tokenizer), update)


def run_identify(config: IdentifyConfig, out: str | Path, *, resume: bool = False) -> Ranking:
    """Rank the linear layers of `config.model` for fine-tuning on `config.data` with `config.method`; write
    the run folder `out`."""
    from transformers import set_seed

    from ila.data import DEFAULT_DATA
    from ila.importance import stage1
    from ila.models import model_label
    from ila.report import plot_heatmap

    config.validate()
    method = get_method(config.method)
    out = Path(out)
    _check_method_inputs(config, method, resume)
    check_output_folder(out, "ranking.json", resume=resume)
    started = time.perf_counter()
    # data is read when the method uses it, or to train the stage-1 update it needs
    with_data = NEEDS_DATA in method.needs or (method.needs_update() and not config.adapter)
    loaded = load_inputs(config, with_data=with_data)
    model, layers, update = loaded.model, loaded.layers, loaded.update
    train, heldout, collator = loaded.train, loaded.heldout, loaded.collator
    linear_layers = loaded.linear_layers
    timings: dict[str, float] = {"load_s": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    options = config.options()
    meta: dict = {
        "model": model_label(config.model),
        "data": config.data or DEFAULT_DATA if with_data else None,
        "seed": config.seed,
        "method": method.name,
        "method_config": to_dict(options) if options is not None else {},
        "level": method.level,
        "ranked_layers": len(layers),
        "ranked_layer_fraction": len(layers) / linear_layers,
        "train_examples": len(train),
        "heldout_examples": len(heldout),
        "config": to_dict(config),
        "versions": package_versions(),
    }

    milestones: list = []
    if method.needs_update() and update is not None:
        shutil.copytree(config.adapter, out / "adapter", dirs_exist_ok=True)
        meta.update(adapter=str(config.adapter), update="lora", stability_step=None, stage1_steps=0)
    elif method.needs_update():
        t = time.perf_counter()
        set_seed(config.seed)
        s1 = stage1.run_stage1(model, layers, train, collator, config, out / "checkpoints", probe_dataset=heldout,
                               resume=resume)
        timings["stage1_s"] = time.perf_counter() - t
        update = stage1.Update(s1.model, layers, s1.initial)
        model, milestones = s1.model, s1.milestones
        meta.update(update=config.stage1.update, epsilon=config.stage1.epsilon, stability_step=s1.stability_step,
                    stage1_steps=s1.steps, stage1_cost=s1.cost,
                    stage1_final_loss=s1.losses[-1] if s1.losses else None, stage1_probe_losses=s1.probe_losses)
        missing = sorted(set(config.stage1.milestones) - {f for f, _, _ in milestones})
        if missing:  # after the ε-stop, or before the step a resumed run started from
            log.warning("no snapshot for milestones %s: stage 1 did not pass their steps in this process", missing)
            meta["milestones_missing"] = missing
        stage1.save_update(update, out)

    inputs = Inputs(config=config, options=options, layers=layers, model=model, tokenizer=loaded.tokenizer,
                    train=train if NEEDS_DATA in method.needs else None,
                    heldout=heldout if NEEDS_DATA in method.needs else None,
                    collator=collator, update=update, work_dir=out / "work")
    for fraction, step, weights in milestones:
        current = {n: p.detach().clone() for n, p in model.named_parameters() if n in weights}
        _load_weights(model, weights)
        set_seed(config.seed)
        scored = method.score(inputs)
        _load_weights(model, current)
        ranking = make_ranking(method, layers, scored, {**meta, "milestone": fraction, "milestone_step": step})
        ranking.save(out / "milestones" / f"ranking_{fraction:g}.json")

    t = time.perf_counter()
    set_seed(config.seed)
    scored = method.score(inputs)
    timings["score_s"] = time.perf_counter() - t  # for ILA: stage 2
    timings["total_s"] = time.perf_counter() - started
    ranking = make_ranking(method, layers, scored, {**meta, "timings": timings})
    on = f" on {meta['data']}" if meta["data"] else ""
    plot_heatmap(ranking, out / "heatmap.png", title=f"{method.title or method.name}: {meta['model']}{on}")
    shutil.rmtree(out / "work", ignore_errors=True)
    ranking.save(out / "ranking.json")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # kept only to resume an unfinished run
    return ranking


def _check_method_inputs(config: IdentifyConfig, method: ImportanceMethod, resume: bool) -> None:
    if config.adapter and not method.needs_update():
        raise IlaError(f"--adapter: method {method.name!r} uses no stage-1 update")
    if config.adapter and (config.stage1.update != "lora" or config.stage1.milestones or resume):
        raise IlaError("--adapter is the stage-1 update: it takes no --update full, --milestones or --resume")
    if (config.stage1.milestones or resume) and not method.needs_update():
        raise IlaError(f"--milestones/--resume apply to stage 1, which method {method.name!r} does not run")


def make_ranking(method: ImportanceMethod, layers: list[LayerId], scored: Scores, meta: dict) -> Ranking:
    """The ranking of a method's scores, with the method's metadata and the near-tie count at the 75 % cut."""
    if len(scored.scores) != len(layers):
        raise IlaError(f"method {method.name}: returned {len(scored.scores)} scores for {len(layers)} layers")
    if not all(math.isfinite(s) for s in [*scored.scores, *(scored.tiebreak or [])]):
        raise IlaError(f"method {method.name}: non-finite scores (e.g. diverged; lower its learning rate or check "
                       "the data)")
    ranking = Ranking.from_scores(layers, scored.scores, {**meta, **scored.metadata}, tiebreak=scored.tiebreak,
                                  gates=scored.gates)
    ranking.metadata["near_ties"] = ranking.near_ties(NEAR_TIE_CUT)
    return ranking


def _load_weights(model, weights: dict) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
