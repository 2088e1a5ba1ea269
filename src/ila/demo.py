"""`ila demo`: rank smollm2-135m's layers on three embedded SFT sets of different kinds and compare them.

GSM8K (maths worked solutions), GPTeacher roleplay (in-character answers) and hh-rlhf harmless (the chosen
answer of a dialogue) ship inside ila (`ila datasets`), so the demo needs no download besides the model.

The paper's Table 2 compares rankings from different alignment datasets by Jaccard@75 %. The demo does the
same in miniature and prints the Jaccard@0.75 and Spearman matrices it measured, next to the Jaccard two
random rankings would have.
"""

from __future__ import annotations

import math
import time
from importlib import resources
from pathlib import Path

from ila.api import identify
from ila.comparison import compare
from ila.errors import IlaError
from ila.ranking import Ranking

DATASETS = ("gsm8k", "roleplay", "harmless")
"""The embedded SFT sets the demo ranks on (one run each, named after the set)."""


def demo_config_path() -> Path:
    """The packaged demo recipe (`ila/recipes/demo.yaml`)."""
    return Path(str(resources.files("ila") / "recipes" / "demo.yaml"))


def random_jaccard(n: int, top: float) -> float:
    """Expected Jaccard of the top-k sets of two independent random rankings of n layers (k = ⌈top·n⌉)."""
    k = math.ceil(top * n - 1e-9)
    overlap = k * k / n  # hypergeometric mean of |A ∩ B|
    return overlap / (2 * k - overlap)


def _reuse(run_dir: Path, *, seed: int, max_steps: int | None, stage2_steps: int | None) -> Ranking:
    """A finished demo run, if it was made with the same settings; else a one-line error."""
    ranking = Ranking.load(run_dir / "ranking.json")
    config = ranking.metadata.get("config", {})
    wanted = {"seed": seed, "stage1.max_steps": max_steps, "ila.max_steps": stage2_steps}
    have = {"seed": config.get("seed"), "stage1.max_steps": config.get("stage1", {}).get("max_steps"),
            "ila.max_steps": config.get("ila", {}).get("max_steps")}
    for key, value in wanted.items():
        if value is not None and have[key] != value:
            raise IlaError(f"demo folder {run_dir}: holds a run with {key}={have[key]}, not {value}; "
                           "pass another --out")
    return ranking


def _stage1_summary(meta: dict) -> str:
    """Stage-1 steps, and whether (or how nearly) the probe loss became ε-stable."""
    text = f"stage 1: {meta['stage1_steps']} steps, "
    if meta.get("stability_step"):
        return text + f"ε-stable at step {meta['stability_step']}"
    probe = meta.get("stage1_probe_losses") or []
    if len(probe) < 2:
        return text + "step cap reached before ε-stability"
    (s0, l0), (s1, l1) = probe[-2], probe[-1]
    return (text + f"step cap reached before ε-stability (probe loss {probe[0][1]:.3f} → {l1:.3f}, "
            f"last change {abs(l1 - l0) / (s1 - s0):.4f}/step vs ε = {meta['epsilon']:g})")


def run_demo(out: str | Path, *, max_steps: int | None = None, stage2_steps: int | None = None,
             seed: int = 0) -> list[list[float]]:
    """Run one identification per set into `out/<set>/`, print a summary; returns the Jaccard@0.75 matrix."""
    out = Path(out)
    started = time.perf_counter()
    rankings = {}
    for name in DATASETS:
        print(f"[{name}] ILA on smollm2-135m with the embedded set {name!r}")
        run_dir = out / name
        if (run_dir / "ranking.json").exists():
            rankings[name] = _reuse(run_dir, seed=seed, max_steps=max_steps, stage2_steps=stage2_steps)
            print(f"[{name}] reusing the finished run in {run_dir}")
            continue
        rankings[name] = identify(run_dir, config=demo_config_path(), data=name, seed=seed, max_steps=max_steps,
                                  stage2_steps=stage2_steps)
        meta = rankings[name].metadata
        settled = meta.get("stage2_settled_step")
        print(f"[{name}] {_stage1_summary(meta)}; stage 2: {meta['stage2_steps']} steps, "
              f"{f'settled at step {settled}' if settled else 'step cap before it settled'}; "
              f"{meta['timings']['total_s']:.0f} s")
    comparison = compare(list(rankings.values()), labels=list(rankings), top=0.75)
    n = len(next(iter(rankings.values())).entries)
    print()
    print(f"rankings and heatmaps: {out}/<set>/ranking.json, heatmap.png")
    print(f"jaccard@0.75 (two random rankings of {n} layers: {random_jaccard(n, 0.75):.3f}; paper, Llama-2-7B "
          "across alignment datasets: >= 0.90)")
    print(_matrix(list(rankings), comparison.jaccard))
    print("spearman")
    print(_matrix(list(rankings), comparison.spearman))
    print(f"demo time: {time.perf_counter() - started:.0f} s")
    return comparison.jaccard


def _matrix(names: list[str], values: list[list[float]]) -> str:
    """A labelled square matrix, three decimals."""
    width = max(len(n) for n in names) + 2
    rows = [" " * width + "".join(f"{n:>{width}}" for n in names)]
    rows += [f"{a:<{width}}" + "".join(f"{v:>{width}.3f}" for v in row) for a, row in zip(names, values)]
    return "\n".join(rows)
