"""Where ILA's seed-to-seed disagreement comes from, per embedded set (docs/method.md, *Agreement across seeds*).

ILA's ranking depends on three random things: the stage-1 update (LoRA initialisation, dropout, batch order:
the training seed), stage 2's minibatches and probe set (its seed), and which examples of the set were drawn
(the data seed). This study holds two of them fixed and varies the third, per set:

    stage 2        one stage-1 update (seed 0, data seed 0); stage 2 under seeds 0..K-1
    stage 1        updates of training seeds 0..K-1 on data seed 0; stage 2 under seed 0 on each
    data sample    updates of seed 0 on data seeds 0..K-1; stage 2 under seed 0, each on its own sample
    training seed  updates of seeds 0..K-1 on data seed 0; stage 2 under the same seed (what `--seed` varies)

and prints, per source, the mean and minimum Jaccard@0.75 and the mean Spearman ρ over every pair, then the
Jaccard@0.75 matrix between the sets (seed 0, data seed 0). Stage 1 runs once per (set, seed, data seed)
through `ila identify --method update-norm` (which trains and saves the update, and ranks by its norm: that
ranking's agreement is printed beside ILA's); stage 2 reruns on the saved adapters through the product's own
`run_stage2`, under the defaults or each `--setting` (IlaOptions overrides) — stage-2 candidates are compared
on the very same updates. Stage-1 runs are kept in `--out` and reused.

    python benchmarks/ila_disagreement.py --data gsm8k roleplay harmless --seeds 3 --out runs/disagreement
    python benchmarks/ila_disagreement.py --data gsm8k --setting learning_rate=0.1 --setting max_steps=80
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch
import yaml

from ila.api import identify
from ila.config import load_config
from ila.demo import demo_config_path, random_jaccard
from ila.importance.ila import IlaOptions, split_and_probe
from ila.importance.job import load_inputs
from ila.importance.stage2 import run_stage2
from ila.ranking import Ranking


def _setting(text: str, base: IlaOptions) -> IlaOptions:
    """`base` with `key=value,...` overrides (values take the type of the field's default)."""
    options = dataclasses.replace(base)
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        setattr(options, key, type(getattr(options, key))(value))
    return options


def stage1_recipe(recipe: Path, out: Path) -> Path:
    """The recipe without its `ila:` section, for the update-norm runs that train stage 1."""
    settings = yaml.safe_load(recipe.read_text())
    settings.pop("ila", None)
    path = out / "stage1" / "recipe.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(settings))
    return path


def stage1_run(recipe: Path, data: str, seed: int, data_seed: int, out: Path) -> Path:
    """The stage-1 update of (data, seed, data seed), trained once by `ila identify --method update-norm`."""
    folder = out / "stage1" / Path(data).stem / f"seed{seed}_data{data_seed}"
    if not (folder / "ranking.json").is_file():
        identify(folder, config=recipe, method="update-norm", data=data, seed=seed, data_seed=data_seed,
                 resume=folder.exists())
    return folder


def stage2_rankings(run: Path, options: IlaOptions, seeds: list[int]) -> tuple[dict[int, Ranking], list[float]]:
    """Stage 2 under each of `seeds` (minibatch order and probe set) on the update saved in `run`."""
    meta = Ranking.load(run / "ranking.json").metadata
    old = meta["config"]
    keep = {k: old[k] for k in ("model", "data", "seed", "data_seed", "max_length", "max_examples",
                                "heldout_fraction")}
    config = load_config(None, {**keep, "adapter": str(run / "adapter"), "lora.r": old["lora"]["r"],
                                "lora.alpha": old["lora"]["alpha"]})
    loaded = load_inputs(config)
    rankings, seconds = {}, []
    for seed in seeds:
        split, probe = split_and_probe(loaded.train, loaded.heldout, options, seed)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as tmp:
            s2 = run_stage2(loaded.model, loaded.layers, split, probe, loaded.collator, options, Path(tmp),
                            seed=seed)
        seconds.append(time.perf_counter() - started)
        rankings[seed] = Ranking.from_scores(loaded.layers, s2.scores, tiebreak=[-g for g in s2.gate_gradient],
                                             metadata={"stage2_steps": s2.steps, "settled": s2.settled_step})
    return rankings, seconds


def agreement(rankings: list[Ranking]) -> dict[str, float]:
    """Mean and minimum Jaccard@0.75 and mean Spearman over every pair."""
    pairs = list(itertools.combinations(rankings, 2))
    js = [a.jaccard(b, 0.75) for a, b in pairs]
    return {"pairs": len(pairs), "jaccard_mean": statistics.fmean(js), "jaccard_min": min(js),
            "spearman_mean": statistics.fmean(a.spearman(b) for a, b in pairs)}


def study(args, recipe: Path, data: str, options: IlaOptions) -> dict:
    """The four sources of one set under one stage-2 setting."""
    seeds = list(range(args.seeds))
    by_seed = {s: stage1_run(recipe, data, s, 0, args.out) for s in seeds}
    by_sample = {d: stage1_run(recipe, data, 0, d, args.out) for d in seeds}
    stage1_s = [Ranking.load(r / "ranking.json").metadata["timings"]["stage1_s"]
                for r in {*by_seed.values(), *by_sample.values()}]
    on_first, seconds = stage2_rankings(by_seed[0], options, seeds)
    same_seed = {0: on_first[0]}
    fixed_stage2 = {0: on_first[0]}
    for s in seeds[1:]:
        got, took = stage2_rankings(by_seed[s], options, sorted({0, s}))
        fixed_stage2[s], same_seed[s] = got[0], got[s]
        seconds += took
    samples = {0: on_first[0]}
    for d in seeds[1:]:
        got, took = stage2_rankings(by_sample[d], options, [0])
        samples[d] = got[0]
        seconds += took
    norms = [Ranking.load(by_seed[s] / "ranking.json") for s in seeds]
    return {
        "sources": {
            "stage 2": agreement(list(on_first.values())),
            "stage 1": agreement(list(fixed_stage2.values())),
            "data sample": agreement(list(samples.values())),
            "training seed": agreement(list(same_seed.values())),
            "update-norm, training seed": agreement(norms),
        },
        "stage1_s_median": statistics.median(stage1_s),
        "stage2_s_median": statistics.median(seconds),
        "stage2_steps": [r.metadata["stage2_steps"] for r in same_seed.values()],
        "reference": same_seed[0],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", default=["gsm8k", "roleplay", "harmless"], help="embedded sets")
    parser.add_argument("--config", type=Path, default=demo_config_path(), help="identify recipe (default: demo)")
    parser.add_argument("--seeds", type=int, default=3, help="K: seeds 0..K-1 of each source")
    parser.add_argument("--setting", action="append", default=[],
                        help="stage-2 IlaOptions overrides, e.g. learning_rate=0.1,max_steps=80 (repeat to compare)")
    parser.add_argument("--out", type=Path, default=Path("runs/disagreement"), help="stage-1 runs and results")
    args = parser.parse_args()
    if args.seeds < 2:
        parser.error("--seeds: at least 2")
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TQDM_DISABLE", "1")
    recipe = load_config(args.config, {})
    stage1_config = stage1_recipe(args.config, args.out)
    print(f"setup: {recipe.model}, {recipe.max_examples} examples ≤ {recipe.max_length} tokens, LoRA r "
          f"{recipe.lora.r}, stage 1 ≤ {recipe.stage1.max_steps} steps; seeds 0..{args.seeds - 1}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    results: dict = {}
    for text in args.setting or [""]:
        options = _setting(text, recipe.options("ila") or IlaOptions())
        name = text or "the recipe's"
        print(f"\n## stage 2: {name} ({options})\n")
        print("| set | source | pairs | J@0.75 mean | J min | ρ mean |")
        print("|---|---|---|---|---|---|")
        per_set = {}
        for data in args.data:
            per_set[data] = study(args, stage1_config, data, options)
            for source, a in per_set[data]["sources"].items():
                print(f"| {data} | {source} | {a['pairs']} | {a['jaccard_mean']:.3f} | {a['jaccard_min']:.3f} | "
                      f"{a['spearman_mean']:.3f} |", flush=True)
        layers = len(next(iter(per_set.values()))["reference"].entries)
        print(f"\ntwo random rankings of {layers} layers: J@0.75 {random_jaccard(layers, 0.75):.3f}")
        print("\n| set | stage-1 s (median) | stage-2 s (median) | stage 2 / stage 1 | stage-2 steps |")
        print("|---|---|---|---|---|")
        for data, r in per_set.items():
            print(f"| {data} | {r['stage1_s_median']:.0f} | {r['stage2_s_median']:.0f} | "
                  f"{r['stage2_s_median'] / r['stage1_s_median']:.2f} | {r['stage2_steps']} |")
        if len(args.data) > 1:
            print("\nacross sets (seed 0, data seed 0): " + ", ".join(
                f"{a}–{b} J {per_set[a]['reference'].jaccard(per_set[b]['reference'], 0.75):.3f} "
                f"ρ {per_set[a]['reference'].spearman(per_set[b]['reference']):.3f}"
                for a, b in itertools.combinations(args.data, 2)))
        results[name] = {d: {k: v for k, v in r.items() if k != "reference"} for d, r in per_set.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "disagreement.json").write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
