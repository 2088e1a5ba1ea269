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
    DIR/logs/stage1/, DIR/logs/stage2/   TensorBoard event files (report_to: tensorboard)

With `--method all`: `DIR/<method>/` holds each method's ranking.json and heatmap.png, `DIR/adapter/` (or
`delta.safetensors`) the one stage-1 update they share, and `DIR/` their comparison: jaccard.csv,
spearman.csv, agreement.png and comparison.json (written last).
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

from ila.config import IdentifyConfig, flatten, to_dict
from ila.distributed import barrier, is_main_process, refuse_distributed, world_size
from ila.errors import IlaError
from ila.importance.base import (
    ALL,
    NEEDS_DATA,
    NEEDS_MODEL,
    NEEDS_WEIGHTS,
    ImportanceMethod,
    Inputs,
    Scores,
    get_method,
    method_names,
    methods,
)
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
    them by the data seed (else `train`/`heldout` are empty lists)."""
    from transformers import set_seed

    from ila.data import build_dataset, collate, load_examples, split_train_heldout
    from ila.importance import stage1
    from ila.layers import discover_layers
    from ila.models import load_model

    set_seed(config.seed)
    examples = []
    if with_data:
        examples = load_examples(config.data, max_examples=config.max_examples, seed=config.sample_seed)
    model, tokenizer = load_model(config.model, trust_remote_code=False)  # after the data: bad data fails fast
    layers = discover_layers(model, config.lora.target_roles)
    linear_layers = len(discover_layers(model))
    update = stage1.load_adapter(model, layers, config.adapter) if config.adapter else None
    if update is not None:
        model, layers = update.model, update.layers
    train, heldout = [], []
    if with_data:
        dataset = build_dataset(examples, tokenizer, max_length=config.max_length)
        train, heldout = split_train_heldout(dataset, heldout_fraction=config.heldout_fraction,
                                             seed=config.sample_seed)
    return Loaded(model, tokenizer, layers, linear_layers, train, heldout, collate(tokenizer), update)


def run_identify(config: IdentifyConfig, out: str | Path, *, resume: bool = False) -> Ranking | dict[str, Ranking]:
    """Rank the linear layers of `config.model` for fine-tuning on `config.data` with `config.method`; write
    the run folder `out`. With method 'all', every registered method runs on one model and data (the stage-1
    update trained once and shared), each into `out/<method>/`, and their comparison into `out/`; the return
    value is then a dict of rankings by method."""
    from transformers import set_seed

    from ila.data import DEFAULT_DATA
    from ila.importance import stage1
    from ila.models import model_label

    config.validate()
    chosen = [get_method(name) for name in method_names(config.method)]
    every = config.method == ALL
    out = Path(out)
    _check_method_inputs(config, chosen, resume, every)
    check_output_folder(out, "comparison.json" if every else "ranking.json", resume=resume)
    folder = {m.name: out / m.name if every else out for m in chosen}
    finished = [m.name for m in chosen if every and (folder[m.name] / "ranking.json").is_file()]
    if finished and not resume:
        raise IlaError(f"output folder {out}: holds an unfinished --method all run ({finished[0]} finished); pass "
                       "--resume to continue it, or another --out")
    done = {name: Ranking.load(folder[name] / "ranking.json") for name in finished}  # kept by --resume
    for name, ranking in done.items():
        _check_same_config(ranking, config, folder[name])
    todo = [m for m in chosen if m.name not in done]
    barrier()  # every process has read the folder before the main one writes to it
    if every and not todo:  # every method finished; the comparison was not written yet
        return _write_all(out, chosen, done) if is_main_process() else done
    started = time.perf_counter()
    weights = None
    if any(NEEDS_WEIGHTS in m.needs for m in todo):  # before the model: a folder without safetensors fails fast
        from ila.models import model_folder
        from ila.weights import WeightFiles

        weights = WeightFiles(model_folder(config.model))
    # data is read when a method uses it, or to train the stage-1 update one needs
    with_data = any(NEEDS_DATA in m.needs or (m.needs_update() and not config.adapter) for m in todo)
    loaded = load_inputs(config, with_data=with_data) if any(NEEDS_MODEL in m.needs for m in todo) else None
    if loaded is not None:
        layers, linear_layers = loaded.layers, loaded.linear_layers
    else:
        layers, linear_layers = _layers_without_weights(config, weights)
    for m in todo:
        if m.check_layers is not None:  # before any training
            m.check_layers(config.options(m.name), layers)
    if weights is not None:
        for layer in layers:  # every weight is in the files, before any method writes a ranking
            weights.key_of(layer.name)
    timings: dict[str, float] = {"load_s": time.perf_counter() - started}
    out.mkdir(parents=True, exist_ok=True)
    train, heldout = (loaded.train, loaded.heldout) if loaded is not None else ([], [])
    shared: dict = {
        "model": model_label(config.model),
        "data": config.data or DEFAULT_DATA if with_data else None,
        "seed": config.seed,
        "ranked_layers": len(layers),
        "ranked_layer_fraction": len(layers) / linear_layers,
        "train_examples": len(train),
        "heldout_examples": len(heldout),
        "processes": world_size(),
        "config": to_dict(config),
        "versions": package_versions(),
    }

    def inputs_for(method: ImportanceMethod, model, update=None, tracked=None) -> Inputs:
        data = NEEDS_DATA in method.needs
        return Inputs(config=config, options=config.options(method.name), layers=layers, model=model,
                      tokenizer=loaded.tokenizer if loaded is not None else None,
                      train=train if data else None, heldout=heldout if data else None,
                      collator=loaded.collator if loaded is not None else None, update=update, weights=weights,
                      tracked=tracked, work_dir=folder[method.name] / "work")

    rankings = dict(done)
    model = loaded.model if loaded is not None else None
    for method in [m for m in todo if not m.needs_update()]:  # before stage 1 changes the model
        meta = {**shared, "data": shared["data"] if NEEDS_DATA in method.needs else None}
        rankings[method.name] = _score_and_write(method, inputs_for(method, model), meta, timings, started,
                                                 folder[method.name])

    # methods that watch stage 1 first: their record lives in memory until they are scored
    update_methods = sorted((m for m in todo if m.needs_update()), key=lambda m: not m.needs_training())
    if update_methods:
        update, milestones = loaded.update, []
        tracked: dict[str, Any] = {}
        stage1_meta: dict = {}
        if update is not None:
            if is_main_process():
                shutil.copytree(config.adapter, out / "adapter", dirs_exist_ok=True)
            stage1_meta = {"adapter": str(config.adapter), "update": "lora", "stability_step": None,
                           "stage1_steps": 0}
        else:
            t = time.perf_counter()
            set_seed(config.seed)
            trackers = {m.name: m.track for m in update_methods if m.track is not None}
            s1 = stage1.run_stage1(model, layers, train, loaded.collator, config, out / "checkpoints",
                                   probe_dataset=heldout, resume=resume, trackers=trackers)
            timings["stage1_s"] = time.perf_counter() - t
            update, milestones, tracked = stage1.Update(s1.model, layers, s1.initial), s1.milestones, s1.tracked
            stage1_meta = {"update": config.stage1.update, "epsilon": config.stage1.epsilon,
                           "stability_step": s1.stability_step, "stage1_steps": s1.steps, "stage1_cost": s1.cost,
                           "stage1_final_loss": s1.losses[-1] if s1.losses else None,
                           "stage1_probe_losses": s1.probe_losses}
            missing = sorted(set(config.stage1.milestones) - {f for f, _, _ in milestones})
            if missing:  # after the ε-stop, or before the step a resumed run started from
                log.warning("no snapshot for milestones %s: stage 1 did not pass their steps in this process", missing)
                stage1_meta["milestones_missing"] = missing
            stage1.save_update(update, out)
        for method in update_methods:
            meta = {**shared, **stage1_meta}
            inputs = inputs_for(method, update.model, update, tracked.get(method.name))
            _score_milestones(method, inputs, milestones, meta, folder[method.name])
            rankings[method.name] = _score_and_write(method, inputs, meta, timings, started, folder[method.name])

    if not is_main_process():
        return {m.name: rankings[m.name] for m in chosen} if every else rankings[chosen[0].name]
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # kept only to resume an unfinished run
    return _write_all(out, chosen, rankings) if every else rankings[chosen[0].name]


def _write_all(out: Path, chosen: list[ImportanceMethod], rankings: dict[str, Ranking]) -> dict[str, Ranking]:
    """The comparison of every method's ranking: layer orders in `out/`, block orders in `out/blocks/`
    (where block-level methods, which tie the layers of a block, compare fairly); `out/comparison.json` last."""
    from ila.comparison import compare, write_comparison

    names = [m.name for m in chosen]
    ordered = [rankings[n] for n in names]
    write_comparison(compare(ordered, top=NEAR_TIE_CUT, labels=names, level="block"), out / "blocks")
    write_comparison(compare(ordered, top=NEAR_TIE_CUT, labels=names), out)
    return {n: rankings[n] for n in names}


def _check_same_config(ranking: Ranking, config: IdentifyConfig, folder: Path) -> None:
    """A ranking kept by --resume must come from the configuration being resumed."""
    saved, wanted = flatten(ranking.metadata.get("config", {})), flatten(to_dict(config))
    changed = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
    if changed:
        raise IlaError(f"--resume: {folder / 'ranking.json'} was made with {changed[0]}={saved.get(changed[0])!r}, "
                       f"not {wanted.get(changed[0])!r}; resume with the same settings, or use another --out")


def _layers_without_weights(config: IdentifyConfig, weights) -> tuple[list[LayerId], int]:
    """The layers to rank of a model that is not loaded, and how many linear layers it has: discovered on its
    meta-device copy (no weights in memory)."""
    from ila.layers import discover_layers
    from ila.models import empty_model

    model = empty_model(weights.folder)
    return discover_layers(model, config.lora.target_roles), len(discover_layers(model))


def _score_and_write(method: ImportanceMethod, inputs: Inputs, meta: dict, timings: dict, started: float,
                     out: Path) -> Ranking:
    """Score, then write `out/heatmap.png` and `out/ranking.json` (last: its presence means the run finished)."""
    from transformers import set_seed

    from ila.report import plot_heatmap

    t = time.perf_counter()
    set_seed(inputs.config.seed)
    scored = method.score(inputs)
    score_s = time.perf_counter() - t  # for ILA: stage 2
    own = {"load_s": timings["load_s"], **({"stage1_s": timings["stage1_s"]} if "stage1_s" in timings and
                                           method.needs_update() else {})}
    own |= {"score_s": score_s, "total_s": sum(own.values()) + score_s, "wall_s": time.perf_counter() - started}
    ranking = make_ranking(method, inputs, scored, {**meta, "timings": own})
    if not is_main_process():  # every process scores (training is collective); the main one writes
        return ranking
    on = f" on {meta['data']}" if meta.get("data") else ""
    out.mkdir(parents=True, exist_ok=True)
    plot_heatmap(ranking, out / "heatmap.png", title=f"{method.title or method.name}: {meta['model']}{on}")
    shutil.rmtree(out / "work", ignore_errors=True)
    ranking.save(out / "ranking.json")
    return ranking


def _score_milestones(method: ImportanceMethod, inputs: Inputs, milestones: list, meta: dict, out: Path) -> None:
    """Rank at each stage-1 milestone snapshot (Table 4): `out/milestones/ranking_<fraction>.json`."""
    from transformers import set_seed

    model = inputs.update.model
    for fraction, step, weights in milestones:
        current = {n: p.detach().clone() for n, p in model.named_parameters() if n in weights}
        _load_weights(model, weights)
        set_seed(inputs.config.seed)
        scored = method.score(inputs)
        _load_weights(model, current)
        ranking = make_ranking(method, inputs, scored, {**meta, "milestone": fraction, "milestone_step": step})
        if is_main_process():
            ranking.save(out / "milestones" / f"ranking_{fraction:g}.json")


def _check_method_inputs(config: IdentifyConfig, chosen: list[ImportanceMethod], resume: bool, every: bool) -> None:
    unsharded = [m.name for m in chosen if not m.sharded]
    if unsharded:
        refuse_distributed(f"method {unsharded[0]}", "it trains gates or reads gradients and weights that FSDP and "
                           "ZeRO-3 leave in shards; methods that run there: "
                           + ", ".join(sorted(m.name for m in methods().values() if m.sharded)), sharded=True)
    if config.stage1.milestones:
        refuse_distributed("--milestones", "the snapshots would hold shards", sharded=True)
    updates = [m for m in chosen if m.needs_update()]
    if config.adapter and not updates:
        raise IlaError(f"--adapter: method {chosen[0].name!r} uses no stage-1 update")
    if config.adapter and (config.stage1.update != "lora" or config.stage1.milestones or resume):
        raise IlaError("--adapter is the stage-1 update: it takes no --update full, --milestones or --resume")
    trained = [m.name for m in chosen if m.needs_training()]
    if config.adapter and trained:
        what = "--method all includes" if every else "method"
        raise IlaError(f"--adapter: {what} {trained[0]!r}, which watches stage-1 training; train stage 1 here "
                       f"(drop --adapter){' or run the methods one by one' if every else ''}")
    if (config.stage1.milestones or resume) and not updates:
        raise IlaError(f"--milestones/--resume apply to stage 1, which method {chosen[0].name!r} does not run")
    if every and config.stage1.milestones:
        raise IlaError("--milestones: rank one method at a time at stage-1 milestones, not --method all")
    if config.stage1.milestones and any(m.needs_training() for m in chosen):
        raise IlaError(f"--milestones: method {next(m.name for m in chosen if m.needs_training())!r} averages over "
                       "all of stage 1 and has no ranking at a milestone")


def make_ranking(method: ImportanceMethod, inputs: Inputs, scored: Scores, meta: dict) -> Ranking:
    """The ranking of a method's scores on `inputs.layers`, with the run's metadata, the method's name, level and
    options, what it measured, and the near-tie count at the 75 % cut."""
    layers = inputs.layers
    if len(scored.scores) != len(layers):
        raise IlaError(f"method {method.name}: returned {len(scored.scores)} scores for {len(layers)} layers")
    if not all(math.isfinite(s) for s in [*scored.scores, *(scored.tiebreak or [])]):
        raise IlaError(f"method {method.name}: non-finite scores (e.g. diverged; lower its learning rate or check "
                       "the data)")
    own = {"method": method.name, "level": method.level,
           "method_config": to_dict(inputs.options) if inputs.options is not None else {}}
    ranking = Ranking.from_scores(layers, scored.scores, {**meta, **own, **scored.metadata},
                                  tiebreak=scored.tiebreak, gates=scored.gates)
    ranking.metadata["near_ties"] = ranking.near_ties(NEAR_TIE_CUT)
    return ranking


def _load_weights(model, weights: dict) -> None:
    import torch

    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            params[name].copy_(value)
