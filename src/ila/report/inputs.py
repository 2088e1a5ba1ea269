"""Reading the inputs of `ila report`: run folders and ranking files, each detected by what it holds, into
`Inputs` (rankings, train runs, analyze runs); a bad input is one `IlaError` line ending in `EXPECTED`."""

from __future__ import annotations

import contextlib
import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ila.errors import IlaError, first_line
from ila.io import read_json
from ila.ranking import Ranking

EXPECTED = "expected a ranking.json file or a run folder of ila identify, train or analyze"
TRAIN_KEYS = ("strategy", "select", "heldout_loss", "cost")


@dataclass
class RankingInput:
    label: str  # what made it: the method (or the --method all sub-folder)
    source: Path
    ranking: Ranking
    group: int  # the input it came from (the rankings of one --method all run share their stage 1)


@dataclass
class TrainInput:
    source: Path
    run: dict
    selection: dict | None


@dataclass
class AnalysisInput:
    source: Path
    meta: dict  # metrics.json without its rows ({} when read from metrics.csv)
    rows: list[dict]


@dataclass
class Inputs:
    """Everything found in the given paths, in the order given."""

    rankings: list[RankingInput] = field(default_factory=list)
    trains: list[TrainInput] = field(default_factory=list)
    analyses: list[AnalysisInput] = field(default_factory=list)
    found: list[tuple[Path, str, list[str]]] = field(default_factory=list)  # (path, what it is, section ids)


def read_inputs(paths: list[str | Path]) -> Inputs:
    """Detect and read each path (a run folder or a ranking.json); `IlaError` naming the first that is neither."""
    if not paths:
        raise IlaError(f"report: give at least one path ({EXPECTED})")
    inputs = Inputs()
    for given in paths:
        path = Path(given)
        if path.is_file() and path.name in ("run.json", "metrics.json", "comparison.json"):
            path = path.parent  # the file that marks a run folder stands for the folder
        if not path.exists():
            raise IlaError(f"report: {path}: not found; {EXPECTED}")
        if path.is_file():
            _read_ranking_file(path, inputs)
        else:
            _read_folder(path, inputs)
    return inputs


def _read_ranking_file(path: Path, inputs: Inputs) -> None:
    ids = [_add_ranking(inputs, _load_ranking(path), path)]
    inputs.found.append((path, "ranking file", ids))


def _load_ranking(path: Path) -> Ranking:
    try:
        return Ranking.load(path)
    except IlaError as err:
        detail = first_line(err).removeprefix(f"ranking {path}: ")
        raise IlaError(f"report: {path}: not a ranking ({detail}); {EXPECTED}") from None


def _read_folder(path: Path, inputs: Inputs) -> None:
    kinds, ids = [], []
    if (path / "ranking.json").is_file():
        ids.append(_add_ranking(inputs, _load_ranking(path / "ranking.json"), path / "ranking.json"))
        kinds.append("identify run" if not (path / "run.json").is_file() else "ranking learned in training")
    subfolders = _method_folders(path) if (path / "comparison.json").is_file() else []
    for sub in subfolders:
        ids.append(_add_ranking(inputs, _load_ranking(sub / "ranking.json"), sub / "ranking.json", sub.name))
    if subfolders:
        kinds.append(f"identify --method all run ({len(subfolders)} methods)")
    if (path / "run.json").is_file():
        run = read_json(path / "run.json", f"report: {path / 'run.json'}")
        if not isinstance(run, dict) or not all(k in run for k in TRAIN_KEYS):
            raise IlaError(f"report: {path / 'run.json'}: not from ila train (no {', '.join(TRAIN_KEYS)}); "
                           f"{EXPECTED}")
        selection = path / "selection.json"
        chosen = read_json(selection, f"report: {selection}") if selection.is_file() else None
        inputs.trains.append(TrainInput(path, run, chosen if isinstance(chosen, dict) else None))
        ids.append(f"train-{len(inputs.trains)}")
        kinds.insert(0, "train run")
    if (path / "metrics.json").is_file() or (path / "metrics.csv").is_file():
        inputs.analyses.append(_read_analysis(path))
        ids.append(f"analysis-{len(inputs.analyses)}")
        kinds.append("analyze run")
    if not kinds:
        raise IlaError(f"report: {path}: not a run folder (no ranking.json, comparison.json with method folders, "
                       f"run.json or metrics.json); {EXPECTED}")
    inputs.found.append((path, ", ".join(kinds), ids))


def _method_folders(path: Path) -> list[Path]:
    """The method folders of an `--method all` run, in the order of its comparison.json."""
    comparison = read_json(path / "comparison.json", f"report: {path / 'comparison.json'}")
    labels = comparison.get("labels") if isinstance(comparison, dict) else None
    named = [path / str(x) for x in dict.fromkeys(labels)] if isinstance(labels, list) else []
    others = sorted(p for p in path.iterdir() if p.is_dir() and p not in named)
    return [p for p in [*named, *others] if (p / "ranking.json").is_file()]


def _add_ranking(inputs: Inputs, ranking: Ranking, source: Path, label: str | None = None) -> str:
    group = len(inputs.found)  # the input being read
    inputs.rankings.append(RankingInput(label or ranking.method or "ranking", source, ranking, group))
    return f"ranking-{len(inputs.rankings)}"


def _read_analysis(path: Path) -> AnalysisInput:
    """metrics.json (written last), else the metrics.csv of an unfinished run; rows checked for what plots use."""
    if (path / "metrics.json").is_file():
        file = path / "metrics.json"
        data = read_json(file, f"report: {file}")
        meta = {k: v for k, v in data.items() if k != "rows"} if isinstance(data, dict) else {}
        rows = data.get("rows") if isinstance(data, dict) else None
    else:
        file, meta = path / "metrics.csv", {}
        with open(file, newline="") as f:
            rows = [_csv_row(r) for r in csv.DictReader(f)]
    if not isinstance(rows, list) or not rows or not all(_metric_row(r) for r in rows):
        raise IlaError(f"report: {file}: no rows of metric, layer, base, tuned, value; {EXPECTED}")
    return AnalysisInput(path, meta, rows)


def _metric_row(row: Any) -> bool:
    return (isinstance(row, dict) and isinstance(row.get("metric"), str) and isinstance(row.get("layer"), int)
            and all(row.get(k) is None or is_number(row.get(k)) for k in ("base", "tuned", "value")))


def _csv_row(row: dict) -> dict:
    """A metrics.csv row with numbers as numbers (left as text where they are not, for `_metric_row` to refuse)."""
    out: dict[str, Any] = dict(row)
    for key, kind in (("layer", int), ("base", float), ("tuned", float), ("value", float)):
        text = row.get(key)
        with contextlib.suppress(ValueError):
            out[key] = None if text in (None, "") else kind(text)
    return out


# -- values in metadata (also read by the rendering and the curves) --------------------------------------------


def is_number(value: Any) -> bool:
    """An int or a float, not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def as_numbers(value: Any) -> list[float | None]:
    """A list of numbers from metadata (other entries as None); [] when it is not a list."""
    if not isinstance(value, list):
        return []
    return [float(v) if is_number(v) else None for v in value]


def as_pairs(value: Any) -> list[tuple[float, float]]:
    """[(step, value), ...] from metadata `[[step, value], ...]`, skipping malformed entries."""
    if not isinstance(value, list):
        return []
    return [(float(p[0]), float(p[1])) for p in value
            if isinstance(p, (list, tuple)) and len(p) == 2 and all(is_number(x) for x in p)]
