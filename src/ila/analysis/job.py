"""`ila analyze`: where fine-tuning changed a model, layer by layer (seeds/004 Sec. 3–4, App. B).

base + tuned (a model folder, a PEFT adapter for the base, or an `ila train` run folder) → one streaming pass
over the data (`stream.py`) + weight change and layer swapping (`weights.py`) → run folder::

    DIR/metrics.csv  DIR/metrics.json   one row per metric and layer: metric, layer, mode, base, tuned, value
    DIR/correlation.csv                 with --ranking: Spearman of each metric with the blocks' importance
    DIR/<family>.png  DIR/swap.png  DIR/metric_correlation.png

`metrics.json` is written last (it also holds the settings): a folder without it is unfinished.
"""

from __future__ import annotations

import copy
import csv
import io
import time
from pathlib import Path

import torch

from ila.config import AnalyzeConfig, to_dict
from ila.distributed import barrier, is_main_process
from ila.errors import IlaError
from ila.io import check_output_folder, read_json, write_json_atomic, write_text_atomic

COLUMNS = ["metric", "layer", "mode", "base", "tuned", "value"]


def resolve_tuned(config: AnalyzeConfig) -> tuple[str | None, Path | None, Path | None]:
    """(base spec, full model folder, adapter folder) of `--tuned`; an `ila train` run folder gives its own
    model or adapter (and its base model when --base is not given)."""
    tuned = Path(config.tuned)
    base = config.base
    if (tuned / "run.json").is_file():
        run = read_json(tuned / "run.json", f"tuned run {tuned}: run.json")
        base = base or run.get("config", {}).get("model")
        if (tuned / "model").is_dir():
            return base, tuned / "model", None
        if (tuned / "adapter").is_dir():
            return base, None, tuned / "adapter"
        raise IlaError(f"tuned run {tuned}: holds no weights (expected model/ or adapter/)")
    if (tuned / "adapter_config.json").is_file():
        return base, None, tuned
    if tuned.exists() and not tuned.is_dir():
        raise IlaError(f"tuned {tuned}: expected a model folder, an adapter folder or an ila train run folder")
    return base, tuned if tuned.exists() else Path(config.tuned), None


def load_pair(config: AnalyzeConfig):
    """(base model, tuned model, tokenizer, base spec): the tuned model has the base's architecture (LoRA merged)."""
    from ila.adapters import load_lora_adapter
    from ila.analysis.weights import check_same_architecture
    from ila.models import load_model

    dtype = torch.bfloat16 if config.dtype == "bfloat16" else torch.float32
    base_spec, folder, adapter = resolve_tuned(config)
    base, tokenizer = load_model(base_spec, dtype=dtype)
    if adapter is not None:
        tuned = load_lora_adapter(copy.deepcopy(base), adapter).merge_and_unload()  # the base read once
    else:
        tuned, _ = load_model(str(folder), dtype=dtype)
    check_same_architecture(base, tuned)
    return base.eval(), tuned.eval(), tokenizer, base_spec


def run_analyze(config: AnalyzeConfig, out: str | Path) -> list[dict]:
    """Analyse base vs tuned on the data and write the run folder `out`; returns the metric rows. In a
    multi-process launch every process checks the inputs, and the main one analyses (others return [])."""
    from tqdm.auto import tqdm

    from ila.analysis.stream import Stream
    from ila.analysis.weights import segment_ranges, swap_rows, weight_change
    from ila.data import build_dataset, collate, load_examples
    from ila.evaluation.heldout import heldout_loss
    from ila.layers import discover_layers, find_blocks
    from ila.models import model_label
    from ila.ranking import Ranking
    from ila.selection import check_matches

    config.validate()
    out = Path(out)
    check_output_folder(out, "metrics.json")
    barrier()  # every process has checked the folder before the main one writes to it
    started = time.perf_counter()
    ranking = None
    if config.ranking is not None:
        ranking = Ranking.load(config.ranking)
        ranking.metadata["source"] = f"ranking {config.ranking}"
    examples = load_examples(config.data, max_examples=config.max_examples, seed=config.seed)
    base, tuned, tokenizer, base_spec = load_pair(config)
    n_blocks = len(find_blocks(base)[1])
    if config.swap:
        segment_ranges(n_blocks, config.segments)  # refuses a bad --segments before any pass
    layers = discover_layers(base)
    if ranking is not None:
        check_matches(ranking, layers)
    dataset = build_dataset(examples, tokenizer, max_length=config.max_length)
    if not is_main_process():  # forward passes only, nothing to share: the main process analyses and writes
        return []
    collator = collate(tokenizer)
    device = next(base.parameters()).device

    stream = Stream(n_blocks + 1, alpha=config.alpha, threshold=config.sparsity_threshold, probe=config.probe)
    timings = {}
    t0 = time.perf_counter()
    for start in tqdm(range(0, len(dataset), config.batch_size), desc="analyze", unit="batch"):
        rows = [dataset[i] for i in range(start, min(start + config.batch_size, len(dataset)))]
        batch = {k: v.to(device) for k, v in collator(rows).items()}
        stream.add({"base": base, "tuned": tuned}, batch)
    rows = stream.rows()
    timings["representations_s"] = time.perf_counter() - t0
    rows += weight_change(base, tuned)
    if config.swap:
        t0 = time.perf_counter()
        rows += swap_rows(base, tuned, config.segments,
                          lambda m: heldout_loss(m, dataset, collator, batch_size=config.batch_size)["perplexity"])
        timings["swap_s"] = time.perf_counter() - t0

    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "metrics.csv", to_csv(rows))
    correlations = None
    if ranking is not None:
        correlations = correlate(rows, ranking)
        write_text_atomic(out / "correlation.csv", correlations_csv(correlations))
    from ila.report.analysis import plot_analysis

    plot_analysis(rows, out, title=f"{model_label(base_spec)}: base vs {config.tuned}")
    timings["total_s"] = time.perf_counter() - started
    write_json_atomic(out / "metrics.json", {
        "format": "ila.analysis", "version": 1, "base": model_label(base_spec), "tuned": str(config.tuned),
        "data": config.data or "default", "examples": len(dataset), "blocks": n_blocks,
        "hidden_states": n_blocks + 1, "timings": timings, "config": to_dict(config),
        **({"correlation": correlations} if correlations is not None else {}), "rows": rows,
    })
    return rows


def to_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in COLUMNS})
    return buffer.getvalue()


def correlate(rows: list[dict], ranking) -> list[dict]:
    """Spearman's ρ across blocks between each per-layer metric's value and the ranking's block importance
    (`Ranking.by_block`). Hidden state ℓ ≥ 1 is block ℓ − 1's output; the embeddings (ℓ = 0) take no part."""
    from ila.ranking import spearman

    importance = {e.layer.block: e.score for e in ranking.by_block().entries}
    out = []
    for metric in dict.fromkeys(r["metric"] for r in rows if r["mode"] != "swap"):
        pairs = [(importance[r["layer"] - 1], r["value"]) for r in rows
                 if r["metric"] == metric and r["layer"] - 1 in importance]
        if len(pairs) >= 3:
            out.append({"metric": metric, "spearman": spearman([p[0] for p in pairs], [p[1] for p in pairs]),
                        "blocks": len(pairs)})
    return out


def correlations_csv(correlations: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=["metric", "spearman", "blocks"], lineterminator="\n")
    writer.writeheader()
    writer.writerows(correlations)
    return buffer.getvalue()
