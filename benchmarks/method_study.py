"""The importance-method study of docs/importance-methods.md, from two `ila identify --method all` runs on
disjoint data (same model and settings) and an optional `ila experiment` freeze grid.

    ila identify --method all --config configs/all_methods.yaml --data gsm8k \\
        --out runs/study/gsm8k
    ila identify --method all --config configs/all_methods.yaml --data roleplay \\
        --out runs/study/roleplay
    python benchmarks/method_study.py runs/study/gsm8k runs/study/roleplay \\
        [--freeze runs/predictive/predictive_smollm2.csv]

Prints, as Markdown tables: each method's cost (its own `timings.total_s`: load + stage 1 if it uses one +
scoring); for each dataset the Jaccard@0.75 / Spearman agreement of every pair of methods; how well each method's
block order predicts block-level `shapley` (Spearman of block orders, `Ranking.by_block`); each method's
Jaccard@0.75 and Spearman between the two datasets; and, with --freeze, the held-out loss of each
"freeze the bottom 25 %" cell.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from ila.comparison import compare
from ila.importance.base import method_names
from ila.ranking import Ranking


def load(folder: Path) -> dict[str, Ranking]:
    return {m: Ranking.load(folder / m / "ranking.json") for m in method_names("all")
            if (folder / m / "ranking.json").is_file()}


def matrix_table(names: list[str], matrix: list[list[float]], upper: list[list[float]]) -> list[str]:
    """Jaccard below the diagonal, Spearman above."""
    lines = ["| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    for i, a in enumerate(names):
        cells = ["—" if i == j else f"{(matrix if i > j else upper)[i][j]:.2f}" for j in range(len(names))]
        lines.append(f"| **{a}** | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs=2, type=Path, help="two --method all folders (same model, disjoint data)")
    parser.add_argument("--freeze", type=Path, help="the CSV table of an `ila experiment` freeze grid")
    parser.add_argument("--reference", default="shapley", help="block-level reference method (default shapley)")
    args = parser.parse_args()
    runs = {folder.name: load(folder) for folder in args.runs}
    names = [m for m in method_names("all") if all(m in r for r in runs.values())]
    first = next(iter(runs.values()))
    meta = first[names[0]].metadata
    print(f"model {meta['model']}, {meta['ranked_layers']} layers, seed {meta['seed']}; data: "
          + ", ".join(f"{k} ({r[names[0]].metadata.get('data') or '-'})" for k, r in runs.items()))

    print("\n### Cost (seconds: load + stage 1 if used + scoring; 2-core CPU)\n")
    print("| method | " + " | ".join(runs) + " |\n|---" * 1 + "|---" * len(runs) + "|")
    for m in names:
        print(f"| {m} | " + " | ".join(f"{r[m].metadata['timings']['total_s']:.0f}" for r in runs.values()) + " |")

    for name, r in runs.items():
        c = compare([r[m] for m in names], labels=names)
        print(f"\n### Agreement on {name}: Jaccard@0.75 below the diagonal, Spearman above\n")
        print("\n".join(matrix_table(names, c.jaccard, c.spearman)))

    ref = args.reference
    if all(ref in r for r in runs.values()):
        print(f"\n### Spearman of block orders against block-level `{ref}`\n")
        print("| method | " + " | ".join(runs) + " |\n|---" + "|---" * len(runs) + "|")
        for m in names:
            if m != ref:
                row = [compare([r[m], r[ref]], level="block").spearman[0][1] for r in runs.values()]
                print(f"| {m} | " + " | ".join(f"{v:.2f}" for v in row) + " |")

    (a, ra), (b, rb) = runs.items()
    print(f"\n### Same method, {a} vs {b} (dataset stability)\n")
    print("| method | Jaccard@0.75 | Spearman | Jaccard@0.75 of block orders |\n|---|---|---|---|")
    for m in names:
        blocks = compare([ra[m], rb[m]], level="block")
        print(f"| {m} | {ra[m].jaccard(rb[m], 0.75):.3f} | {ra[m].spearman(rb[m]):.3f} | "
              f"{blocks.jaccard[0][1]:.3f} |")

    if args.freeze:
        with open(args.freeze) as f:
            rows = list(csv.DictReader(f))
        print("\n### Freeze the bottom 25 % by each method, then LoRA (held-out loss, lower is better)\n")
        print("| selection | held-out loss | layers trained |\n|---|---|---|")
        for row in sorted(rows, key=lambda r: float(r["heldout_loss_mean"])):
            print(f"| {row['selection']} | {float(row['heldout_loss_mean']):.4f} | "
                  f"{float(row['trained_layer_fraction_mean']):.0%} |")


if __name__ == "__main__":
    main()
