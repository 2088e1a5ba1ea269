"""`ila experiment`: a YAML grid of fine-tunes (models × data × methods × selections × seeds) and its table.

Each cell is an `ila train` run in `OUT/cells/<model>/<data>/<method>/<selection>/seed<k>/`, in a process of
its own (so its cost figures are its own) from the `cell.yaml` written there; a cell whose `run.json` exists is
skipped on re-run. Rankings the selections need come from a given file or from
`ila identify`, run once per (model, data) into `OUT/rankings/`. The table (Markdown + CSV) has one row per
(model, data, method, selection) and mean ± std over seeds of each metric, in the layout of seeds/000 Tables 5–8.

    name: table8                    # grid keys; every key is checked, a typo is a one-line error
    models: [smollm2-135m]
    data: [gsm8k, roleplay]
    methods: [lora]
    seeds: [0, 1]
    selections:                     # a --select value, or a mapping with a label
      - all
      - {label: "LoRA w/ ILA", select: "freeze-bottom:0.25"}
      - {label: "RL 1", select: "random:0.25", select_seed: 1}
      - {label: "w/ snr", select: "freeze-bottom:0.25", ranking: runs/all/snr/ranking.json}  # its own ranking
      - {label: "w/ update-norm", select: "freeze-bottom:0.25", importance: update-norm}  # identify per data
      - {label: "LISA", strategy: lisa, method: full, lisa: {layers: 2}}  # a training strategy, its own method
    ranking: null                   # ranking.json (or a list, for intersect:F), or null: identify per (model, data)
    identify: {stage1: {max_steps: 40}}   # IdentifyConfig keys for those identify runs
    train: {max_steps: 40}                # TrainConfig keys shared by every cell
    eval: {mc: [harmless, truthfulqa], exact: [], limit: 50}   # optional: `ila eval` of every cell -> more columns

A selection may name a training `strategy` (see `ila train --list-strategies`) with its options as a section
named after it, a `method` of its own (it then runs with that method only, whatever `methods` says) and a
`train` mapping of config keys for its cells alone (e.g. a learning rate for full fine-tuning).

Evaluation results go to each cell's `eval.json`; a cell is (re-)evaluated on re-run when it has none or when
the eval section's tasks, limit or seed changed since.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
import statistics
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ila.config import (
    IdentifyConfig,
    TrainConfig,
    flatten,
    load_config,
    read_yaml_mapping,
    to_dict,
)
from ila.errors import IlaError
from ila.io import slug, write_json_atomic, write_text_atomic

GRID_KEYS = {"name", "models", "data", "methods", "seeds", "selections", "ranking", "identify", "train", "eval"}
EVAL_KEYS = {"mc", "exact", "limit"}
CELL_KEYS = {"model", "data", "method", "select", "seed", "select_seed", "rankings", "strategy"}  # set per cell
SELECTION_KEYS = {"label", "select", "select_seed", "ranking", "importance", "strategy", "method",  # + strategy
                  "train"}  # sections
METRICS = [  # (key in the cell summary, column title, format)
    ("heldout_loss", "held-out loss", "{:.4f}"),
    ("perplexity", "perplexity", "{:.3f}"),
    ("trained_layer_fraction", "layers trained", "{:.0%}"),
    ("trainable_params", "trainable params", "{:,.0f}"),
    ("median_step_ms", "ms/step", "{:.0f}"),
    ("peak_memory_mb", "peak MiB", "{:.0f}"),
    ("tokens_per_s", "tokens/s", "{:.0f}"),
]


@dataclass
class Selection:
    """One row variant of the grid: what trains, chosen by --select or by a training strategy."""

    label: str
    select: str = "all"
    select_seed: int | None = None
    ranking: str | None = None  # this selection's ranking.json (e.g. one importance method's), instead of the grid's
    importance: str | None = None  # importance method identify runs per (model, data) for this selection (None: ila)
    strategy: str | None = None  # a training strategy (None: the grid's train.strategy, by default selection)
    method: str | None = None  # this selection's own training method, instead of the grid's methods
    sections: dict[str, Any] = field(default_factory=dict)  # strategy options, e.g. {"lisa": {"layers": 2}}
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig keys of this selection's cells only


@dataclass
class Grid:
    name: str
    models: list[str]
    data: list[str]
    methods: list[str]
    seeds: list[int]
    selections: list[Selection]
    ranking: str | list[str] | None = None  # one file, several (intersect), or None: identify per (model, data)
    identify: dict[str, Any] = field(default_factory=dict)
    train: dict[str, Any] = field(default_factory=dict)
    eval: dict[str, Any] = field(default_factory=dict)


def load_grid(path: str | Path) -> Grid:
    """Read and check an experiment YAML; unknown keys and wrong types are one-line errors."""
    path = Path(path)
    raw = read_yaml_mapping(path, "experiment")
    unknown = sorted(set(raw) - GRID_KEYS)
    if unknown:
        expected = ", ".join(sorted(GRID_KEYS))
        raise IlaError(f"experiment {path}: unknown key '{unknown[0]}' (expected one of: {expected})")

    def strings(key: str, default: list | None = None) -> list:
        value = raw.get(key, default)
        if not isinstance(value, list) or not value:
            raise IlaError(f"experiment {path}: '{key}' must be a non-empty list")
        return value

    from ila.training.strategies.base import strategies

    keys = SELECTION_KEYS | set(strategies())
    selections = []
    for i, item in enumerate(strings("selections")):
        if isinstance(item, str):
            item = {"select": item}
        if not isinstance(item, dict) or not ("select" in item or "strategy" in item):
            raise IlaError(f"experiment {path}: selections[{i}] must be a --select value or a mapping with 'select' "
                           "or 'strategy'")
        bad = sorted(set(item) - keys)
        if bad:
            raise IlaError(f"experiment {path}: selections[{i}]: unknown key '{bad[0]}' "
                           f"(expected one of: {', '.join(sorted(keys))})")
        seed_suffix = f" (seed {item['select_seed']})" if item.get("select_seed") is not None else ""
        default_label = item.get("select", item.get("strategy"))
        label = str(item.get("label", f"{default_label}{seed_suffix}"))
        if item.get("select_seed") is not None and not isinstance(item["select_seed"], int):
            raise IlaError(f"experiment {path}: selections[{i}].select_seed must be an integer")
        if any(slug(label) == slug(other.label) for other in selections):
            raise IlaError(f"experiment {path}: selections[{i}]: label {label!r} repeats another (cells would collide)")
        own = item.get("ranking")
        if own is not None and not Path(str(own)).is_file():
            raise IlaError(f"experiment {path}: selections[{i}].ranking {own}: file not found")
        importance = _importance(item.get("importance"), own, f"experiment {path}: selections[{i}]")
        selections.append(Selection(
            label, str(item.get("select", "all")), item.get("select_seed"), str(own) if own is not None else None,
            importance, item.get("strategy"), item.get("method"), {k: item[k] for k in item if k in strategies()},
            item.get("train") or {}))
        if not isinstance(selections[-1].train, dict):
            raise IlaError(f"experiment {path}: selections[{i}].train must be a mapping of config keys")
        own = sorted(set(selections[-1].train) & CELL_KEYS)
        if own:
            raise IlaError(f"experiment {path}: selections[{i}].train: '{own[0]}' is set by the grid or the "
                           "selection itself, not by its train keys")
    for key in ("identify", "train", "eval"):
        if not isinstance(raw.get(key, {}), dict):
            raise IlaError(f"experiment {path}: '{key}' must be a mapping of config keys")
    bad = sorted(set(raw.get("eval", {})) - EVAL_KEYS)
    if bad:
        expected = ", ".join(sorted(EVAL_KEYS))
        raise IlaError(f"experiment {path}: eval: unknown key '{bad[0]}' (expected one of: {expected})")
    seeds = strings("seeds", [0])
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in seeds) or len(set(seeds)) != len(seeds):
        raise IlaError(f"experiment {path}: 'seeds' must be distinct integers, got {seeds!r}")
    ev = raw.get("eval", {})
    for key in ("mc", "exact"):
        if key in ev and not (isinstance(ev[key], list) and all(isinstance(x, str) for x in ev[key])):
            raise IlaError(f"experiment {path}: eval.{key} must be a list of task names, got {ev[key]!r}")
    if "limit" in ev and not (isinstance(ev["limit"], int) and ev["limit"] > 0):
        raise IlaError(f"experiment {path}: eval.limit must be a positive integer, got {ev['limit']!r}")
    given = raw.get("ranking")
    for ranking in (given if isinstance(given, list) else [given] if given is not None else []):
        if not Path(str(ranking)).is_file():
            raise IlaError(f"experiment {path}: ranking {ranking}: file not found")
    grid = Grid(
        name=str(raw.get("name", path.stem)), models=strings("models", [None]), data=strings("data", [None]),
        methods=strings("methods", ["lora"]), seeds=seeds, selections=selections,
        ranking=raw.get("ranking"), identify=raw.get("identify", {}), train=raw.get("train", {}),
        eval=raw.get("eval", {}),
    )
    for model in grid.models:  # every cell's config is valid before anything runs
        for method, sel in cells(grid):
            _train_config(grid, model, grid.data[0], method, sel, grid.seeds[0], [], where=f"experiment {path}")
    try:
        identify = load_config(None, flatten(grid.identify), IdentifyConfig)
    except IlaError as exc:
        raise IlaError(f"experiment {path}: identify: {exc}") from None
    if identify.method == "all":
        raise IlaError(f"experiment {path}: identify.method: 'all' makes one ranking per method; run `ila identify "
                       "--method all` and give each selection its method's ranking (selections[].ranking)")
    return grid


def _importance(name: Any, ranking: Any, where: str) -> str | None:
    """A selection's importance method: a registered one, and not beside a ranking file."""
    from ila.importance.base import ALL, method_names

    if name is None:
        return None
    if ranking is not None:
        raise IlaError(f"{where}: give 'ranking' or 'importance', not both")
    known = method_names(ALL)
    if name not in known:
        raise IlaError(f"{where}.importance: unknown importance method {name!r} (expected one of: {', '.join(known)})")
    return str(name)


def cell_methods(grid: Grid, sel: Selection) -> list[str]:
    """The training methods a selection runs with: its own, or the grid's."""
    return [sel.method] if sel.method else grid.methods


def cells(grid: Grid) -> list[tuple[str, Selection]]:
    """(method, selection) of every row, method by method in the grid's order (selections' own methods last)."""
    order = list(dict.fromkeys([*grid.methods, *(s.method for s in grid.selections if s.method)]))
    return [(m, s) for m in order for s in grid.selections if m in cell_methods(grid, s)]


def _train_config(grid: Grid, model, data, method, sel: Selection, seed: int, rankings: list[str],
                  *, where: str = "experiment") -> TrainConfig:
    shared = flatten(grid.train)
    if method != "full" or sel.strategy not in (None, "selection"):  # a grid-wide train_other concerns the
        shared.pop("train_other", None)  # full fine-tuning cells of the selection strategy only
    cell = {"model": model, "data": data, "method": method, "select": sel.select, "seed": seed,
            "select_seed": sel.select_seed, "rankings": rankings, "strategy": sel.strategy,
            **flatten(sel.train), **flatten(sel.sections)}
    try:  # validated once, with the cell's own method and selection in place
        return load_config(None, {**shared, **cell}, TrainConfig)
    except IlaError as exc:
        raise IlaError(f"{where}: train: {exc}") from None


def run_experiment(config_path: str | Path, out: str | Path) -> Path:
    """Run every unfinished cell of the grid, then write `OUT/<name>.md` and `.csv`; returns the Markdown path."""
    from ila.evaluation.job import eval_settings, run_eval
    from ila.importance.job import run_identify

    grid = load_grid(config_path)
    out = Path(out)
    mc, exact, limit = grid.eval.get("mc"), grid.eval.get("exact"), grid.eval.get("limit", 50)
    rows: dict[tuple, list[dict]] = {}
    for model in grid.models:
        for data in grid.data:
            rankings = _grid_rankings(grid, model, data, out, run_identify)
            for method, sel in cells(grid):
                needs = []
                if _needs_ranking(grid, sel):
                    needs = ([sel.ranking] if sel.ranking else
                             [str(_identify(grid, model, data, out, run_identify, sel.importance))]
                             if sel.importance else rankings)
                for seed in grid.seeds:
                    cell = out / "cells" / slug(model) / slug(data) / method / slug(sel.label) / f"seed{seed}"
                    config = _train_config(grid, model, data, method, sel, seed, needs)
                    _check_cell(cell, config)
                    if not (cell / "run.json").exists():
                        print(f"[{grid.name}] {model} · {data} · {method} · {sel.label} · seed {seed}", flush=True)
                        _train_cell(config, cell)
                    if grid.eval and _saved_eval_settings(cell) != eval_settings(mc, exact, limit, seed):
                        print(f"[{grid.name}] eval {cell}", flush=True)
                        run_eval(run=cell, heldout=False, mc=mc, exact=exact, limit=limit, seed=seed,
                                 out=cell / "eval.json")
                        _release_memory()
                    rows.setdefault((model, data, method, sel.label), []).append(_summary(cell))
    return write_table(grid.name, rows, out)


def _grid_rankings(grid: Grid, model, data, out: Path, run_identify) -> list[str]:
    """The ranking files the grid's selections use for (model, data): given ones, or one identify run."""
    if not any(_needs_ranking(grid, s) and not s.ranking and not s.importance for s in grid.selections):
        return []
    if isinstance(grid.ranking, list):
        return [str(r) for r in grid.ranking]
    if grid.ranking:
        return [str(grid.ranking)]
    return [str(_identify(grid, model, data, out, run_identify))]


def _train_cell(config: TrainConfig, cell: Path) -> None:
    """`ila train` of one cell in a fresh interpreter, from `cell/cell.yaml` (which also documents the cell).

    A process per cell keeps each cell's peak memory and step times its own: in one long process, memory
    freed by earlier cells stays in the allocator and in the resident set (CPU), and earlier cells' models
    and compiled kernels would sit beside the next one. An interrupted cell resumes from its checkpoints if
    its configuration is unchanged (AdaLoRA, which cannot resume, starts over).
    """
    spec = yaml.safe_dump(to_dict(config), sort_keys=False)
    resume = any((cell / "checkpoints").glob("checkpoint-*"))
    if resume and (cell / "cell.yaml").exists() and (cell / "cell.yaml").read_text() != spec:
        raise IlaError(f"cell {cell}: its interrupted run was started with another configuration (cell.yaml); "
                       "remove the cell folder or use another --out")
    if resume and config.method == "adalora":
        shutil.rmtree(cell / "checkpoints")
        resume = False
    cell.mkdir(parents=True, exist_ok=True)
    write_text_atomic(cell / "cell.yaml", spec)
    command = [sys.executable, "-m", "ila.cli", "train", "--config", str(cell / "cell.yaml"), "--out", str(cell)]
    code = subprocess.run([*command, "--resume"] if resume else command).returncode
    if code < 0:
        raise IlaError(f"cell {cell}: ila train was killed by signal {-code}")
    if code != 0:
        raise IlaError(f"cell {cell}: ila train exited with code {code} (its error is printed above)")


def _release_memory() -> None:
    """Free what identify/eval held in this process before the next cell's process needs the device."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _saved_eval_settings(cell: Path) -> dict | None:
    """The settings a cell's eval.json was made with (None: no eval.json, or one from before settings were kept)."""
    path = cell / "eval.json"
    return json.loads(path.read_text()).get("settings") if path.exists() else None


def _check_cell(cell: Path, config: TrainConfig) -> None:
    """A finished cell is reused only if it was made with the same configuration."""
    if not (cell / "run.json").exists():
        return
    from ila.training.methods import train_other_params

    run = json.loads((cell / "run.json").read_text())
    saved, wanted = run.get("config", {}), to_dict(config)
    defaults = to_dict(TrainConfig())  # keys added since a cell ran hold their defaults there
    changed = sorted(k for k in wanted if k != "rankings" and saved.get(k, defaults.get(k)) != wanted[k])
    if changed:
        raise IlaError(f"experiment cell {cell}: was run with another {changed[0]} ({saved.get(changed[0])!r}, now "
                       f"{wanted[changed[0]]!r}); remove the cell or use another --out")
    # full fine-tuning runs from before `other_params_trained` was recorded trained embeddings and norms always
    if (config.method == "full" and config.strategy == "selection"
            and run["cost"].get("other_params_trained", True) != train_other_params(config)):
        raise IlaError(f"experiment cell {cell}: trained embeddings and norms differently than this grid asks "
                       "(train_other); remove the cell or use another --out")


def _needs_ranking(grid: Grid, sel: Selection) -> bool:
    """Whether the selection's strategy reads a ranking (a --select by importance, LISA steered by one)."""
    from ila.training.strategies.base import get_strategy

    config = _train_config(grid, None, None, cell_methods(grid, sel)[0], sel, grid.seeds[0], [])
    return get_strategy(config.strategy).needs_ranking(config, config.options())


def _identify(grid: Grid, model, data, out: Path, run_identify, importance: str | None = None) -> Path:
    """The ranking of (model, data) by the grid's identify settings, or by another importance method's."""
    from ila.importance.base import ALL, method_names

    folder = out / "rankings" / slug(model) / slug(data)
    settings = flatten(grid.identify) | {"model": model, "data": data}
    if importance is not None:  # its own folder; the options of other methods stay out of its config
        folder = folder / importance
        others = set(method_names(ALL)) - {importance}
        settings = {k: v for k, v in settings.items() if k.split(".")[0] not in others} | {"method": importance}
    if not (folder / "ranking.json").exists():
        print(f"[{grid.name}] identify{f' ({importance})' if importance else ''}: {model} · {data}", flush=True)
        config = load_config(None, settings, IdentifyConfig)
        run_identify(config, folder, resume=(folder / "checkpoints").is_dir())
        _release_memory()
    return folder / "ranking.json"


def _summary(cell: Path) -> dict:
    run = json.loads((cell / "run.json").read_text())
    loss = run.get("heldout_loss")
    summary = {**run["cost"], "heldout_loss": loss, "perplexity": math.exp(loss) if loss is not None else None,
               "seed": run.get("config", {}).get("seed")}
    if (cell / "eval.json").exists():
        results = json.loads((cell / "eval.json").read_text())
        summary |= {f"acc {task}": r["accuracy"] for task, r in results.get("multiple_choice", {}).items()}
        summary |= {f"em {spec}": r["extracted_match"] for spec, r in results.get("exact_match", {}).items()}
    return summary


def _mean_std(values: list[float], fmt: str) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def write_table(name: str, rows: dict[tuple, list[dict]], out: Path) -> Path:
    """Markdown and CSV: one row per (model, data, method, selection), mean ± std over seeds."""
    extra = sorted({k for cells in rows.values() for c in cells for k in c if k.startswith(("acc ", "em "))})
    metrics = [(k, k, "{:.3f}") for k in extra] + METRICS
    header = ["model", "data", "method", "selection", "seeds"] + [title for _, title, _ in metrics]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header[:5] + [f"{k}_{s}" for k, _, _ in metrics for s in ("mean", "std")])
    for (model, data, method, label), cells in rows.items():
        key = [str(model or "default"), str(data or "default"), method, label, str(len(cells))]
        lines.append("| " + " | ".join(key + [_mean_std([c.get(k) for c in cells], f) for k, _, f in metrics]) + " |")
        stats = []
        for k, _, _ in metrics:
            vals = [c[k] for c in cells if c.get(k) is not None]
            stats += [statistics.mean(vals) if vals else "", statistics.stdev(vals) if len(vals) > 1 else ""]
        writer.writerow(key + stats)
    out.mkdir(parents=True, exist_ok=True)
    md = out / f"{slug(name)}.md"
    write_text_atomic(md, f"# {name}\n\n" + "\n".join(lines) + "\n")
    write_text_atomic(out / f"{slug(name)}.csv", buffer.getvalue())
    write_json_atomic(out / f"{slug(name)}.json", {str(k): v for k, v in rows.items()})
    return md
