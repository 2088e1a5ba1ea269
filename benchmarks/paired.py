"""Paired differences per training seed between the rows of an `ila experiment` grid and a reference row.

Reads `OUT/<name>.json` (every cell's summary, with its seed) and prints, per (model, data, method), each
selection's held-out loss and each benchmark accuracy as the difference to the reference selection on the same
seed, then their mean ± std over the seeds — the reading the mean ± std columns of the table cannot give when
most of the spread is shared by all rows of a seed.

    python benchmarks/paired.py runs/predictive/predictive_smollm2.json --reference LoRA
"""

from __future__ import annotations

import argparse
import ast
import json
import statistics
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("table", type=Path, help="the grid's JSON (OUT/<name>.json)")
    parser.add_argument("--reference", default="LoRA", help="label of the selection the others are set against")
    args = parser.parse_args()
    rows = {ast.literal_eval(k): v for k, v in json.loads(args.table.read_text()).items()}
    metrics = ["heldout_loss"] + sorted({k for cells in rows.values() for c in cells for k in c
                                         if k.startswith(("acc ", "em "))})
    groups = sorted({key[:3] for key in rows}, key=str)
    for group in groups:
        reference = rows.get((*group, args.reference))
        if reference is None:
            continue
        base = {c["seed"]: c for c in reference}
        seeds = sorted(base)
        print(f"\n### {' · '.join(str(x) for x in group)}: difference to {args.reference!r}, per seed "
              f"({', '.join(map(str, seeds))}), then mean ± std\n")
        print("| selection | " + " | ".join(metrics) + " |")
        print("|---" * (len(metrics) + 1) + "|")
        print(f"| {args.reference} | " + " | ".join(
            f"{statistics.fmean(base[s][m] for s in seeds):.4f}" for m in metrics) + " |")
        for key, cells in rows.items():
            if key[:3] != group or key[3] == args.reference:
                continue
            mine = {c["seed"]: c for c in cells}
            cols = []
            for m in metrics:
                diffs = [mine[s][m] - base[s][m] for s in seeds if s in mine and mine[s].get(m) is not None]
                spread = f" ± {statistics.stdev(diffs):.4f}" if len(diffs) > 1 else ""
                cols.append(" ".join(f"{d:+.4f}" for d in diffs) + f" → {statistics.fmean(diffs):+.4f}{spread}"
                            if diffs else "–")
            print(f"| {key[3]} | " + " | ".join(cols) + " |")


if __name__ == "__main__":
    main()
