"""How fast ILA's stage 2 settles, and how its ranking agrees across seeds and datasets.

Runs stage 2 alone (through the product's `run_stage2`) on the stage-1 adapters of finished identify runs,
under one or more stage-2 settings (`IlaOptions` overrides; the settle rule stops each run, `--steps` caps it),
and records the scores after every step. It prints each run's settle step and stage-2 time, then for the runs
named by `--pairs` (e.g. the same data under seeds 0 and 1) the Jaccard@0.75 and Spearman of the final rankings
(as the product writes them, tie-break included) and of the scores at every few steps. Example (the demo's
runs, seeds 0 and 1 on gsm8k, seed 0 on roleplay):

    python benchmarks/stage2_settle.py --runs runs/s0/gsm8k runs/s1/gsm8k runs/s0/roleplay \\
        --pairs 0,1 0,2 --setting learning_rate=0.2 --setting learning_rate=0.2,data=heldout
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
import warnings
from pathlib import Path

from transformers import TrainerCallback

from ila.config import IdentifyConfig, load_config
from ila.importance.ila import IlaOptions, split_and_probe
from ila.importance.job import load_inputs
from ila.importance.stage2 import run_stage2
from ila.layers import base_model_of
from ila.ranking import Ranking


class _Record(TrainerCallback):
    """The scores and ∂L/∂s after every optimizer step."""

    def __init__(self) -> None:
        self.scores: list[list[float]] = []
        self.grads: list[list[float]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append(base_model_of(model).ila_gates.scores.grad.detach().float().tolist())

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.scores.append(base_model_of(model).ila_gates.scores.detach().float().tolist())


def _config(run: Path) -> IdentifyConfig:
    """The identify config of a finished run, with its stage-1 adapter as --adapter."""
    meta = json.loads((run / "ranking.json").read_text())["metadata"]
    old = meta["config"]
    keep = {k: old[k] for k in ("model", "data", "seed", "max_length", "max_examples", "heldout_fraction")}
    return load_config(None, {**keep, "adapter": str(run / "adapter"), "lora.r": old["lora"]["r"]})


def _setting(text: str) -> IlaOptions:
    options = IlaOptions()
    for item in filter(None, text.split(",")):
        key, value = item.split("=")
        kind = type(getattr(options, key))
        setattr(options, key, kind(value))
    return options


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", nargs="+", type=Path, required=True, help="finished identify run folders")
    parser.add_argument("--pairs", nargs="+", default=["0,1"], help="index pairs of --runs to compare")
    parser.add_argument("--steps", type=int, default=200, help="stage-2 step cap of every run")
    parser.add_argument("--setting", action="append", default=[],
                        help="IlaOptions overrides, e.g. examples=8,learning_rate=0.2 (repeat to compare)")
    parser.add_argument("--out", type=Path, help="write the score trajectories as JSON here")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    settings = args.setting or [""]
    pairs = [tuple(int(i) for i in p.split(",")) for p in args.pairs]
    print(f"runs: {[str(r) for r in args.runs]}; pairs {pairs}; {args.steps} steps; torch threads "
          f"{__import__('torch').get_num_threads()}")
    results = {}
    for text in settings:
        options = dataclasses.replace(_setting(text), max_steps=args.steps)
        trajectories, grads, finals, seconds, layers_of = [], [], [], [], []
        print(f"\nsetting {text or 'defaults'}: {options}")
        for i, run in enumerate(args.runs):
            config = _config(run)
            loaded = load_inputs(config)
            split, probe = split_and_probe(loaded.train, loaded.heldout, options, config.seed)
            record = _Record()
            started = time.perf_counter()
            with tempfile.TemporaryDirectory() as tmp:
                s2 = run_stage2(loaded.model, loaded.layers, split, probe, loaded.collator, options, Path(tmp),
                                seed=config.seed, callbacks=[record])
            seconds.append(time.perf_counter() - started)
            trajectories.append(record.scores)
            grads.append(record.grads)
            finals.append(Ranking.from_scores(loaded.layers, s2.scores, tiebreak=[-g for g in s2.gate_gradient]))
            layers_of.append(loaded.layers)
            checks = " ".join(f"{step}:{loss:.4f}" for step, loss in s2.checks)
            print(f"run {i}: {s2.steps} steps, settled at {s2.settled_step}, {seconds[-1]:.0f} s; probe objective "
                  f"at checks {checks}", flush=True)
            del loaded
        for a, b in pairs:
            print(f"final rankings {a}-{b}: jaccard@0.75 {finals[a].jaccard(finals[b], 0.75):.3f}, "
                  f"spearman {finals[a].spearman(finals[b]):.3f}")
        print("step " + " ".join(f"J{a}{b}    rho{a}{b}" for a, b in pairs))
        for step in range(min(len(t) for t in trajectories)):
            cells = []
            for a, b in pairs:
                # equal scores have equal σ', so −∂L/∂s orders them as −∂L/∂γ does (the product's tiebreak)
                ra = Ranking.from_scores(layers_of[a], trajectories[a][step], tiebreak=[-g for g in grads[a][step]])
                rb = Ranking.from_scores(layers_of[b], trajectories[b][step], tiebreak=[-g for g in grads[b][step]])
                cells.append(f"{ra.jaccard(rb, 0.75):.3f}  {ra.spearman(rb):.3f}")
            if (step + 1) % 5 == 0:
                print(f"{step + 1:>4} " + "  ".join(cells))
        results[text] = {"trajectories": trajectories, "seconds": seconds,
                         "final": [[e.score for e in r.entries] for r in finals]}
    if args.out:
        args.out.write_text(json.dumps(results))
    assert all(math.isfinite(x) for r in results.values() for t in r["trajectories"] for s in t for x in s)


if __name__ == "__main__":
    main()
