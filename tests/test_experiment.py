"""`ila experiment`: a grid runs every cell once, re-runs skip finished cells, typos are one-line errors."""

import csv
import json

import pytest

from ila.config import TrainConfig, load_config, to_dict
from ila.errors import IlaError
from ila.experiment import load_grid, run_experiment


def grid_file(tmp_path, model_dir, data_file, extra=""):
    path = tmp_path / "grid.yaml"
    path.write_text(f"""
name: tiny
models: ["{model_dir}"]
data: ["{data_file}"]
methods: [lora]
seeds: [0, 1]
selections:
  - {{label: "all", select: all}}
  - {{label: "w/ ILA", select: "freeze-bottom:0.25"}}
  - {{label: "RL", select: "random:0.25", select_seed: 3}}
identify: {{max_length: 32, stage1: {{max_steps: 4}}, ila: {{max_steps: 2}}}}
train: {{max_length: 32, max_steps: 3, heldout_fraction: 0.2, lora: {{r: 2}}}}
{extra}""")
    return path


def test_grid_runs_writes_the_table_and_skips_finished_cells(model_dirs, data_file, tmp_path):
    config = grid_file(tmp_path, model_dirs("llama"), data_file)
    out = tmp_path / "out"
    table = run_experiment(config, out)
    cells = sorted(out.glob("cells/**/run.json"))
    assert len(cells) == 3 * 2
    assert (out / "rankings").is_dir()  # identify ran once for the freeze-bottom cells
    rows = list(csv.DictReader((out / "tiny.csv").open()))
    assert [r["selection"] for r in rows] == ["all", "w/ ILA", "RL"]
    assert all(r["seeds"] == "2" and float(r["heldout_loss_mean"]) > 0 for r in rows)
    text = table.read_text()
    assert "| w/ ILA |" in text and "±" in text
    for c in cells:  # each cell ran `ila train --config cell.yaml` in its own process
        assert to_dict(load_config(c.parent / "cell.yaml", {}, TrainConfig)) == json.loads(c.read_text())["config"]
    ila_cell = next(c for c in cells if "w_ILA" in str(c))
    assert json.loads(ila_cell.read_text())["cost"]["trained_layers"] == 14 - 4  # ⌈0.25·14⌉ frozen
    stamps = {c: c.stat().st_mtime_ns for c in cells}
    run_experiment(config, out)  # nothing left to run
    assert {c: c.stat().st_mtime_ns for c in cells} == stamps

    # adding an eval section evaluates the finished cells without training them again
    mc = tmp_path / "mc.jsonl"
    mc.write_text("".join(json.dumps({"question": f"w{i}", "choices": ["w1", "w2"], "answer": i % 2}) + "\n"
                          for i in range(4)))
    config.write_text(config.read_text() + f'eval: {{mc: ["{mc}"], limit: 4}}\n')
    pytest.importorskip("lm_eval")
    run_experiment(config, out)
    assert {c: c.stat().st_mtime_ns for c in cells} == stamps
    assert len(list(out.glob("cells/**/eval.json"))) == 6
    header = next(csv.reader((out / "tiny.csv").open()))
    assert any(h.startswith("acc ") for h in header)
    evals = sorted(out.glob("cells/**/eval.json"))
    eval_stamps = {e: e.stat().st_mtime_ns for e in evals}
    run_experiment(config, out)  # same eval section: the scores are reused
    assert {e: e.stat().st_mtime_ns for e in evals} == eval_stamps
    config.write_text(config.read_text().replace("limit: 4", "limit: 3"))
    run_experiment(config, out)  # another limit: every cell is scored again, none retrained
    assert {c: c.stat().st_mtime_ns for c in cells} == stamps
    assert all(json.loads(e.read_text())["settings"]["limit"] == 3 for e in evals)

    # a changed grid does not silently reuse cells made with the old settings
    config.write_text(config.read_text().replace("max_steps: 3", "max_steps: 4"))
    with pytest.raises(IlaError, match="was run with another max_steps"):
        run_experiment(config, out)


@pytest.mark.parametrize("old, new, needle", [
    ("seeds: [0, 1]", "seedz: [1]", "unknown key 'seedz'"),
    ("max_steps: 3", "max_stepz: 3", "train: unknown key 'max_stepz'"),
    ("ila: {max_steps: 2}", "ila: {max_stepz: 2}", "identify: unknown key 'ila.max_stepz'"),
    ("methods: [lora]", "methods: [lora]\neval: {mcq: [x]}", "eval: unknown key 'mcq'"),
])
def test_typos_are_one_line_errors(model_dirs, data_file, tmp_path, old, new, needle):
    config = grid_file(tmp_path, model_dirs("llama"), data_file)
    config.write_text(config.read_text().replace(old, new))
    with pytest.raises(IlaError, match=needle) as info:
        load_grid(config)
    assert "\n" not in str(info.value)


def test_bad_selection_in_grid(model_dirs, data_file, tmp_path):
    config = grid_file(tmp_path, model_dirs("llama"), data_file)
    config.write_text(config.read_text().replace('select: "random:0.25"', 'select: "rnd:0.25"'))
    with pytest.raises(IlaError, match="unknown strategy 'rnd'"):
        load_grid(config)


def test_duplicate_labels_and_default_fraction(model_dirs, data_file, tmp_path):
    config = grid_file(tmp_path, model_dirs("llama"), data_file)
    text = config.read_text()
    config.write_text(text.replace('{label: "RL", select: "random:0.25", select_seed: 3}',
                                   '{label: "all", select: "random:0.25"}'))
    with pytest.raises(IlaError, match="label 'all' repeats"):
        load_grid(config)
    config.write_text(text.replace('select: "freeze-bottom:0.25"', "select: freeze-bottom"))
    from ila.experiment import _needs_ranking

    grid = load_grid(config)
    assert all(_needs_ranking(grid, s) == (s.label == "w/ ILA") for s in grid.selections)


def test_grid_wide_train_other_applies_to_its_full_cells(model_dirs, data_file, tmp_path):
    from ila.experiment import _train_config

    config = grid_file(tmp_path, model_dirs("llama"), data_file)
    config.write_text(config.read_text().replace("methods: [lora]", "methods: [lora, full]")
                      .replace("lora: {r: 2}", "lora: {r: 2}, train_other: false"))
    grid = load_grid(config)  # validated per cell: the lora cells do not see train_other
    sel = grid.selections[0]
    assert _train_config(grid, None, None, "lora", sel, 0, []).train_other is None
    assert _train_config(grid, None, None, "full", sel, 0, []).train_other is False


def test_a_failing_cell_stops_the_grid_with_its_name(model_dirs, data_file, tmp_path, capfd):
    config = grid_file(tmp_path, model_dirs("llama"), data_file)
    config.write_text(config.read_text().replace("seeds: [0, 1]", "seeds: [0]")
                      .replace('- {label: "all", select: all}', '- {label: "none", select: "names:no_such_layer"}'))
    with pytest.raises(IlaError, match=r"cell .*none.*: ila train exited with code 2"):
        run_experiment(config, tmp_path / "out")
    assert "selects no layer to train" in capfd.readouterr().err  # the cell's own one-line error


def test_an_interrupted_cell_resumes_only_with_its_configuration(model_dirs, data_file, tmp_path):
    config = grid_file(tmp_path, model_dirs("llama"), data_file)
    cell = tmp_path / "out" / "cells" / "x"
    from ila.experiment import _train_cell, _train_config

    grid = load_grid(config)
    (cell / "checkpoints" / "checkpoint-2").mkdir(parents=True)
    (cell / "cell.yaml").write_text("max_steps: 99\n")  # what the interrupted attempt ran with
    with pytest.raises(IlaError, match="started with another configuration"):
        _train_cell(_train_config(grid, None, None, "lora", grid.selections[0], 0, []), cell)


@pytest.mark.parametrize("name", ["table6_smollm2", "table8_smollm2", "table11_smollm2", "strategies_smollm2",
                                  "predictive_smollm2"])
def test_shipped_grids_load(name):
    from pathlib import Path

    grid = load_grid(Path(__file__).parent.parent / "configs" / f"{name}.yaml")
    assert grid.name == name and grid.selections


@pytest.mark.parametrize("name", ["identify", "all_methods"])
def test_shipped_identify_configs_load(name):
    from pathlib import Path

    from ila.config import IdentifyConfig

    config = load_config(Path(__file__).parent.parent / "configs" / f"{name}.yaml", {}, IdentifyConfig)
    if name == "all_methods":  # every method's section, each validated
        assert config.method == "all" and config.options("shapley").budget == 320
        assert config.options("block-influence").distance == "cosine"


def test_a_selection_with_its_own_ranking_trains_by_it_and_runs_no_identify(model_dirs, data_file, tmp_path):
    """Comparing methods' 'freeze the bottom 25 %': each selection names its method's ranking.json."""
    from conftest import make_model

    from ila.layers import discover_layers
    from ila.ranking import Ranking

    layers = discover_layers(make_model("llama"))
    own = tmp_path / "by_role.json"  # a known ranking: the o_proj and down_proj layers score lowest
    Ranking.from_scores(layers, [0.0 if x.role in ("o_proj", "down_proj") else 1.0 + x.block for x in layers],
                        {"method": "toy"}).save(own)
    config = grid_file(tmp_path, model_dirs("llama"), data_file)
    config.write_text(config.read_text().replace("seeds: [0, 1]", "seeds: [0]").replace(
        '''  - {label: "all", select: all}
  - {label: "w/ ILA", select: "freeze-bottom:0.25"}
  - {label: "RL", select: "random:0.25", select_seed: 3}''',
        f'''  - {{label: "w/ toy", select: "freeze-bottom:0.25", ranking: "{own}"}}'''))
    out = tmp_path / "out"
    run_experiment(config, out)
    assert not (out / "rankings").exists()  # no selection needed the grid's own identify run
    cell = next(out.glob("cells/**/run.json")).parent
    selection = json.loads((cell / "selection.json").read_text())
    frozen = {x.name for x in layers} - set(selection["trained"])
    assert frozen == {x.name for x in layers if x.role in ("o_proj", "down_proj")}
    config.write_text(config.read_text().replace(str(own), str(tmp_path / "missing.json")))
    with pytest.raises(IlaError, match=r"selections\[0\].ranking .*missing.json: file not found"):
        load_grid(config)


def test_a_selection_by_another_importance_method_identifies_with_it_per_data(model_dirs, data_file, tmp_path):
    """'freeze the bottom 25 % by update-norm' beside ILA's: each method ranks each data set once."""
    from ila.ranking import Ranking

    config = grid_file(tmp_path, model_dirs("llama"), data_file)
    config.write_text(config.read_text().replace("seeds: [0, 1]", "seeds: [0]").replace(
        '''  - {label: "RL", select: "random:0.25", select_seed: 3}''',
        '''  - {label: "w/ norm", select: "freeze-bottom:0.25", importance: update-norm}'''))
    out = tmp_path / "out"
    run_experiment(config, out)
    folder = next((out / "rankings").glob("*/*"))
    ila_ranking, norm_ranking = Ranking.load(folder / "ranking.json"), Ranking.load(folder / "update-norm" /
                                                                                  "ranking.json")
    assert ila_ranking.metadata["method"] == "ila" and norm_ranking.metadata["method"] == "update-norm"
    assert "ila" not in norm_ranking.metadata["config"]  # the grid's ila section stays with ila's run
    for label, ranking in (("w_ILA", ila_ranking), ("w_norm", norm_ranking)):
        cell = next(c for c in out.glob("cells/**/run.json") if label in str(c)).parent
        trained = set(json.loads((cell / "selection.json").read_text())["trained"])
        frozen = {x.name for x in ranking.bottom(0.25)}  # the bottom 25 % of its own ranking
        assert trained == {x.name for x in ranking.layers} - frozen
    for bad, needle in (("importance: update-norm", "unknown importance method 'nope'"),
                        ("importance: update-norm", "give 'ranking' or 'importance', not both")):
        text = config.read_text()
        replacement = ("importance: nope" if "nope" in needle else
                       f'importance: update-norm, ranking: "{folder / "ranking.json"}"')
        config.write_text(text.replace(bad, replacement))
        with pytest.raises(IlaError, match=needle):
            load_grid(config)
        config.write_text(text)
