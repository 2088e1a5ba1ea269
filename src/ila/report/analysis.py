"""Plots of `ila analyze`: each metric family across depth, the layer-swap bars, and the metric × metric
correlation heatmap (seeds/004 Figs. 1, 2, 5, 6)."""

from __future__ import annotations

from pathlib import Path

from ila.report.figure import save_png

FAMILIES = {  # file name -> metrics plotted in it, one panel each
    "alignment": ["cka", "cosine", "mean_shift"],
    "entropy": ["prompt_entropy", "dataset_entropy"],
    "rank": ["effective_rank", "rank_deficiency"],
    "geometry": ["sparsity", "curvature"],
    "probe": ["logit_lens_acc", "logit_lens_ppl"],
    "weights": ["weight_change", "weight_change_all"],
}


def plot_analysis(rows: list[dict], out: str | Path, *, title: str = "") -> list[Path]:
    """Write `<family>.png` for each family with rows, `swap.png` and `metric_correlation.png`; returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    out = Path(out)
    written = []
    by_metric: dict[str, list[dict]] = {}
    for row in rows:
        by_metric.setdefault(row["metric"], []).append(row)
    for family, names in FAMILIES.items():
        present = [n for n in names if n in by_metric]
        if present:
            written.append(_family(family, present, by_metric, out / f"{family}.png", title))
    if "swap_ppl" in by_metric:
        written.append(_swap(by_metric["swap_ppl"], out / "swap.png", title))
    layered = {m: rs for m, rs in by_metric.items() if m != "swap_ppl"}
    if len(layered) >= 2:
        written.append(_correlation(layered, out / "metric_correlation.png", title))
    return written


def _family(family: str, names: list[str], by_metric: dict[str, list[dict]], path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.2), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        rs = sorted(by_metric[name], key=lambda r: r["layer"])
        x = [r["layer"] for r in rs]
        if rs[0]["base"] is not None:
            ax.plot(x, [r["base"] for r in rs], marker=".", label="base")
            ax.plot(x, [r["tuned"] for r in rs], marker=".", label="tuned")
            ax.legend(fontsize=8)
        else:
            ax.plot(x, [r["value"] for r in rs], marker=".", color="C2")
        ax.set_title(name, fontsize=10)
        ax.set_xlabel("block" if family == "weights" else "layer (hidden state)")
        if name == "logit_lens_ppl":
            ax.set_yscale("log")
    fig.suptitle(title, fontsize=9)
    return save_png(fig, path)


def _swap(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib.pyplot as plt

    rows = sorted(rows, key=lambda r: r["layer"])
    x = range(len(rows))
    fig, ax = plt.subplots(figsize=(1.3 * len(rows) + 2, 3.2))
    ax.bar([i - 0.2 for i in x], [r["base"] for r in rows], width=0.4, label="base with the tuned segment")
    ax.bar([i + 0.2 for i in x], [r["tuned"] for r in rows], width=0.4, label="tuned with the base segment")
    ax.set_xticks(list(x), [f"{r['layer']}\nblocks {r.get('blocks', '')}" for r in rows], fontsize=8)
    ax.set_ylabel("held-out perplexity")
    ax.legend(fontsize=8)
    ax.set_title(f"layer swapping {title}", fontsize=9)
    return save_png(fig, path)


def _correlation(by_metric: dict[str, list[dict]], path: Path, title: str) -> Path:
    """Spearman's ρ between metrics' values across the layers they share."""
    import matplotlib.pyplot as plt

    from ila.ranking import spearman

    names = list(by_metric)
    values = {m: {r["layer"]: r["value"] for r in rs} for m, rs in by_metric.items()}
    matrix = []
    for a in names:
        row = []
        for b in names:
            shared = sorted(set(values[a]) & set(values[b]))
            row.append(spearman([values[a][k] for k in shared], [values[b][k] for k in shared])
                       if len(shared) >= 3 else float("nan"))
        matrix.append(row)
    fig, ax = plt.subplots(figsize=(0.45 * len(names) + 3, 0.45 * len(names) + 2))
    image = ax.imshow(matrix, vmin=-1, vmax=1, cmap="RdBu_r")
    ax.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    fig.colorbar(image, ax=ax, label="Spearman ρ across layers")
    ax.set_title(f"metric × metric {title}", fontsize=8)
    return save_png(fig, path)
