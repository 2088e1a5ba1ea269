"""`ila report`: one self-contained HTML page of run folders and rankings (no network, images inline as PNG).

Inputs, each detected by what it holds (`inputs.py`): an `ila identify` run (ranking.json), an `ila identify
--method all` run (comparison.json + DIR/<method>/ranking.json), an `ila train` run (run.json), an `ila analyze` run
(metrics.json, or metrics.csv), a ranking.json file. Sections (stable ids): `inputs`; `ranking-<n>` per ranking
(heatmap, top and bottom layers, `curves-<n>`: stage-1 probe loss with the ε-stop and stage-2 loss, where recorded,
drawn by `curves.py`); `agreement` (two or more rankings); `train-<n>`; `analysis-<n>`; `cost`. This module renders
the page and writes it (`write_report`).
"""

from __future__ import annotations

import base64
import html
import json
import math
import re
import tempfile
from pathlib import Path
from typing import Any

from ila.errors import IlaError, first_line
from ila.io import write_text_atomic
from ila.ranking import Ranking
from ila.report.curves import plot_curves
from ila.report.inputs import (
    AnalysisInput,
    Inputs,
    RankingInput,
    TrainInput,
    as_numbers,
    as_pairs,
    is_number,
    read_inputs,
)

TABLE_ROWS = 10  # most layers in each of the top and bottom tables
AGREEMENT_TOP = 0.75  # Jaccard of the top 75 % (seeds/000 Sec. 4.2)

STYLE = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,Helvetica,Arial,sans-serif;margin:0;color:#1d1d1f;
background:#f4f5f7;line-height:1.4}
main{max-width:1150px;margin:0 auto;padding:20px 24px 48px}
header h1{font-size:1.6em;margin:12px 0 4px}
section{background:#fff;border:1px solid #d8dbe0;border-radius:6px;padding:14px 20px;margin:18px 0;overflow-x:auto}
h2{font-size:1.25em;margin:0 0 8px}
h3{font-size:1.02em;margin:16px 0 6px}
table{border-collapse:collapse;font-size:13px;margin:6px 0}
th,td{border:1px solid #d8dbe0;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f0f2f5;font-weight:600}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
img{max-width:100%;height:auto;display:block;margin:8px 0}
figure{margin:8px 0}
figcaption{font-size:12px;color:#555}
.pair{display:flex;flex-wrap:wrap;gap:12px 28px;align-items:flex-start}
code{font-size:12px;word-break:break-all}
.note{color:#666;font-size:13px}
nav a{margin-right:10px;white-space:nowrap}
"""


class Markup(str):
    """HTML that is already escaped (everything else is escaped when written)."""


def write_report(paths: list[str | Path], out: str | Path, *, title: str | None = None) -> Path:
    """Write one self-contained HTML report of run folders and ranking files to `out` (atomically); returns it.
    Every input is read before anything is written: a bad one raises `IlaError` and leaves `out` untouched."""
    out = Path(out)
    if out.is_dir():
        raise IlaError(f"report --out {out}: is a folder; give a file name such as report.html")
    inputs = read_inputs(paths)
    return write_text_atomic(out, render(inputs, title or "ila report"))


# -- rendering -------------------------------------------------------------------------------------------------


def render(inputs: Inputs, title: str) -> str:
    """The whole HTML document of `inputs`; plots are drawn in a temporary folder and inlined."""
    with tempfile.TemporaryDirectory(prefix="ila-report-") as tmp:
        pictures = Pictures(Path(tmp))
        labels = ranking_labels(inputs.rankings)
        body = [_header(title, inputs), _inputs_section(inputs)]
        seen_stage1: dict[str, int] = {}
        for n, item in enumerate(inputs.rankings, 1):
            body.append(_ranking_section(n, labels[n - 1], item, pictures, seen_stage1))
        if len(inputs.rankings) >= 2:
            body.append(_agreement_section(inputs.rankings, labels, pictures))
        body += [_train_section(n, item) for n, item in enumerate(inputs.trains, 1)]
        body += [_analysis_section(n, item, pictures) for n, item in enumerate(inputs.analyses, 1)]
        body.append(_cost_section(inputs, labels))
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            f"<title>{_esc(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n"
            + "\n".join(body) + "\n</main>\n</body>\n</html>\n")


def ranking_labels(rankings: list[RankingInput]) -> list[str]:
    """`<n>: <method>` for every ranking, as the tables and the agreement plot name them."""
    return [f"{n}: {item.label}" for n, item in enumerate(rankings, 1)]


class Pictures:
    """Fresh PNG paths in a temporary folder, and the `<img>` of a written PNG as a data URI."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.count = folder, 0

    def path(self, name: str) -> Path:
        self.count += 1
        return self.folder / f"{self.count:03d}-{name}.png"

    @staticmethod
    def img(path: Path, alt: str, caption: str | None = None) -> Markup:
        data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
        tag = f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'
        return Markup(f"<figure>{tag}<figcaption>{_esc(caption)}</figcaption></figure>" if caption else tag)


def _header(title: str, inputs: Inputs) -> str:
    links = [("inputs", "inputs")]
    links += [(f"ranking-{n}", f"ranking {n}") for n in range(1, len(inputs.rankings) + 1)]
    links += [("agreement", "agreement")] if len(inputs.rankings) >= 2 else []
    links += [(f"train-{n}", f"train {n}") for n in range(1, len(inputs.trains) + 1)]
    links += [(f"analysis-{n}", f"analysis {n}") for n in range(1, len(inputs.analyses) + 1)]
    links += [("cost", "cost")]
    nav = " ".join(f'<a href="#{_esc(i)}">{_esc(text)}</a>' for i, text in links)
    return (f"<header><h1>{_esc(title)}</h1><p class=\"note\">{_esc(_made_by())}</p>"
            f"<nav>{nav}</nav></header>")


def _made_by() -> str:
    from importlib import metadata

    try:
        return f"written by ila {metadata.version('ila')}; one offline file, images inline"
    except metadata.PackageNotFoundError:
        return "written by ila; one offline file, images inline"


def _section(section_id: str, heading: str, parts: list[str]) -> str:
    return f'<section id="{_esc(section_id)}">\n<h2>{_esc(heading)}</h2>\n' + "\n".join(parts) + "\n</section>"


def _inputs_section(inputs: Inputs) -> str:
    rows = [[n, Markup(f"<code>{_esc(path)}</code>"), what, Markup(" ".join(_link(i) for i in ids))]
            for n, (path, what, ids) in enumerate(inputs.found, 1)]
    return _section("inputs", "Inputs", [_table(["#", "path", "detected as", "sections"], rows)])


def _link(section_id: str) -> str:
    return f'<a href="#{_esc(section_id)}">{_esc(section_id)}</a>'


# -- rankings --------------------------------------------------------------------------------------------------


def _ranking_section(n: int, label: str, item: RankingInput, pictures: Pictures, seen_stage1: dict[str, int]) -> str:
    from ila.report.heatmap import plot_heatmap

    ranking, meta = item.ranking, item.ranking.metadata
    model = meta.get("model")
    heatmap = plot_heatmap(ranking, pictures.path("heatmap"), title=f"{label}" + (f": {model}" if model else ""))
    parts = [_table(["", ""], _ranking_summary(item), header=False),
             pictures.img(heatmap, f"heatmap of ranking {n}", "scores per (role, block); dots: the top 75 %"),
             _top_bottom(ranking)]
    curves = _curves(n, item, pictures, seen_stage1)
    if curves:
        parts.append(curves)
    return _section(f"ranking-{n}", f"Ranking {label}", parts)


def _ranking_summary(item: RankingInput) -> list[list[Any]]:
    meta = item.ranking.metadata
    rows: list[list[Any]] = [["source", Markup(f"<code>{_esc(item.source)}</code>")],
                             ["method", item.ranking.method or "unknown"], ["layers ranked", len(item.ranking.entries)]]
    keys = [("level", "level"), ("model", "model"), ("data", "data"), ("seed", "seed"),
            ("near_ties", "near ties at the 75 % cut"), ("update", "stage-1 update"), ("epsilon", "ε"),
            ("stage1_steps", "stage-1 steps"), ("stability_step", "ε-stable at step"),
            ("stage1_final_loss", "stage-1 final loss"), ("stage2_steps", "stage-2 steps"),
            ("stage2_settled_step", "stage-2 settled at step"), ("stage2_final_loss", "stage-2 final objective"),
            ("processes", "processes")]
    # a stop step of None: the step cap came first, where that stage ran (no stage 1 ran on a given adapter)
    ran = {"stability_step": bool(meta.get("stage1_steps")), "stage2_settled_step": bool(meta.get("stage2_steps"))}
    rows += [[name, "never (step cap first)" if meta[key] is None and ran.get(key) else meta[key]]
             for key, name in keys if key in meta]
    if meta.get("adapter"):
        rows.append(["stage-1 update from", Markup(f"<code>{_esc(meta['adapter'])}</code>")])
    return rows


def _top_bottom(ranking: Ranking) -> str:
    """The most and the least important layers (each layer once when there are fewer than twice TABLE_ROWS)."""
    ordered = ranking.ordered()
    entry = {e.layer.name: e for e in ranking.entries}
    top = min(TABLE_ROWS, math.ceil(len(ordered) / 2))
    bottom = min(TABLE_ROWS, len(ordered) - top)
    headers = ["rank", "layer", "score", *(["gate σ(s)"] if ranking.gates else [])]

    def rows(start: int, stop: int) -> list[list[Any]]:
        out = []
        for rank in range(start, stop):
            e = entry[ordered[rank].name]
            out.append([rank + 1, Markup(f"<code>{_esc(e.layer.name)}</code>"), e.score,
                        *([e.gate] if ranking.gates else [])])
        return out

    tables = [f"<div><h3>top {top} of {len(ordered)}</h3>{_table(headers, rows(0, top))}</div>"]
    if bottom:
        tables.append(f"<div><h3>bottom {bottom}</h3>"
                      f"{_table(headers, rows(len(ordered) - bottom, len(ordered)))}</div>")
    return '<div class="pair">' + "".join(tables) + "</div>"


def _curves(n: int, item: RankingInput, pictures: Pictures, seen_stage1: dict[str, int]) -> str:
    """Stage-1 probe loss with the ε-stop marked, and the stage-2 loss, where the metadata holds them. The stage 1
    that the rankings of one --method all run share is drawn once and referred to."""
    meta = item.ranking.metadata
    stage1 = as_pairs(meta.get("stage1_probe_losses"))
    key = json.dumps([item.group, stage1, meta.get("stability_step"), meta.get("epsilon")])
    earlier = seen_stage1.get(key) if stage1 else None
    if stage1 and earlier is None:
        seen_stage1[key] = n
    draw1 = stage1 if earlier is None else []
    stage2 = as_numbers(meta.get("stage2_losses"))
    if not draw1 and not stage2:
        note = (f'<p class="note">stage 1: the same update as ranking {earlier} '
                f'(<a href="#curves-{earlier}">curves</a>).</p>') if earlier else ""
        return f'<div id="curves-{n}">{note}</div>' if note else ""
    path = plot_curves(draw1, meta, stage2, pictures.path("curves"))
    parts = [f'<div id="curves-{n}"><h3>training curves</h3>', pictures.img(path, f"training curves of ranking {n}")]
    parts.append(f'<p class="note">{_esc(_curve_note(meta, bool(draw1), bool(stage2)))}</p>')
    if earlier:
        parts.append(f'<p class="note">stage 1: the same update as ranking {earlier} '
                     f'(<a href="#curves-{earlier}">curves</a>).</p>')
    return "".join(parts) + "</div>"


def _curve_note(meta: dict, stage1: bool, stage2: bool) -> str:
    out = []
    if stage1:
        step = meta.get("stability_step")
        eps = meta.get("epsilon")
        stop = f"ε-stop at step {step}" if step is not None else "no ε-stop: the step cap came first"
        out.append(f"stage 1: probe loss every check; {stop}" + (f" (ε = {eps:g})" if is_number(eps) else "") + ".")
    if stage2:
        settled = meta.get("stage2_settled_step")
        out.append("stage 2: objective of each step; " + (f"settled at step {settled}." if settled is not None
                                                          else "step cap reached before it settled."))
    return " ".join(out)


# -- agreement -------------------------------------------------------------------------------------------------


def _agreement_section(rankings: list[RankingInput], labels: list[str], pictures: Pictures) -> str:
    from ila.comparison import compare
    from ila.report.agreement import plot_agreement

    loaded = [item.ranking for item in rankings]
    parts = []
    try:
        comparison = compare(loaded, top=AGREEMENT_TOP, labels=labels)
    except IlaError as err:  # layer names differ (e.g. a block-level ranking learned in training)
        try:
            comparison = compare(loaded, top=AGREEMENT_TOP, labels=labels, level="block")
        except IlaError:
            return _section("agreement", "Agreement", [f'<p class="note">{_esc(first_line(err))}</p>'])
        parts.append(f'<p class="note">the rankings name different layers ({_esc(first_line(err))}): their '
                     "block orders are compared.</p>")
    image = plot_agreement(comparison, pictures.path("agreement"), labels=labels)
    parts.append(pictures.img(image, "agreement matrices"))
    for title, matrix in ((f"Jaccard of the top {AGREEMENT_TOP:.0%}", comparison.jaccard),
                          ("Spearman ρ of the scores", comparison.spearman)):
        rows = [[label, *(round(v, 3) for v in row)] for label, row in zip(labels, matrix, strict=True)]
        parts.append(f"<h3>{_esc(title)}</h3>" + _table(["", *labels], rows))
    return _section("agreement", f"Agreement of {len(rankings)} rankings", parts)


# -- train runs ------------------------------------------------------------------------------------------------


def _train_section(n: int, item: TrainInput) -> str:
    run, selection = item.run, item.selection or {}
    cost = run.get("cost") if isinstance(run.get("cost"), dict) else {}
    loss = run.get("heldout_loss")
    trained = selection.get("trained_count", cost.get("trained_layers"))
    total = selection.get("total_count")
    fraction = selection.get("trained_fraction", cost.get("trained_layer_fraction"))
    rows: list[list[Any]] = [
        ["source", Markup(f"<code>{_esc(item.source)}</code>")],
        ["model", run.get("model")], ["data", run.get("data")], ["method", run.get("method")],
        ["strategy", run.get("strategy")], ["selection", selection.get("strategy", run.get("select"))],
        ["trained layers", f"{trained} of {total}" if total is not None else trained],
        ["trained fraction", f"{fraction:.1%}" if is_number(fraction) else fraction],
        ["trainable parameters", cost.get("trainable_params")], ["steps", run.get("steps")],
        *([["processes", run["processes"]]] if "processes" in run else []),
        ["held-out loss", loss],
        ["held-out perplexity", math.exp(loss) if is_number(loss) and loss < 700 else None],
    ]
    rankings = (run.get("config") or {}).get("rankings") if isinstance(run.get("config"), dict) else None
    if rankings:
        rows.append(["rankings used", Markup("<br>".join(f"<code>{_esc(r)}</code>" for r in rankings))])
    parts = [_table(["", ""], rows, header=False)]
    names = selection.get("trained")
    if isinstance(names, list) and names:
        lines = "<br>".join(f"<code>{_esc(x)}</code>" for x in collapse_names([str(x) for x in names]))
        parts.append(f"<h3>trained layers</h3><p>{lines}</p>")
    return _section(f"train-{n}", f"Train run {n}: {run.get('strategy', '')} {run.get('select', '')}".strip(), parts)


def collapse_names(names: list[str]) -> list[str]:
    """Module names with the block number gathered per module path: `model.layers.{0–3,5}.mlp.up_proj`."""
    groups: dict[tuple[str, str], list[int]] = {}
    plain = []
    for name in names:
        match = re.match(r"^(.*?\.)(\d+)(\..+)$", name)
        if match:
            groups.setdefault((match[1], match[3]), []).append(int(match[2]))
        else:
            plain.append(name)
    out = [f"{head}{blocks[0]}{tail}" if len(blocks) == 1 else f"{head}{{{_ranges(blocks)}}}{tail}"
           for (head, tail), blocks in groups.items()]
    return out + plain


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5] -> "0–2,5"."""
    values = sorted(set(numbers))
    runs: list[list[int]] = []
    for v in values:
        if runs and v == runs[-1][1] + 1:
            runs[-1][1] = v
        else:
            runs.append([v, v])
    return ",".join(f"{a}" if a == b else f"{a}–{b}" for a, b in runs)


# -- analyze runs ----------------------------------------------------------------------------------------------


def _analysis_section(n: int, item: AnalysisInput, pictures: Pictures) -> str:
    from ila.report.analysis import plot_analysis

    meta = item.meta
    rows = [["source", Markup(f"<code>{_esc(item.source)}</code>")]]
    rows += [[key, meta[key]] for key in ("base", "tuned", "data", "examples", "blocks") if key in meta]
    rows.append(["metric rows", len(item.rows)])
    parts = [_table(["", ""], rows, header=False)]
    folder = pictures.path("analysis").with_suffix("")
    folder.mkdir()
    title = f"{meta.get('base', '')}: base vs {meta.get('tuned', '')}" if meta else ""
    for path in plot_analysis(item.rows, folder, title=title):
        parts.append(pictures.img(path, f"{path.stem} of analysis {n}", path.stem.replace("_", " ")))
    correlation = meta.get("correlation")
    if isinstance(correlation, list) and correlation:
        parts.append("<h3>Spearman ρ of each metric with the ranking's block importance</h3>")
        parts.append(_table(["metric", "Spearman ρ", "blocks"],
                            [[c.get("metric"), c.get("spearman"), c.get("blocks")] for c in correlation
                             if isinstance(c, dict)]))
    return _section(f"analysis-{n}", f"Analysis {n}", parts)


# -- cost ------------------------------------------------------------------------------------------------------

COST_HEADERS = ["run", "stage", "time (s)", "steps", "median step (ms)", "peak memory (MB)", "tokens/s"]


def _cost_section(inputs: Inputs, labels: list[str]) -> str:
    rows = []
    for label, item in zip(labels, inputs.rankings, strict=True):
        rows += _ranking_cost(f"ranking {label}", item.ranking.metadata)
    for n, train in enumerate(inputs.trains, 1):
        cost = train.run.get("cost") if isinstance(train.run.get("cost"), dict) else {}
        if cost:
            rows.append(_cost_row(f"train {n}", "training", cost.get("total_s"), cost))
    for n, analysis in enumerate(inputs.analyses, 1):
        timings = analysis.meta.get("timings") if isinstance(analysis.meta.get("timings"), dict) else {}
        rows += [[f"analysis {n}", key.removesuffix("_s").replace("_", " "), value, None, None, None, None]
                 for key, value in timings.items()]
    parts = [_table(COST_HEADERS, rows)] if rows else ['<p class="note">no input recorded timings or costs.</p>']
    return _section("cost", "Cost per stage", parts)


def _ranking_cost(run: str, meta: dict) -> list[list[Any]]:
    timings = meta.get("timings") if isinstance(meta.get("timings"), dict) else {}
    stage1 = meta.get("stage1_cost") if isinstance(meta.get("stage1_cost"), dict) else {}
    stage2 = meta.get("stage2_cost") if isinstance(meta.get("stage2_cost"), dict) else {}
    rows = []
    if "load_s" in timings:
        rows.append(_cost_row(run, "load", timings["load_s"], {}))
    if "stage1_s" in timings or stage1:
        rows.append(_cost_row(run, "stage 1", timings.get("stage1_s"), stage1))
    if "score_s" in timings or stage2:
        rows.append(_cost_row(run, "stage 2" if stage2 else "scoring", timings.get("score_s"), stage2))
    if "total_s" in timings:
        rows.append(_cost_row(run, "total", timings["total_s"], {}))
    return rows


def _cost_row(run: str, stage: str, seconds: Any, cost: dict) -> list[Any]:
    return [run, stage, seconds, cost.get("steps"), cost.get("median_step_ms"), cost.get("peak_memory_mb"),
            cost.get("tokens_per_s")]


# -- HTML helpers ----------------------------------------------------------------------------------------------


def _table(headers: list[str], rows: list[list[Any]], *, header: bool = True) -> str:
    head = "<tr>" + "".join(f"<th>{_esc(h)}</th>" for h in headers) + "</tr>" if header else ""
    body = "".join("<tr>" + "".join(_cell(c) for c in row) + "</tr>" for row in rows)
    return f"<table>{head}{body}</table>"


def _cell(value: Any) -> str:
    numeric = is_number(value) or value is None  # the dash of a missing number aligns with the numbers
    return f'<td class="num">{_esc(value)}</td>' if numeric else f"<td>{_esc(value)}</td>"


def _esc(value: Any) -> str:
    """Escaped text of a value (numbers to 4 significant digits, None as a dash); `Markup` as it is."""
    if isinstance(value, Markup):
        return value
    return html.escape(_fmt(value))


def _fmt(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)
