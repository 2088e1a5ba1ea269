"""`ila report` as HTML: one self-contained page of real (tiny) identify, identify --method all, train and analyze
runs and a ranking file; its sections, inline PNG images, escaping, and one-line errors for bad input."""

import base64
import json
from html.parser import HTMLParser

import pytest

import ila
from ila.comparison import compare
from ila.config import IdentifyConfig, Stage1Config
from ila.errors import IlaError
from ila.importance.ila import IlaOptions
from ila.ranking import Ranking
from ila.report.html import collapse_names, write_report

VOID = {"meta", "img", "br", "hr", "link", "input", "source", "col", "wbr"}
PNG = b"\x89PNG\r\n\x1a\n"


def tiny_identify(model, data, method):
    """Stage 1 checks its probe loss every 2 steps and ε-stops at step 4; stage 2 takes 4 steps."""
    return IdentifyConfig(
        model=str(model), data=str(data), method=method, max_length=32, max_examples=48, heldout_fraction=0.2,
        stage1=Stage1Config(max_steps=8, interval=2, min_steps=0, patience=1, epsilon=10.0, probe_examples=8),
        method_options={"ila": IlaOptions(max_steps=4, interval=2, min_steps=0, probe_examples=8)})


@pytest.fixture(scope="module")
def runs(model_dirs, data_file, tmp_path_factory):
    root = tmp_path_factory.mktemp("report_runs")
    model = model_dirs("llama")
    ila.identify(root / "ila", config=tiny_identify(model, data_file, "ila"))
    ila.identify(root / "un", model=str(model), method="update-norm", adapter=str(root / "ila" / "adapter"))
    ila.identify(root / "all", config=tiny_identify(model, data_file, "all"), shapley_budget=12,
                 shapley_examples=4, block_influence_examples=4, grad_norm_batches=1, ila_fast_examples=4)
    ila.train(root / "train", model=str(model), data=str(data_file), select="freeze-bottom:0.25",
              rankings=[str(root / "ila" / "ranking.json")], max_steps=2, batch_size=4, max_length=32,
              max_examples=48)
    ila.analyze(root / "an", base=str(model), tuned=str(root / "train"), data=str(data_file), max_examples=8,
                max_length=32, batch_size=4, segments=2)
    return root


@pytest.fixture(scope="module")
def report(runs, tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.html"
    inputs = [runs / "ila", runs / "un" / "ranking.json", runs / "all", runs / "train", runs / "an"]
    assert write_report(inputs, out, title="tiny <runs>") == out
    return out, parse(out.read_text())


class Page(HTMLParser):
    """Tags, ids, attributes, and the text and images inside each element with an id; notes unbalanced tags."""

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.open, self.ids, self.tags, self.problems = [], [], [], []
        self.text, self.images = {}, {}

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if "id" in attrs:
            self.ids.append(attrs["id"])
        if tag == "img":
            for i in self._inside():
                self.images.setdefault(i, []).append(attrs.get("src", ""))
        if tag not in VOID:
            self.open.append((tag, attrs.get("id")))

    def handle_endtag(self, tag):
        if not self.open or self.open[-1][0] != tag:
            self.problems.append(f"</{tag}> closes {self.open[-1] if self.open else 'nothing'}")
        else:
            self.open.pop()

    def handle_data(self, data):
        for i in self._inside():
            self.text[i] = self.text.get(i, "") + data

    def _inside(self):
        return [i for _, i in self.open if i]


def parse(text):
    page = Page()
    page.feed(text)
    page.close()
    return page


def test_report_is_well_formed_html_with_every_section(report):
    out, page = report
    assert not page.problems and not page.open
    assert [t for t, _ in page.tags][:1] == ["html"] and "<title>tiny &lt;runs&gt;</title>" in out.read_text()
    rankings = {f"ranking-{n}" for n in range(1, 11)}  # ila, update-norm, then the 8 methods of --method all
    expected = {"inputs", "agreement", "train-1", "analysis-1", "cost", "curves-1", "curves-6"} | rankings
    assert expected <= set(page.ids)
    assert len(page.ids) == len(set(page.ids))
    assert "ranking-11" not in page.ids and "train-2" not in page.ids
    assert sorted(p.name for p in out.parent.iterdir()) == ["report.html"]  # no temporary file left


def test_images_are_inline_pngs(report):
    _, page = report
    sources = [attrs.get("src", "") for tag, attrs in page.tags if tag == "img"]
    assert len(sources) >= 10 + 1 + 2 + 6  # heatmaps, agreement, two ILA curves, analysis plots
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)[:8] == PNG
    for n in range(1, 11):
        assert page.images[f"ranking-{n}"], n  # each ranking has its heatmap
    assert page.images["agreement"] and page.images["curves-1"] and len(page.images["analysis-1"]) >= 6


def test_no_external_resources(report):
    out, page = report
    refs = [(tag, key, value) for tag, attrs in page.tags for key, value in attrs.items() if key in ("src", "href")]
    assert refs
    for tag, key, value in refs:
        assert not value.startswith(("http://", "https://", "//")), (tag, key, value)
        assert value.startswith("data:image/png;base64," if key == "src" else "#"), (tag, key, value[:40])
    assert not {"script", "link", "iframe", "object"} & {tag for tag, _ in page.tags}
    assert "url(" not in out.read_text()


def test_ranking_sections_list_top_and_bottom_layers(report, runs):
    _, page = report
    ranking = Ranking.load(runs / "ila" / "ranking.json")
    order = ranking.ordered()
    text = page.text["ranking-1"]
    assert "top 7 of 14" in text and "bottom 7" in text
    for layer in (order[0], order[6], order[7], order[-1]):
        assert layer.name in text
    best = next(e for e in ranking.entries if e.layer.name == order[0].name)
    assert f"{best.score:.4g}" in text and f"{best.gate:.4g}" in text
    assert str(runs / "un" / "ranking.json") in page.text["ranking-2"]


def test_ila_curves_mark_the_epsilon_stop_and_stage2(report, runs):
    _, page = report
    meta = Ranking.load(runs / "ila" / "ranking.json").metadata
    assert meta["stability_step"] == 4 and len(meta["stage1_probe_losses"]) == 2 and len(meta["stage2_losses"]) == 4
    assert "ε-stop at step 4 (ε = 10)" in page.text["curves-1"]
    assert "stage 2: objective of each step" in page.text["curves-1"]
    assert "curves-2" not in page.ids  # update-norm on a given adapter: no stage-1 or stage-2 curve
    assert "the same update as ranking 6" in page.text["curves-7"]  # --method all: one shared stage 1


def test_agreement_covers_every_ranking(report, runs):
    _, page = report
    text = page.text["agreement"]
    files = [runs / "ila" / "ranking.json", runs / "un" / "ranking.json"]
    methods = json.loads((runs / "all" / "comparison.json").read_text())["labels"]
    files += [runs / "all" / m / "ranking.json" for m in methods]
    assert "Agreement of 10 rankings" in text
    for n, name in enumerate(["ila", "update-norm", *methods], 1):
        assert f"{n}: {name}" in text
    c = compare(files, top=0.75)
    assert f"{round(c.jaccard[0][2], 3):.4g}" in text and f"{round(c.spearman[0][2], 3):.4g}" in text


def test_train_section_shows_the_selection_and_heldout_loss(report, runs):
    _, page = report
    run = json.loads((runs / "train" / "run.json").read_text())
    selection = json.loads((runs / "train" / "selection.json").read_text())
    text = page.text["train-1"]
    assert "freeze-bottom:0.25" in text and "10 of 14" in text and "71.4%" in text
    assert f"{run['heldout_loss']:.4g}" in text
    lines = collapse_names(selection["trained"])
    assert len(lines) < len(selection["trained"]) and all(line in text for line in lines)


def test_collapse_names_gathers_block_numbers():
    names = [f"model.layers.{b}.mlp.up_proj" for b in (0, 1, 2, 5)] + ["model.layers.3.self_attn.q_proj", "lm_head"]
    assert collapse_names(names) == ["model.layers.{0–2,5}.mlp.up_proj", "model.layers.3.self_attn.q_proj",
                                     "lm_head"]


def test_analysis_and_cost_sections(report, runs):
    _, page = report
    saved = json.loads((runs / "an" / "metrics.json").read_text())
    assert f"{len(saved['rows'])}" in page.text["analysis-1"] and str(runs / "train") in page.text["analysis-1"]
    cost = page.text["cost"]
    meta = Ranking.load(runs / "ila" / "ranking.json").metadata
    for needle in ("ranking 1: ila", "stage 1", "stage 2", "train 1", "training", "analysis 1",
                   f"{meta['timings']['stage1_s']:.4g}", f"{meta['stage2_cost']['median_step_ms']:.4g}"):
        assert needle in cost, needle


def test_an_analyze_folder_without_metrics_json_is_read_from_its_csv(runs, tmp_path):
    folder = tmp_path / "an"
    folder.mkdir()
    (folder / "metrics.csv").write_text((runs / "an" / "metrics.csv").read_text())
    page = parse(write_report([folder], tmp_path / "an.html").read_text())
    assert {"analysis-1", "cost"} <= set(page.ids) and len(page.images["analysis-1"]) >= 6
    assert not any(i.startswith(("ranking-", "train-")) for i in page.ids)


def test_text_is_escaped(runs, tmp_path):
    data = json.loads((runs / "ila" / "ranking.json").read_text())
    data["metadata"]["model"] = "<script>alert('x')</script>"
    data["metadata"]["data"] = 'a & "b"'
    (tmp_path / "r.json").write_text(json.dumps(data))
    out = write_report([tmp_path / "r.json"], tmp_path / "one.html")
    text = out.read_text()
    page = parse(text)
    assert "script" not in {tag for tag, _ in page.tags}
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in text
    assert "<script>alert('x')</script>" in page.text["ranking-1"] and 'a & "b"' in page.text["ranking-1"]
    assert "agreement" not in page.ids  # one ranking: nothing to compare


def bad_input(kind, tmp_path):
    if kind == "missing":
        return tmp_path / "nope"
    if kind == "empty folder":
        (tmp_path / "empty").mkdir()
        return tmp_path / "empty"
    if kind == "not a ranking":
        (tmp_path / "x.json").write_text('{"a": 1}')
        return tmp_path / "x.json"
    if kind == "not json":
        (tmp_path / "x.txt").write_text("hello")
        return tmp_path / "x.txt"
    folder = tmp_path / kind.replace(" ", "_")
    folder.mkdir()
    name, text = {"other run.json": ("run.json", '{"model": "m"}'), "bad ranking in a folder": ("ranking.json", "{}"),
                  "bad metrics": ("metrics.json", '{"rows": [{"metric": "cka"}]}')}[kind]
    (folder / name).write_text(text)
    return folder


@pytest.mark.parametrize(("kind", "message"), [
    ("missing", "not found"),
    ("empty folder", "not a run folder"),
    ("not a ranking", "not a ranking (expected an object with a 'layers' list)"),
    ("not json", "not a ranking (not valid JSON"),
    ("other run.json", "not from ila train"),
    ("bad ranking in a folder", "ranking.json: not a ranking (expected an object with a 'layers' list)"),
    ("bad metrics", "metrics.json: no rows of metric, layer, base, tuned, value"),
])
def test_bad_input_is_a_one_line_error_and_writes_nothing(kind, message, runs, tmp_path):
    path = bad_input(kind, tmp_path)
    out = tmp_path / "out" / "report.html"
    with pytest.raises(IlaError) as err:
        write_report([runs / "ila", path], out)
    text = str(err.value)
    assert "\n" not in text and message in text and str(path) in text
    assert "expected a ranking.json file or a run folder of ila identify, train or analyze" in text
    assert not out.exists()


def test_no_inputs_or_a_folder_as_out_are_refused(runs, tmp_path):
    with pytest.raises(IlaError, match="give at least one path"):
        write_report([], tmp_path / "r.html")
    with pytest.raises(IlaError, match="is a folder; give a file name"):
        write_report([runs / "ila"], tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_command_line(runs, tmp_path, capsys):
    """`ila report PATH... --out FILE` writes the page; a folder that is neither a run nor a ranking is one line,
    exit 2, and no file."""
    from ila.cli import main

    out = tmp_path / "page.html"
    assert main(["report", str(runs / "ila"), str(runs / "train"), "--out", str(out)]) == 0
    page = parse(out.read_text())
    assert {"ranking-1", "train-1", "cost"} <= set(page.ids)
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty"), "--out", str(tmp_path / "bad.html")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ila: error: report:") and "not a run folder" in err[0]
    assert not (tmp_path / "bad.html").exists()
